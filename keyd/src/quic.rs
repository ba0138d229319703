//! keyd-to-keyd transport: QUIC (quinn), one bidirectional stream per hybrid
//! exchange, handshake messages framed by `mesh_proto::frame`.
//!
//! QUIC's TLS uses a throwaway self-signed certificate and the client accepts
//! any server certificate: QUIC here only carries bytes through networks
//! where UDP/QUIC passes. *Authentication* is the hybrid Noise exchange and
//! the pqmesh certificates inside it (mesh-proto's zero-trust checks); a
//! machine in the middle of QUIC learns nothing it could not see on the wire
//! and can forge nothing the exchange would accept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use mesh_proto::cookie::{self, CookieError, CookieJar};
use mesh_proto::exchange::{Established, Event, Exchange, ExchangeParams};
use mesh_proto::frame::{self, FrameDecoder};
use mesh_proto::identity::NoisePublicKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// HTTP/3's: on port 443 the keyds' QUIC (exchanges, and the edge ladder's
/// QUIC rung) looks like any HTTP/3 connection's handshake to an observer.
/// (keyd dials by address, so no server name is sent either.)
pub const ALPN: &[u8] = b"h3";
/// A dead peer is noticed within this (keep-alives every third of it).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);
/// A peer that does not complete the QUIC handshake in this time is
/// unreachable. Long enough for a retry and a lost Initial on a slow path;
/// short because a dial waiting here holds one of the few dials in flight.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// One deadline around a whole exchange, every read and write included: a
/// peer that stops granting flow-control credit cannot pin a task longer.
pub const EXCHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Flow-control windows: the largest message (msg2: an ML-KEM ciphertext and
/// a certificate) is about 2 KB, so a few KB per stream is plenty, and a
/// connection can never make us buffer more than this.
const STREAM_WINDOW: u32 = 16 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024;
const SEND_WINDOW: u64 = 64 * 1024;
/// A sealed msg1 is 1,600 bytes of Noise (X25519 and ML-KEM-1024 public
/// keys) and two MACs; anything much longer is refused unread.
const MAX_SEALED_MSG1: usize = 2048;
/// Datagrams buffered per connection, each way (about 350 full-size
/// WireGuard packets): a burst at line rate between two reads. An
/// unauthenticated connection can make us hold this until its exchange
/// deadline closes it: at most `max_connections` (256) x 512 KiB, from
/// hosts that passed the source filter and QUIC's address validation.
const DATAGRAM_BUFFER: usize = 512 << 10;
/// The largest UDP payload path MTU discovery tries: a 1500-byte IPv4 path.
/// (quinn's default stops at 1452, the IPv6 figure, which would cost every
/// full-size WireGuard packet a second datagram on IPv4 paths.)
const MTU_UPPER_BOUND: u16 = 1472;
/// A listening socket that could not be bound, with the remedy where the
/// cause is a known one: on an edge node's 443, keyd's unit (no capability
/// at all) or a web server holding the port.
pub fn cannot_listen(what: &str, addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (a port below 1024 needs CAP_NET_BIND_SERVICE: under systemd, install keyd's \
             drop-in /usr/share/pqmesh/keyd-privileged-port.conf, docs/install.md)"
        }
        std::io::ErrorKind::AddrInUse => {
            " (another program holds it; on 443 usually a web server, or one serving HTTP/3 \
             on UDP: give keyd another quic_listen)"
        }
        _ => "",
    };
    anyhow::Error::new(e).context(format!("cannot listen for {what} on {addr}{hint}"))
}

/// The TLS exporter label that binds an exchange to the QUIC or TLS
/// connection carrying it (mesh-proto's `channel_binding`).
const BINDING_LABEL: &[u8] = b"EXPORTER-pqmesh-exchange-binding";

/// The channel binding of a QUIC connection: both ends compute the same 32
/// bytes, and a machine in the middle terminating QUIC on both sides has two
/// connections with two different values.
pub fn binding(conn: &quinn::Connection) -> Result<Vec<u8>> {
    let mut out = vec![0u8; 32];
    conn.export_keying_material(&mut out, BINDING_LABEL, b"")
        .map_err(|_| anyhow!("QUIC connection has no exporter"))?;
    Ok(out)
}

