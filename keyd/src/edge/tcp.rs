//! The TCP rung: one TLS 1.3 connection between two keyds (TCP, same
//! address and port as the QUIC endpoint), carrying records (frame.rs):
//! WireGuard packets, pings and the hybrid exchanges themselves, so that key
//! rotation keeps working where no UDP passes at all.
//!
//! TLS here is only a transport, as QUIC is: its certificate is a throwaway
//! one. What pins the link to the peer's roster certificate is the exchange
//! run over it, bound to this TLS session's exporter (`quic::tls_binding`):
//! until one succeeded, the link carries nothing but exchange records.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::frame::{Record, RecordDecoder};

/// TCP connect plus TLS handshake, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Encoded records waiting for the writer: a full queue drops packets (as a
/// full UDP socket buffer would) rather than buffering without bound.
const SEND_QUEUE: usize = 1024;
/// Exchange messages waiting for the exchange that reads them.
const EXCHANGE_QUEUE: usize = 4;
/// A link on which nothing at all arrives for this long is dead (pings
/// every second while the ladder probes it).
const READ_IDLE: Duration = Duration::from_secs(15);

/// Why a record was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The writer is behind (bulk traffic): like a full socket buffer.
    Full,
    Closed,
    TooLong,
}

/// Before an exchange on the link succeeded, an exchange record longer
/// than any first message is refused (mesh-proto's msg1 is about 1.6 KB).
const MAX_UNAUTHENTICATED_RECORD: usize = 4096;

/// Where a link's packets and pongs go once it is authenticated.
pub trait LinkSink: Send + Sync {
    fn packet(&self, packet: &[u8]);
    fn ping(&self, link: &TcpLink, nonce: u64);
    fn pong(&self, nonce: u64);
    fn hello(&self, flags: u8);
    /// After the records of one read: send what `packet` gathered.
    fn flush(&self);
}

/// One TLS/TCP link to a peer keyd.
pub struct TcpLink {
    pub remote: SocketAddr,
    /// This TLS session's exporter value (the exchange binding).
    pub binding: Vec<u8>,
    send: mpsc::Sender<Vec<u8>>,
    exchanges: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    sink: OnceLock<Arc<dyn LinkSink>>,
    closed: AtomicBool,
    /// Records refused for this link's lifetime (not authenticated yet, or
    /// the send queue was full).
    pub dropped: std::sync::atomic::AtomicU64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl TcpLink {
    /// Dials `addr` and completes TLS within [`HANDSHAKE_TIMEOUT`]. The
    /// link's socket and tasks are `runtime`'s (the data-path thread's,
    /// where the relay that feeds it runs).
    pub async fn connect(
        connector: &TlsConnector,
        addr: SocketAddr,
        runtime: &Handle,
    ) -> Result<Arc<Self>> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("TCP connect to {addr}"))?;
            let tcp = move_to(tcp, runtime).with_context(|| format!("TCP connect to {addr}"))?;
            let _ = tcp.set_nodelay(true);
            // An address as the server name: no SNI in the ClientHello.
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            connector
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))
        })
        .await
        .map_err(|_| anyhow!(crate::quic::NoAnswer(addr)))??;
        let binding = crate::quic::tls_binding(tls.get_ref().1)?;
        Ok(Self::start(tls, addr, binding, runtime))
    }

    /// Completes an accepted connection's TLS within [`HANDSHAKE_TIMEOUT`]
    /// (socket and tasks on `runtime`, as for `connect`).
    pub async fn accept(
        acceptor: &TlsAcceptor,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        runtime: &Handle,
    ) -> Result<Arc<Self>> {
        let tcp = move_to(tcp, runtime).with_context(|| format!("TCP from {remote}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake from {remote} did not finish"))?
            .with_context(|| format!("TLS handshake from {remote}"))?;
        let binding = crate::quic::tls_binding(tls.get_ref().1)?;
        Ok(Self::start(tls, remote, binding, runtime))
    }

    fn start<S>(stream: S, remote: SocketAddr, binding: Vec<u8>, runtime: &Handle) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (send, send_rx) = mpsc::channel(SEND_QUEUE);
        let (exchange_tx, exchange_rx) = mpsc::channel(EXCHANGE_QUEUE);
        let link = Arc::new(Self {
            remote,
            binding,
            send,
            exchanges: tokio::sync::Mutex::new(exchange_rx),
            sink: OnceLock::new(),
            closed: AtomicBool::new(false),
            dropped: Default::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let (reader, writer) = tokio::io::split(stream);
        let w = runtime.spawn(write_loop(writer, send_rx));
        let r = runtime.spawn(read_loop(reader, Arc::downgrade(&link), exchange_tx));
        if let Ok(mut t) = link.tasks.lock() {
            t.extend([w, r]);
        }
        link
    }

    /// From now on packets and pongs go to `sink` (after an exchange bound
    /// to this link succeeded).
    pub fn authenticate(&self, sink: Arc<dyn LinkSink>) {
        let _ = self.sink.set(sink);
    }

    pub fn is_authenticated(&self) -> bool {
        self.sink.get().is_some()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.send.is_closed()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Ok(t) = self.tasks.lock() {
            for task in t.iter() {
                task.abort();
            }
        }
    }

    /// Queues one record without waiting.
    pub fn send(&self, record: Record<'_>) -> Result<(), SendError> {
        let mut out = Vec::new();
        if record.encode(&mut out).is_err() {
            return Err(SendError::TooLong);
        }
        self.send.try_send(out).map_err(|e| {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            }
        })
    }

    /// The exchange channel of this link (one exchange at a time).
    pub async fn exchange_io(self: &Arc<Self>) -> LinkIo<'_> {
        LinkIo {
            link: self.clone(),
            rx: self.exchanges.lock().await,
        }
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// `tcp`, registered with `runtime`'s reactor instead: its readiness then
/// wakes that runtime's thread (the relay's), not another one first.
fn move_to(tcp: tokio::net::TcpStream, runtime: &Handle) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tcp.into_std()?;
    let _on = runtime.enter();
    tokio::net::TcpStream::from_std(tcp)
}

