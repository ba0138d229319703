//! The WireGuard userspace API on `/var/run/wireguard/IFNAME.sock`.
//!
//! gotatun ships a UAPI handler, but it replaces a peer (and so its live
//! session) whenever a `set` touches it. The kernel and wireguard-go update a
//! peer in place: a new preshared key is used from the next handshake on, and
//! the session in flight keeps carrying traffic. keyd rotates keys every two
//! minutes and must not cost a packet, so this module serves the protocol
//! itself, with `mesh_proto::uapi` for the text and gotatun's public
//! `Device::write`/`modify_peer` (which calls `Tunn::set_preshared_key`) for
//! the changes.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use gotatun::device::Peer;
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnetwork::IpNetwork;
use mesh_proto::prefix::IpPrefix;
use mesh_proto::uapi::{
    self, DeviceInfo, DeviceSet, Key, PeerInfo, PeerSet, SetItem, SetParser, UapiError,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, error, info, warn};

use crate::counters::Counters;
use gotatun::device::{Device, DeviceTransports};

/// How long the next line of a request may take to arrive.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an answer may take to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Peer parts applied under one `device.write()` (~256 x 150 bytes), and
/// prefixes: the lock is held for one batch, memory is one batch.
const BATCH_PEERS: usize = 256;
const BATCH_PREFIXES: usize = 4 * uapi::MAX_ALLOWED_IPS_PER_ITEM;
/// The longest a batch holds the write lock before it lets the data path
/// (which takes the read lock for every packet) in; it goes on under the
/// next lock. At least one change is made per lock.
const LOCK_BUDGET: Duration = Duration::from_millis(5);
/// How much of a refused request is read to find its end (a 10,000-peer
/// `wg setconf` is ~1.5 MB); past it the connection is closed.
const MAX_DRAIN_BYTES: u64 = 64 << 20;

/// The UAPI socket of `ifname` in `dir` (`wg` looks in
/// [`mesh_proto::firewall::document::DEFAULT_SOCKET_DIR`]).
pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.sock"))
}

/// Binds the UAPI socket (0600: it hands out and takes private keys).
pub fn bind(dir: &Path, ifname: &str) -> Result<UnixListener> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = socket_path(dir, ifname);
    if path.exists() {
        // A live daemon would answer; a stale socket from a crash would not.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "{} is in use: is mesh-node already running on {ifname}?",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    bind_private(&path)
}

/// Binds a listener at `path` that is never reachable with a mode wider than
/// 0600. `bind` creates the socket with the umask's mode, so it is bound
/// inside a fresh 0700 directory beside `path` (where no other user can
/// reach it), set to 0600 there, and renamed into place, which moves the
/// same socket. Unlike setting the umask around `bind`, this changes
/// nothing for the other threads of the process.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut private = path.as_os_str().to_owned();
    private.push(format!(".{}.d", std::process::id()));
    let private = PathBuf::from(private);
    // Left over by a crashed run with the same pid; only root writes here.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let bound = private.join(name);
    let result = (|| {
        let listener = UnixListener::bind(&bound)
            .with_context(|| format!("cannot bind {}", bound.display()))?;
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", bound.display()))?;
        std::fs::rename(&bound, path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Accepts connections until the task is dropped.
pub async fn serve<T: DeviceTransports>(
    listener: UnixListener,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (device, counters) = (device.clone(), counters.clone());
                tokio::spawn(async move { handle_connection(stream, device, counters).await });
            }
            Err(e) => warn!("uapi: accept failed: {e}"),
        }
    }
}

/// A connection's read side and its one reused line buffer.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    line: Vec<u8>,
}

/// What a request leaves for the connection.
enum Outcome {
    /// Nothing to answer (the client left, or idled past the deadline).
    Close,
    /// Answer, then read the next request.
    Answer(String),
    /// Answer (best effort), then close: the request's end was not found.
    AnswerAndClose(String),
}