/// The same for a TLS 1.3 connection (the edge ladder's TCP rung).
pub fn tls_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Vec<u8>> {
    let out = [0u8; 32];
    conn.export_keying_material(out, BINDING_LABEL, None)
        .map(|k| k.to_vec())
        .map_err(|e| anyhow!("TLS connection has no exporter: {e}"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC endpoint that both accepts and dials, bound to `listen`, driven
/// on `runtime` (the daemon's: the data-path thread, datapath_thread.rs).
pub fn endpoint(listen: SocketAddr, runtime: Arc<dyn quinn::Runtime>) -> Result<quinn::Endpoint> {
    let (server, client_tls) = tls_configs(ALPN)?;
    let mut transport = quinn::TransportConfig::default();
    // One exchange at a time per connection, small windows, no
    // unidirectional streams. Datagrams carry WireGuard packets on the edge
    // ladder's QUIC rung (edge/relay.rs); they are taken only from a
    // connection on which an exchange bound to it succeeded, and quinn
    // drops the oldest beyond the receive buffer, so an unauthenticated
    // host can make us hold at most that buffer per connection.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    transport
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?))
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER)
        .mtu_discovery_config(Some(mtu))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(SEND_WINDOW);
    let transport = Arc::new(transport);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
    server.transport_config(transport.clone());

    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);

    // No migration: a connection keeps the address that admission control
    // validated (with a retry) when it was accepted.
    server.migration(false);
    let socket = std::net::UdpSocket::bind(listen).map_err(|e| cannot_listen("QUIC", listen, e))?;
    // The edge ladder's QUIC rung carries the data plane's bursts on this
    // socket: a default-sized buffer drops them (sockbuf.rs).
    let granted = crate::sockbuf::grow(&socket);
    if !crate::sockbuf::is_full_size(granted) {
        tracing::warn!(
            "the QUIC socket's receive buffer is {} bytes, not 4 MiB: the edge \
             ladder's QUIC rung will lose packets under load; raise net.core.rmem_max and \
             net.core.wmem_max to 4194304 (docs/edge.md)",
            granted / 2
        );
    }
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .with_context(|| format!("cannot listen for QUIC on {listen}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Server and client TLS for keyd-to-keyd links (QUIC, and the edge
/// ladder's TLS over TCP): a throwaway self-signed server certificate, a
/// client that takes any (see the module comment), TLS 1.3, `alpn`.
pub fn tls_configs(alpn: &[u8]) -> Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let cert = rcgen::generate_simple_self_signed(vec!["pqmesh".to_string()])
        .context("cannot make the throwaway TLS certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    server.alpn_protocols = vec![alpn.to_vec()];
    let mut client = client_tls()?;
    client.alpn_protocols = vec![alpn.to_vec()];
    Ok((server, client))
}

/// The TLS side of a keyd client: TLS 1.3, ALPN [`ALPN`], any server
/// certificate (see the module comment). Public for bench/flood's attacker,
/// which must look exactly like a keyd to the port it floods.
pub fn client_tls() -> Result<rustls::ClientConfig> {
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(client)
}

/// Accepts any certificate; still checks that the TLS handshake was signed
/// by the key in the certificate presented (see the module comment).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whole exchange messages in and out: a QUIC stream ([`Stream`]) or the
/// exchange records of an edge TCP link (edge/tcp.rs).
pub trait MessageIo: Send {
    fn write(&mut self, msg: &[u8]) -> impl Future<Output = Result<()>> + Send;
    /// The next whole message (the caller bounds the wait).
    fn read(&mut self) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// After the last message: wait (briefly) until the peer has it.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// One side of a stream, with the frames that arrived but were not read yet.
struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl Stream {
    fn new((send, recv): (quinn::SendStream, quinn::RecvStream)) -> Self {
        Self {
            send,
            recv,
            decoder: FrameDecoder::default(),
            buf: vec![0u8; 8192],
        }
    }
}

impl MessageIo for Stream {
    async fn write(&mut self, msg: &[u8]) -> Result<()> {
        self.send
            .write_all(&frame::encode(msg)?)
            .await
            .context("sending a handshake message")
    }

    async fn finish(&mut self) {
        let _ = self.send.finish();
        let _ = self.send.stopped().await;
    }

    async fn read(&mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(f) = self.decoder.next_frame() {
                return Ok(f);
            }
            match self.recv.read(&mut self.buf).await {
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                Ok(None) => return Err(anyhow!("peer closed the stream mid-exchange")),
                Err(e) => return Err(anyhow!(e).context("reading a handshake message")),
            }
        }
    }
}

/// Runs one exchange to its end over a bidirectional stream.
async fn drive(mut ex: Exchange, mut stream: impl MessageIo) -> Result<Established> {
    loop {
        while let Some(msg) = ex.poll_transmit() {
            stream.write(&msg).await?;
        }
        match ex.poll_event() {
            Some(Event::Established(est)) => {
                // Let the last message (the responder's confirmation) reach the peer.
                stream.finish().await;
                return Ok(*est);
            }
            Some(Event::Failed(e)) => return Err(anyhow!(e)),
            None => {}
        }
        let deadline = ex
            .poll_timeout()
            .ok_or_else(|| anyhow!("exchange ended without an event"))?;
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, stream.read()).await {
            Err(_) => ex.handle_timeout(Instant::now()),
            Ok(msg) => ex.receive(&msg?, Instant::now()),
        }
    }
}

/// Runs an exchange as initiator on `conn`, within [`EXCHANGE_DEADLINE`].
/// msg1 goes out sealed with mac1 (keyed by the responder's Noise static
/// key, `responder`) and, once `jar` holds a cookie from it, mac2; a cookie
/// reply (the responder is under load) is taken into `jar` and msg1 is
/// sent again, sealed with the cookie.
pub async fn initiate(
    conn: &quinn::Connection,
    mut params: ExchangeParams,
    responder: &NoisePublicKey,
    jar: &mut CookieJar,
) -> Result<Established> {
    params.channel_binding = binding(conn)?;
    tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let stream = Stream::new(conn.open_bi().await.context("opening a QUIC stream")?);
        initiate_on(stream, params, responder, jar).await
    })
    .await
    .map_err(|_| anyhow!(mesh_proto::ExchangeError::Timeout))?
}