/// Writes queued records, flushing whenever the queue runs dry.
async fn write_loop(writer: impl AsyncWrite + Send + Unpin, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut writer = tokio::io::BufWriter::with_capacity(64 * 1024, writer);
    while let Some(record) = rx.recv().await {
        if writer.write_all(&record).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if writer.write_all(&more).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Reads records: exchange messages to the exchange channel, the rest to
/// the sink once authenticated. A malformed record ends the link.
async fn read_loop(
    mut reader: impl AsyncRead + Send + Unpin,
    link: std::sync::Weak<TcpLink>,
    exchanges: mpsc::Sender<Vec<u8>>,
) {
    let mut decoder = RecordDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(READ_IDLE, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        if decoder.push(&buf[..n]).is_err() {
            break;
        }
        let Some(link) = link.upgrade() else { return };
        loop {
            let record = match decoder.next() {
                None => break,
                Some(Err(_)) => {
                    link.close();
                    return;
                }
                Some(Ok(r)) => r,
            };
            match (record, link.sink.get()) {
                (Record::Exchange(msg), sink) => {
                    // A full exchange queue means a peer sending faster
                    // than any exchange reads: not a keyd.
                    if (sink.is_none() && msg.len() > MAX_UNAUTHENTICATED_RECORD)
                        || exchanges.try_send(msg.to_vec()).is_err()
                    {
                        link.close();
                        return;
                    }
                }
                (Record::Packet(p), Some(sink)) => sink.packet(p),
                (Record::Ping(n), Some(sink)) => sink.ping(&link, n),
                (Record::Pong(n), Some(sink)) => sink.pong(n),
                (Record::Hello(f), Some(sink)) => sink.hello(f),
                (_, None) => {
                    link.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(sink) = link.sink.get() {
            sink.flush();
        }
    }
    if let Some(link) = link.upgrade() {
        link.closed.store(true, Ordering::Relaxed);
    }
}

/// Exchange messages over a link, for `quic::initiate_on`/`respond_on`.
pub struct LinkIo<'a> {
    link: Arc<TcpLink>,
    rx: tokio::sync::MutexGuard<'a, mpsc::Receiver<Vec<u8>>>,
}

impl crate::quic::MessageIo for LinkIo<'_> {
    async fn write(&mut self, msg: &[u8]) -> Result<()> {
        self.link
            .send(Record::Exchange(msg))
            .map_err(|e| anyhow!("cannot send to {} on the TCP link: {e:?}", self.link.remote))
    }

    async fn read(&mut self) -> Result<Vec<u8>> {
        self.rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("the TCP link to {} closed mid-exchange", self.link.remote))
    }

    async fn finish(&mut self) {
        // Records go out in order on one TCP stream: nothing to wait for.
    }
}

/// The TLS configurations of the TCP rung: the same throwaway certificate
/// and any-certificate client as keyd's QUIC (see quic.rs), TLS 1.3 only.
pub fn tls() -> Result<(TlsConnector, TlsAcceptor)> {
    let (server, client) = crate::quic::tls_configs(ALPN)?;
    Ok((
        TlsConnector::from(Arc::new(client)),
        TlsAcceptor::from(Arc::new(server)),
    ))
}

/// What an observer of the TCP rung sees in the ClientHello: HTTP/2's, as
/// for any HTTPS connection to port 443.
pub const ALPN: &[u8] = b"h2";