/// One client connection: any number of requests, each ended by an empty
/// line. Lines are read one at a time, each at most
/// [`uapi::MAX_LINE_BYTES`] long and within [`LINE_TIMEOUT`]; a `set` is
/// applied as it streams in, so memory is bounded by one batch of peers
/// whatever the size of the request.
async fn handle_connection<T: DeviceTransports>(
    stream: UnixStream,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) {
    let (r, mut w) = stream.into_split();
    let mut conn = Conn {
        reader: BufReader::new(r),
        line: Vec::with_capacity(256),
    };
    loop {
        let work = serve_request(conn, device.clone(), counters.clone());
        let Some((back, outcome)) = guarded(work, &counters).await else {
            // The reader went down with the panicking task: answer, close.
            let _ = write_answer(&mut w, &uapi::format_errno(uapi::EIO)).await;
            return;
        };
        conn = back;
        match outcome {
            Outcome::Close => return,
            Outcome::Answer(text) => {
                if !write_answer(&mut w, &text).await {
                    return;
                }
            }
            Outcome::AnswerAndClose(text) => {
                let _ = write_answer(&mut w, &text).await;
                return;
            }
        }
    }
}

/// Writes an answer within [`WRITE_TIMEOUT`]; false when it could not.
async fn write_answer(w: &mut OwnedWriteHalf, text: &str) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(text.as_bytes())).await,
        Ok(Ok(()))
    )
}

/// Runs one request in a task of its own, so that a panic while serving it
/// (a bug here or in gotatun, whatever the input) is answered with EIO,
/// logged and counted like any failed request, and the daemon serves on.
/// Without this the connection closes unanswered: `wg` says "Protocol error".
/// `None` when the work panicked (or was cancelled).
async fn guarded<X: Send + 'static>(
    work: impl Future<Output = X> + Send + 'static,
    counters: &Counters,
) -> Option<X> {
    match tokio::spawn(work).await {
        Ok(x) => Some(x),
        Err(e) => {
            Counters::inc(&counters.uapi_failed);
            let why = if e.is_panic() {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string())
            } else {
                "cancelled".to_string()
            };
            error!("uapi: request failed: {why}");
            None
        }
    }
}

/// Why a connection cannot go on: no request end can be found any more.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("no line within {0:?}")]
    TimedOut(Duration),
    #[error("the client closed the connection mid-request")]
    Closed,
    #[error("more than {MAX_DRAIN_BYTES} bytes without the request's end")]
    TooMuch,
}

/// A line read by [`read_line`].
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// In the buffer, without its `\n` (empty: the end of a request).
    Text,
    /// Longer than [`uapi::MAX_LINE_BYTES`]: read to its end and discarded.
    TooLong,
}

/// Reads one line into `buf` (cleared first), each piece within `wait`.
/// `Ok(None)` at the end of the stream before any byte. A line over the cap
/// is consumed without being kept, at most `discard` bytes of it. Returns
/// the bytes consumed with the line.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    wait: Duration,
    discard: u64,
) -> Result<Option<(Line, u64)>, ReadError> {
    let cap = uapi::MAX_LINE_BYTES as u64 + 1;
    let mut consumed = 0u64;
    loop {
        buf.clear();
        let mut limited = (&mut *reader).take(cap);
        let n = tokio::time::timeout(wait, limited.read_until(b'\n', buf))
            .await
            .map_err(|_| ReadError::TimedOut(wait))?? as u64;
        let long = consumed > 0;
        consumed += n;
        if n == 0 {
            return if long {
                Err(ReadError::Closed)
            } else {
                Ok(None)
            };
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            let line = if long { Line::TooLong } else { Line::Text };
            return Ok(Some((line, consumed)));
        }
        if n < cap {
            // The stream ended inside the line.
            return Err(ReadError::Closed);
        }
        if consumed > discard {
            return Err(ReadError::TooMuch);
        }
    }
}

/// Reads and discards the rest of a refused request, up to its empty line,
/// so the client (`wg` writes the whole request before it reads) gets its
/// errno instead of a closed socket. Bounded by [`MAX_DRAIN_BYTES`].
async fn drain(conn: &mut Conn) -> Result<(), ReadError> {
    let mut left = MAX_DRAIN_BYTES;
    loop {
        match read_line(&mut conn.reader, &mut conn.line, LINE_TIMEOUT, left).await? {
            None => return Err(ReadError::Closed),
            Some((Line::Text, _)) if conn.line.is_empty() => return Ok(()),
            Some((_, n)) => left = left.checked_sub(n).ok_or(ReadError::TooMuch)?,
        }
    }
}