/// [`initiate`] over any message channel whose binding is in `params`
/// (the caller bounds the time).
pub async fn initiate_on(
    mut stream: impl MessageIo,
    params: ExchangeParams,
    responder: &NoisePublicKey,
    jar: &mut CookieJar,
) -> Result<Established> {
    {
        let mut ex = Exchange::initiate(params, Instant::now(), unix_now())?;
        let msg1 = ex
            .poll_transmit()
            .ok_or_else(|| anyhow!("the exchange produced no first message"))?;
        let mut sealed = jar.seal(responder, &msg1, Instant::now());
        stream.write(&sealed).await?;
        let mut answer = stream.read().await?;
        if answer.len() == cookie::COOKIE_REPLY_LEN {
            jar.accept_reply(responder, &sealed, &answer, Instant::now())?;
            sealed = jar.seal(responder, &msg1, Instant::now());
            stream.write(&sealed).await?;
            answer = stream.read().await?;
        }
        ex.receive(&answer, Instant::now());
        drive(ex, stream).await
    }
}

/// What the responder's gate says about a sealed msg1.
pub enum Gate {
    /// mac1 (and mac2 where required) are valid: this is msg1.
    Accept(Vec<u8>),
    /// Under load without a valid cookie: send this reply and wait for the
    /// msg1 sealed with it.
    Reply(Vec<u8>),
    Refuse(CookieError),
}

/// Answers the next exchange a peer opens on `conn`. `stream_deadline`
/// bounds the wait for the stream (a connection that has not completed an
/// exchange must not idle). From the stream's arrival on, the whole exchange
/// runs within [`EXCHANGE_DEADLINE`]. `gate` checks mac1/mac2 on the first
/// message before anything else; only then is `admit` called, which may
/// refuse (admission control) and otherwise gives the parameters (so the
/// exchange is checked against the roster current at that moment) and a
/// guard held until the exchange ends.
pub async fn respond<G>(
    conn: &quinn::Connection,
    stream_deadline: Option<std::time::Duration>,
    gate: impl Fn(&[u8]) -> Gate,
    admit: impl FnOnce() -> Result<(ExchangeParams, G)>,
) -> Result<Established> {
    let accept = conn.accept_bi();
    let stream = match stream_deadline {
        Some(d) => tokio::time::timeout(d, accept)
            .await
            .map_err(|_| anyhow!(mesh_proto::ExchangeError::Timeout))?,
        None => accept.await,
    }
    .context("waiting for the peer's stream")?;
    let binding = binding(conn)?;
    tokio::time::timeout(
        EXCHANGE_DEADLINE,
        respond_on(Stream::new(stream), binding, gate, admit),
    )
    .await
    .map_err(|_| anyhow!(mesh_proto::ExchangeError::Timeout))?
}