/// Why a request was answered with an errno.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The text is not the protocol (counted as malformed).
    #[error(transparent)]
    Malformed(#[from] UapiError),
    /// Applying a well-formed request failed (counted as failed).
    #[error("{0:#}")]
    Apply(#[from] anyhow::Error),
}

impl Failure {
    fn errno(&self) -> i32 {
        match self {
            Failure::Malformed(e) => e.errno(),
            Failure::Apply(e) => errno_of(e),
        }
    }

    /// Logs and counts the failure; the errno answer.
    fn answer(&self, counters: &Counters) -> String {
        match self {
            Failure::Malformed(e) => {
                Counters::inc(&counters.uapi_malformed);
                warn!("uapi: refused request: {e}");
            }
            Failure::Apply(e) => {
                Counters::inc(&counters.uapi_failed);
                warn!("uapi: set failed: {e:#}");
            }
        }
        uapi::format_errno(self.errno())
    }
}

/// The text of a line for the parser; bytes that are not UTF-8 are refused.
fn line_text(line: &[u8]) -> Result<&str, UapiError> {
    std::str::from_utf8(line)
        .map_err(|_| UapiError::NotKeyValue(String::from_utf8_lossy(line).into_owned()))
}

/// Reads and serves one request; gives the connection back with what to do.
async fn serve_request<T: DeviceTransports>(
    mut conn: Conn,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) -> (Conn, Outcome) {
    // Between requests the client may idle longer than within one, and
    // stray empty lines are skipped (as before a request there is none).
    let first = loop {
        let read = read_line(
            &mut conn.reader,
            &mut conn.line,
            IDLE_TIMEOUT,
            MAX_DRAIN_BYTES,
        );
        match read.await {
            Ok(Some((Line::Text, _))) if conn.line.is_empty() => continue,
            Ok(Some((line, _))) => break line,
            Ok(None) => return (conn, Outcome::Close),
            Err(e) => {
                debug!("uapi: {e}");
                return (conn, Outcome::Close);
            }
        }
    };
    Counters::inc(&counters.uapi_requests);
    let result = match (first, conn.line.as_slice()) {
        (Line::Text, b"get=1") => get_request(&mut conn, &device).await,
        (Line::Text, b"set=1") => set_request(&mut conn, &device).await,
        (Line::TooLong, _) => Ok(Err(UapiError::LineTooLong.into())),
        (Line::Text, other) => Ok(Err(UapiError::UnknownOperation(
            String::from_utf8_lossy(other).into_owned(),
        )
        .into())),
    };
    let outcome = match result {
        Ok(Ok(answer)) => Outcome::Answer(answer),
        // The failing line was not the request's end: find it, then answer.
        Ok(Err(failure)) => {
            let answer = failure.answer(&counters);
            match drain(&mut conn).await {
                Ok(()) => Outcome::Answer(answer),
                Err(e) => {
                    debug!("uapi: {e}");
                    Outcome::AnswerAndClose(answer)
                }
            }
        }
        // The request's end cannot be found: answer if the client still
        // reads (it may have shut down its side only), then close.
        Err(e @ (ReadError::Closed | ReadError::TimedOut(_) | ReadError::TooMuch)) => {
            debug!("uapi: {e}");
            let answer = Failure::Malformed(UapiError::Unterminated).answer(&counters);
            Outcome::AnswerAndClose(answer)
        }
        Err(e @ ReadError::Io(_)) => {
            debug!("uapi: {e}");
            Outcome::Close
        }
    };
    (conn, outcome)
}

/// `get=1`: the next line must be the request's end.
async fn get_request<T: DeviceTransports>(
    conn: &mut Conn,
    device: &Device<T>,
) -> Result<Result<String, Failure>, ReadError> {
    let read = read_line(
        &mut conn.reader,
        &mut conn.line,
        LINE_TIMEOUT,
        MAX_DRAIN_BYTES,
    );
    match read.await?.ok_or(ReadError::Closed)? {
        (Line::Text, _) if conn.line.is_empty() => {
            Ok(Ok(uapi::format_get_response(&get(device).await)))
        }
        (Line::Text, _) => Ok(Err(UapiError::UnknownKey(
            String::from_utf8_lossy(&conn.line).into_owned(),
        )
        .into())),
        (Line::TooLong, _) => Ok(Err(UapiError::LineTooLong.into())),
    }
}

/// `set=1`, applied as it streams in: items from [`SetParser`] are
/// collected into a [`Batch`] and each full batch is applied under one
/// short `device.write()`; the lock is never held while reading the socket
/// (the data path takes `device.read()` for every packet). On the first
/// error (or if the client stops mid-request) nothing more is applied:
/// what came before the failing line's peer stays applied, as in
/// wireguard-go (keyd reconciles anyway).
/// With `replace_peers=true`, unlisted peers are removed at the end, only
/// when the whole request was good.
async fn set_request<T: DeviceTransports>(
    conn: &mut Conn,
    device: &Device<T>,
) -> Result<Result<String, Failure>, ReadError> {
    let mut parser = SetParser::new();
    let mut batch = Batch::default();
    loop {
        let read = read_line(
            &mut conn.reader,
            &mut conn.line,
            LINE_TIMEOUT,
            MAX_DRAIN_BYTES,
        );
        let read = match read.await.and_then(|l| l.ok_or(ReadError::Closed)) {
            Ok(read) => read,
            Err(e) => {
                // Unterminated: what came before is applied all the same.
                let _ = batch.apply(device).await;
                return Err(e);
            }
        };
        let item = match read {
            (Line::Text, _) if conn.line.is_empty() => break,
            (Line::Text, _) => line_text(&conn.line).and_then(|l| parser.line(l)),
            (Line::TooLong, _) => Err(UapiError::LineTooLong),
        };
        let item = match item {
            Ok(Some(item)) => item,
            Ok(None) => continue,
            Err(e) => {
                // What came before the bad line is applied, whatever the
                // batch boundaries.
                if let Err(failed) = batch.apply(device).await {
                    return Ok(Err(failed.into()));
                }
                return Ok(Err(e.into()));
            }
        };
        batch.push(item);
        if batch.is_full()
            && let Err(e) = batch.apply(device).await
        {
            return Ok(Err(e.into()));
        }
    }
    batch.push(parser.end());
    if let Err(e) = batch.apply(device).await {
        return Ok(Err(e.into()));
    }
    let (added, updated) = (batch.added, batch.updated);
    let removed = match batch.listed.take() {
        Some(listed) => match remove_unlisted(device, &listed).await {
            Ok(n) => n,
            Err(e) => return Ok(Err(e.into())),
        },
        None => 0,
    };
    if added + removed > 0 {
        info!("uapi: set: {added} peers added, {updated} updated in place, {removed} removed");
    }
    Ok(Ok(uapi::format_errno(0)))
}

/// Set items waiting to be applied under one lock, plus what the whole
/// request needs at its end.
#[derive(Default)]
struct Batch {
    device: Option<DeviceSet>,
    /// Each peer part, and whether it continues the one before it.
    peers: Vec<(PeerSet, bool)>,
    prefixes: usize,
    /// `replace_peers=true`: the listed keys, whose peers stay (32 bytes a
    /// listed peer, never a copy of the request).
    listed: Option<HashSet<[u8; 32]>>,
    reset: bool,
    /// Peers the request named, first parts only (for the log).
    added: usize,
    updated: usize,
}

impl Batch {
    fn push(&mut self, item: SetItem) {
        match item {
            SetItem::Device(d) => {
                self.reset = d.replace_peers;
                if d.replace_peers {
                    self.listed = Some(HashSet::new());
                }
                self.device = Some(d);
            }
            SetItem::Peer(p) => {
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(p.public_key.0);
                }
                self.prefixes += p.allowed_ips.len();
                self.peers.push((p, false));
            }
            SetItem::PeerContinued(p) => {
                self.prefixes += p.allowed_ips.len();
                self.peers.push((p, true));
            }
        }
    }

    fn is_full(&self) -> bool {
        self.peers.len() >= BATCH_PEERS || self.prefixes >= BATCH_PREFIXES
    }

    /// Applies and empties the batch under one `device.write()`.
    async fn apply<T: DeviceTransports>(&mut self, device: &Device<T>) -> Result<()> {
        let settings = self.device.take();
        let peers = std::mem::take(&mut self.peers);
        self.prefixes = 0;
        if settings.is_none() && peers.is_empty() {
            return Ok(());
        }
        if let Some(key) = settings.as_ref().and_then(|s| s.private_key.as_ref())
            && key.is_zero()
        {
            return Err(Refused::ZeroPrivateKey.into());
        }
        let reset = self.reset;
        let mut settings = settings;
        let mut peers = peers.into_iter().peekable();
        // One write lock per batch, and also no longer than LOCK_BUDGET:
        // what a change costs depends on gotatun and the device's size.
        loop {
            let (added, updated) = device
                .write(async |d| -> Result<(usize, usize)> {
                    if let Some(settings) = settings.take() {
                        apply_device(d, settings).await?;
                    }
                    let start = Instant::now();
                    let (mut added, mut updated) = (0, 0);
                    while start.elapsed() < LOCK_BUDGET
                        && let Some((p, continued)) = peers.next()
                    {
                        match apply_peer(d, p, reset, continued).await {
                            Applied::Added => added += 1,
                            Applied::Updated => updated += usize::from(!continued),
                            Applied::Other => {}
                        }
                    }
                    Ok((added, updated))
                })
                .await
                .context("reconfiguring the device")??;
            self.added += added;
            self.updated += updated;
            if peers.peek().is_none() {
                return Ok(());
            }
        }
    }
}