/// [`respond`] over any message channel with the given binding (the caller
/// bounds the time).
pub async fn respond_on<G>(
    mut stream: impl MessageIo,
    binding: Vec<u8>,
    gate: impl Fn(&[u8]) -> Gate,
    admit: impl FnOnce() -> Result<(ExchangeParams, G)>,
) -> Result<Established> {
    {
        let mut replies = 0;
        let msg1 = loop {
            let sealed = stream.read().await?;
            if sealed.len() > MAX_SEALED_MSG1 {
                return Err(anyhow!(CookieError::TooShort {
                    found: sealed.len()
                })
                .context("first message longer than any msg1"));
            }
            match gate(&sealed) {
                Gate::Accept(msg1) => break msg1,
                // One cookie per stream: a peer that cannot use it is done.
                Gate::Reply(reply) if replies == 0 => {
                    replies += 1;
                    stream.write(&reply).await?;
                }
                Gate::Reply(_) => return Err(anyhow!(CookieError::BadReply)),
                Gate::Refuse(e) => return Err(anyhow!(e)),
            }
        };
        let (mut params, _guard) = admit()?;
        params.channel_binding = binding;
        let mut ex = Exchange::respond(params, Instant::now(), unix_now())?;
        ex.receive(&msg1, Instant::now());
        drive(ex, stream).await
    }
}

/// A dialled keyd did not answer at all (not running yet, or unreachable):
/// no exchange began.
#[derive(Debug, thiserror::Error)]
#[error("no QUIC answer from {0} within {CONNECT_TIMEOUT:?}")]
pub struct NoAnswer(pub SocketAddr);

/// Opens a QUIC connection to a peer keyd (bounded by a timeout).
pub async fn connect(endpoint: &quinn::Endpoint, peer: SocketAddr) -> Result<quinn::Connection> {
    // An address as the server name: no SNI in the ClientHello.
    let connecting = endpoint
        .connect(peer, &peer.ip().to_string())
        .with_context(|| format!("cannot dial {peer}"))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!(NoAnswer(peer)))?
        .with_context(|| format!("QUIC handshake with {peer} failed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::cert::{CaCert, NodeCertRequest};
    use mesh_proto::exchange::{DEFAULT_TIMEOUT, LocalIdentity, PeerEpochs};
    use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
    use mesh_proto::roster::{Member, Roster};
    use mesh_proto::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};

    fn identity(ca: &CaCert, key: &CaSigningKey, name: &str, addr: &str) -> Arc<LocalIdentity> {
        let now = unix_now();
        let noise = NoisePrivateKey::generate().unwrap();
        let cert = ca
            .issue(
                key,
                NodeCertRequest {
                    name: name.into(),
                    addresses: vec![addr.parse().unwrap()],
                    groups: vec![],
                    attributes: Default::default(),
                    not_before: now - 60,
                    not_after: now + 3600,
                    wg_public: WgPrivateKey::generate().unwrap().public_key(),
                    noise_public: noise.public_key(),
                },
            )
            .unwrap();
        Arc::new(LocalIdentity {
            cert,
            noise_key: noise,
        })
    }

    fn params(ca: &CaCert, roster: &Arc<Roster>, me: &Arc<LocalIdentity>) -> ExchangeParams {
        ExchangeParams {
            identity: me.clone(),
            trust: Trust {
                ca: Arc::new(ca.clone()),
                roster: roster.clone(),
                max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
                local: me.node_id(),
            },
            timeout: DEFAULT_TIMEOUT,
            last_epoch: 0,
            peer_epochs: PeerEpochs::default(),
            expected_peer: None,
            channel_binding: Vec::new(),
        }
    }

    /// The responder's gate as keyd builds it: a cookie checker for `me`.
    fn gate(me: &LocalIdentity) -> impl Fn(&[u8], bool) -> Gate + Clone + use<> {
        let checker = Arc::new(std::sync::Mutex::new(cookie::CookieChecker::new(
            &me.noise_key.public_key(),
            [7; 32],
            Instant::now(),
        )));
        let source: SocketAddr = "127.0.0.1:9".parse().unwrap();
        move |sealed: &[u8], under_load: bool| {
            let mut c = checker.lock().unwrap();
            match c.check(
                sealed,
                source,
                under_load,
                Instant::now(),
                || [8; 32],
                [9; 24],
            ) {
                cookie::Verdict::Accept(msg1) => Gate::Accept(msg1.to_vec()),
                cookie::Verdict::CookieReply(r) => Gate::Reply(r),
                cookie::Verdict::Refuse(e) => Gate::Refuse(e),
            }
        }
    }

    fn network() -> (CaSigningKey, CaCert) {
        let key = CaSigningKey::generate().unwrap();
        let now = unix_now();
        let ca = CaCert::create(&key, "ca", "quic-test", now - 60, now + 7200).unwrap();
        (key, ca)
    }

    #[tokio::test]
    async fn two_keyds_agree_on_a_key_over_quic() {
        let (key, ca) = network();
        let (a, b) = (
            identity(&ca, &key, "a", "10.1.0.1/24"),
            identity(&ca, &key, "b", "10.1.0.2/24"),
        );
        let members = [&a, &b]
            .iter()
            .map(|i| Member {
                cert: i.cert.clone(),
                wg_endpoint: None,
                keyd_endpoint: None,
            })
            .collect();
        let roster = Arc::new(
            Roster::build(&ca, &key, 1, unix_now(), unix_now() + 3600, members, vec![]).unwrap(),
        );
        let ea = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let eb = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let b_addr = eb.local_addr().unwrap();
        let (pb, rb) = (params(&ca, &roster, &b), eb.clone());
        let b_gate = gate(&b);
        let responder = tokio::spawn(async move {
            let conn = rb.accept().await.unwrap().await.unwrap();
            let first = respond(
                &conn,
                None,
                |m: &[u8]| b_gate(m, false),
                || Ok((pb.clone(), ())),
            )
            .await;
            // The second exchange finds the responder under load: the
            // initiator must come back with the cookie it is given.
            let second = respond(&conn, None, |m: &[u8]| b_gate(m, true), || Ok((pb, ()))).await;
            (first, second)
        });
        let conn = connect(&ea, b_addr).await.unwrap();
        let mut pa = params(&ca, &roster, &a);
        pa.expected_peer = Some(b.node_id());
        let b_static = b.noise_key.public_key();
        let mut jar = CookieJar::default();
        let i1 = initiate(&conn, pa.clone(), &b_static, &mut jar)
            .await
            .unwrap();
        // A second exchange on the same connection (a rotation): fresh key.
        pa.last_epoch = i1.epoch;
        let i2 = initiate(&conn, pa, &b_static, &mut jar).await.unwrap();
        let (r1, r2) = responder.await.unwrap();
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert_eq!(i1.psk, r1.psk);
        assert_eq!(i2.psk, r2.psk);
        assert_ne!(i1.psk, i2.psk);
        assert_eq!((i1.epoch, i2.epoch), (1, 2));
        assert_eq!(i1.peer.name(), "b");
        assert_eq!(r1.peer.name(), "a");
    }

    #[tokio::test]
    async fn a_stranger_is_refused_over_quic() {
        let (key, ca) = network();
        let (okey, other) = network();
        let b = identity(&ca, &key, "b", "10.1.0.2/24");
        let stranger = identity(&other, &okey, "a", "10.1.0.1/24");
        let member = Member {
            cert: b.cert.clone(),
            wg_endpoint: None,
            keyd_endpoint: None,
        };
        let roster = Arc::new(
            Roster::build(
                &ca,
                &key,
                1,
                unix_now(),
                unix_now() + 3600,
                vec![member],
                vec![],
            )
            .unwrap(),
        );
        let eb = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let b_addr = eb.local_addr().unwrap();
        let pb = params(&ca, &roster, &b);
        let b_gate = gate(&b);
        let responder = tokio::spawn(async move {
            let conn = eb.accept().await.unwrap().await.unwrap();
            respond(&conn, None, |m: &[u8]| b_gate(m, false), || Ok((pb, ()))).await
        });
        let ea = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let conn = connect(&ea, b_addr).await.unwrap();
        // The stranger trusts our CA, so it gets as far as sending msg3.
        let mut ps = params(&ca, &roster, &stranger);
        ps.trust.local = stranger.node_id();
        let initiator = initiate(
            &conn,
            ps,
            &b.noise_key.public_key(),
            &mut CookieJar::default(),
        )
        .await;
        let refused = responder.await.unwrap().unwrap_err();
        assert!(format!("{refused:#}").contains("another CA"), "{refused:#}");
        assert!(
            initiator.is_err(),
            "no key without the responder's confirmation"
        );
    }

    /// Without the responder's Noise static key (a host without the roster)
    /// msg1 is refused on its mac1, before any public-key work.
    #[tokio::test]
    async fn a_msg1_without_the_right_mac1_is_refused_before_any_work() {
        let (key, ca) = network();
        let (a, b) = (
            identity(&ca, &key, "a", "10.1.0.1/24"),
            identity(&ca, &key, "b", "10.1.0.2/24"),
        );
        let members = [&a, &b]
            .iter()
            .map(|i| Member {
                cert: i.cert.clone(),
                wg_endpoint: None,
                keyd_endpoint: None,
            })
            .collect();
        let roster = Arc::new(
            Roster::build(&ca, &key, 1, unix_now(), unix_now() + 3600, members, vec![]).unwrap(),
        );
        let eb = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let b_addr = eb.local_addr().unwrap();
        let pb = params(&ca, &roster, &b);
        let b_gate = gate(&b);
        let responder = tokio::spawn(async move {
            let conn = eb.accept().await.unwrap().await.unwrap();
            respond(&conn, None, |m: &[u8]| b_gate(m, false), || Ok((pb, ()))).await
        });
        let ea = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let conn = connect(&ea, b_addr).await.unwrap();
        let wrong = NoisePrivateKey::generate().unwrap().public_key();
        let initiator = initiate(
            &conn,
            params(&ca, &roster, &a),
            &wrong,
            &mut CookieJar::default(),
        )
        .await;
        let refused = responder.await.unwrap().unwrap_err();
        assert_eq!(
            refused.downcast_ref::<CookieError>(),
            Some(&CookieError::BadMac1),
            "{refused:#}"
        );
        assert!(initiator.is_err());
    }

    /// A connection that opens no stream cannot hold its slot: with a first
    /// stream deadline, the responder gives up on it.
    #[tokio::test]
    async fn a_connection_without_a_stream_is_dropped_at_the_deadline() {
        let (key, ca) = network();
        let b = identity(&ca, &key, "b", "10.1.0.2/24");
        let member = Member {
            cert: b.cert.clone(),
            wg_endpoint: None,
            keyd_endpoint: None,
        };
        let roster = Arc::new(
            Roster::build(
                &ca,
                &key,
                1,
                unix_now(),
                unix_now() + 3600,
                vec![member],
                vec![],
            )
            .unwrap(),
        );
        let eb = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let b_addr = eb.local_addr().unwrap();
        let pb = params(&ca, &roster, &b);
        let b_gate = gate(&b);
        let responder = tokio::spawn(async move {
            let conn = eb.accept().await.unwrap().await.unwrap();
            let deadline = Some(std::time::Duration::from_millis(300));
            respond(
                &conn,
                deadline,
                |m: &[u8]| b_gate(m, false),
                || Ok((pb, ())),
            )
            .await
        });
        let ea = endpoint(
            "127.0.0.1:0".parse().unwrap(),
            quinn::default_runtime().unwrap(),
        )
        .unwrap();
        let _idle = connect(&ea, b_addr).await.unwrap();
        let e = responder.await.unwrap().unwrap_err();
        assert_eq!(
            e.downcast_ref::<mesh_proto::ExchangeError>(),
            Some(&mesh_proto::ExchangeError::Timeout),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn a_port_another_program_holds_is_named_with_the_remedy() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let e = endpoint(addr, quinn::default_runtime().unwrap()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.starts_with(&format!("cannot listen for QUIC on {addr}")),
            "{text}"
        );
        assert!(text.contains("another program holds it"), "{text}");
    }

    #[test]
    fn a_privileged_port_names_the_drop_in() {
        // Root binds any port here, so the kernel's answer to an
        // unprivileged keyd is made up.
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        let text = format!(
            "{:#}",
            cannot_listen("TCP", "0.0.0.0:443".parse().unwrap(), e)
        );
        assert!(
            text.starts_with("cannot listen for TCP on 0.0.0.0:443"),
            "{text}"
        );
        assert!(
            text.contains("/usr/share/pqmesh/keyd-privileged-port.conf"),
            "{text}"
        );
        // Denied on a port that needs no privilege: not the capability.
        let other = std::io::Error::from_raw_os_error(libc::EACCES);
        let text = format!(
            "{:#}",
            cannot_listen("TCP", "0.0.0.0:51821".parse().unwrap(), other)
        );
        assert!(!text.contains("CAP_NET_BIND_SERVICE"), "{text}");
        let other = std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let text = format!(
            "{:#}",
            cannot_listen("TCP", "192.0.2.1:443".parse().unwrap(), other)
        );
        assert!(
            !text.contains("CAP_NET_BIND_SERVICE") && !text.contains("another program"),
            "{text}"
        );
    }
}