/// The device part of a `set`. A value equal to the current one changes
/// nothing: in gotatun, setting the key, port or mark rebinds the UDP
/// socket, and `wg setconf` resends all three.
async fn apply_device<T: DeviceTransports>(
    d: &mut gotatun::device::configure::DeviceWrite<'_, T>,
    settings: DeviceSet,
) -> Result<()> {
    let DeviceSet {
        private_key,
        listen_port,
        fwmark,
        replace_peers: _,
    } = settings;
    let current_key = d.private_key().map(|k| Key(k.to_bytes()));
    if let Some(key) = private_key.filter(|k| Some(k) != current_key.as_ref()) {
        d.set_private_key(StaticSecret::from(key.0)).await;
    }
    if let Some(port) = listen_port.filter(|p| *p != d.listen_port()) {
        d.set_listen_port(port);
    }
    if let Some(mark) = fwmark.filter(|m| *m != d.fwmark().unwrap_or(0)) {
        d.set_fwmark(mark).context("fwmark")?;
    }
    Ok(())
}

/// `replace_peers=true`: removes every peer the request did not list, in
/// batches under short write locks. Not `clear_peers`: in gotatun that
/// rebinds the UDP socket, and listed peers keep their sessions.
async fn remove_unlisted<T: DeviceTransports>(
    device: &Device<T>,
    listed: &HashSet<[u8; 32]>,
) -> Result<usize> {
    // gotatun lists peers only as full `PeerStats`; the keys are all we keep.
    let stale: Vec<PublicKey> = device
        .read(async |d| {
            d.peers()
                .await
                .into_iter()
                .map(|ps| ps.peer.public_key)
                .filter(|k| !listed.contains(k.as_bytes()))
                .collect()
        })
        .await;
    let mut keys = stale.iter().peekable();
    while keys.peek().is_some() {
        device
            .write(async |d| {
                let start = Instant::now();
                let mut n = 0;
                while n < BATCH_PEERS
                    && start.elapsed() < LOCK_BUDGET
                    && let Some(key) = keys.next()
                {
                    d.remove_peer(key).await;
                    n += 1;
                }
            })
            .await
            .context("removing unlisted peers")?;
    }
    Ok(stale.len())
}

/// The errno wireguard-go would answer with for this failure.
fn errno_of(e: &anyhow::Error) -> i32 {
    if let Some(refused) = e.downcast_ref::<Refused>() {
        return refused.errno();
    }
    let in_use = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
            || c.to_string().contains("Address already in use")
    });
    if in_use { uapi::EADDRINUSE } else { uapi::EIO }
}

fn to_network(p: &IpPrefix) -> Option<IpNetwork> {
    IpNetwork::new(p.addr, p.len).ok()
}

fn to_prefix(n: &IpNetwork) -> IpPrefix {
    let (addr, len): (IpAddr, u8) = (n.ip(), n.prefix());
    IpPrefix { addr, len }
}

/// What [`apply_peer`] did.
enum Applied {
    Added,
    Updated,
    Other,
}

/// One peer part, the way the kernel applies it: an existing peer is
/// modified in place, so its session survives a new preshared key or
/// endpoint. `reset`: the request replaces all peers, so every attribute it
/// does not name returns to its default (no preshared key, no keepalive, no
/// allowed IPs). `continued`: more lines of the part before (never creates
/// the peer, never resets).
async fn apply_peer<T: DeviceTransports>(
    d: &mut gotatun::device::configure::DeviceWrite<'_, T>,
    p: PeerSet,
    reset: bool,
    continued: bool,
) -> Applied {
    let public_key = PublicKey::from(p.public_key.0);
    if p.remove {
        d.remove_peer(&public_key).await;
        return Applied::Other;
    }
    let reset = reset && !continued;
    let mut psk = p
        .preshared_key
        .as_ref()
        .map(|k| (!k.is_zero()).then_some(k.0));
    let mut keepalive = p
        .persistent_keepalive_interval
        .map(|k| (k != 0).then_some(k));
    if reset {
        psk = Some(psk.flatten());
        keepalive = Some(keepalive.flatten());
    }
    let allowed: Vec<IpNetwork> = p.allowed_ips.iter().filter_map(to_network).collect();
    let existed = d
        .modify_peer(&public_key, |m| {
            if let Some(psk) = psk {
                m.set_preshared_key(psk);
            }
            if let Some(e) = p.endpoint {
                m.set_endpoint(Some(e));
            }
            if let Some(k) = keepalive {
                m.set_keepalive(k);
            }
            if p.replace_allowed_ips || reset {
                m.clear_allowed_ips();
            }
            m.add_allowed_ips(allowed.clone());
        })
        .await;
    if existed {
        return Applied::Updated;
    }
    if p.update_only || continued {
        return Applied::Other;
    }
    let mut peer = Peer::new(public_key).with_allowed_ips(allowed);
    peer.endpoint = p.endpoint;
    peer.preshared_key = psk.flatten();
    peer.keepalive = keepalive.flatten();
    d.add_peer(peer);
    debug!(
        "uapi: added peer {}",
        mesh_proto::armor::to_base64(&p.public_key.0)
    );
    Applied::Added
}

/// A `set` that this data plane refuses although the protocol allows it.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// In the kernel and wireguard-go an all-zero private key removes the
    /// key. gotatun cannot unset one, and setting the zero key (clamped)
    /// would give the interface a private key everyone knows.
    #[error("an all-zero private key (remove the key) is not supported")]
    ZeroPrivateKey,
}

impl Refused {
    fn errno(&self) -> i32 {
        match self {
            Refused::ZeroPrivateKey => uapi::EINVAL,
        }
    }
}

async fn get<T: DeviceTransports>(device: &Device<T>) -> DeviceInfo {
    device
        .read(async |d| {
            let now = SystemTime::now();
            let peers = d
                .peers()
                .await
                .into_iter()
                .map(|ps| PeerInfo {
                    public_key: Key(*ps.peer.public_key.as_bytes()),
                    preshared_key: ps.peer.preshared_key.map(Key),
                    endpoint: ps.peer.endpoint,
                    persistent_keepalive_interval: ps.peer.keepalive.unwrap_or(0),
                    allowed_ips: ps.peer.allowed_ips.iter().map(to_prefix).collect(),
                    rx_bytes: ps.stats.rx_bytes as u64,
                    tx_bytes: ps.stats.tx_bytes as u64,
                    last_handshake: ps.stats.last_handshake.and_then(|ago| {
                        let t = now
                            .checked_sub(ago)?
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .ok()?;
                        Some((t.as_secs(), t.subsec_nanos()))
                    }),
                })
                .collect();
            DeviceInfo {
                private_key: d.private_key().map(|k| Key(k.to_bytes())),
                listen_port: d.listen_port(),
                fwmark: d.fwmark(),
                peers,
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_socket_is_0600_and_answers_where_it_belongs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgtest.sock");
        let listener = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600, "mode {mode:o}");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["wgtest.sock"], "the private folder is gone");
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop((client, server));
    }

    #[tokio::test]
    async fn a_request_that_panics_is_answered_eio_and_counted() {
        let counters = Counters::default();
        let response = guarded(async { panic!("a bug") }, &counters).await;
        assert_eq!(response, None::<()>, "the caller answers EIO");
        assert_eq!(
            counters
                .uapi_failed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let fine = guarded(async { uapi::format_errno(0) }, &counters).await;
        assert_eq!(fine, Some(uapi::format_errno(0)));
    }

    async fn lines(input: &[u8], discard: u64) -> Vec<Result<Option<(Line, String)>, String>> {
        let mut reader = tokio::io::BufReader::new(input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let got = read_line(&mut reader, &mut buf, Duration::from_secs(1), discard).await;
            let end = !matches!(got, Ok(Some(_)));
            out.push(
                got.map(|l| l.map(|(l, _)| (l, String::from_utf8_lossy(&buf).into_owned())))
                    .map_err(|e| e.to_string()),
            );
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn an_over_long_line_is_consumed_not_kept_and_the_next_line_is_whole() {
        let long = "k=".to_string() + &"x".repeat(3 * uapi::MAX_LINE_BYTES);
        let exact = "y".repeat(uapi::MAX_LINE_BYTES);
        let input = format!("set=1\n{long}\n{exact}\n\n");
        let got = lines(input.as_bytes(), MAX_DRAIN_BYTES).await;
        assert_eq!(got.len(), 5, "{:?}", got.len());
        assert_eq!(got[0], Ok(Some((Line::Text, "set=1".into()))));
        let Ok(Some((Line::TooLong, ref kept))) = got[1] else {
            panic!("too long")
        };
        assert!(kept.len() <= uapi::MAX_LINE_BYTES + 1, "{}", kept.len());
        assert_eq!(
            got[2],
            Ok(Some((Line::Text, exact))),
            "a line at the cap is read"
        );
        assert_eq!(got[3], Ok(Some((Line::Text, String::new()))));
        assert_eq!(got[4], Ok(None), "the end of the stream");
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_a_line_or_past_the_bound_is_an_error() {
        let got = lines(b"get=1\nhalf", MAX_DRAIN_BYTES).await;
        assert!(
            matches!(got[1], Err(ref e) if e.contains("closed")),
            "{got:?}"
        );
        let long = "x".repeat(10 * uapi::MAX_LINE_BYTES) + "\n";
        let got = lines(long.as_bytes(), 4 * uapi::MAX_LINE_BYTES as u64).await;
        assert!(
            matches!(got[0], Err(ref e) if e.contains("bytes")),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn drain_stops_at_the_empty_line_and_leaves_the_next_request() {
        let (client, server) = UnixStream::pair().unwrap();
        let (r, _w) = server.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            line: Vec::new(),
        };
        let mut client = client;
        let junk = "x".repeat(3 * uapi::MAX_LINE_BYTES);
        let input = format!("a=1\n{junk}\nb=2\n\nget=1\n\n");
        client.write_all(input.as_bytes()).await.unwrap();
        drain(&mut conn).await.unwrap();
        let next = read_line(&mut conn.reader, &mut conn.line, LINE_TIMEOUT, 0).await;
        assert_eq!(next.unwrap().map(|l| l.0), Some(Line::Text));
        assert_eq!(conn.line, b"get=1");
    }

    #[test]
    fn a_zero_private_key_is_refused_with_einval() {
        let e = anyhow::Error::from(Refused::ZeroPrivateKey).context("applying");
        assert_eq!(errno_of(&e), uapi::EINVAL);
    }
}
