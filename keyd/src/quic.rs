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
use mesh_proto::exchange::{Established, Event, Exchange, ExchangeParams};
use mesh_proto::frame::{self, FrameDecoder};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub const ALPN: &[u8] = b"pqmesh/1";
/// A dead peer is noticed within this (keep-alives every third of it).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);
/// A peer that does not complete the QUIC handshake in this time is unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC endpoint that both accepts and dials, bound to `listen`.
pub fn endpoint(listen: SocketAddr) -> Result<quinn::Endpoint> {
    let cert = rcgen::generate_simple_self_signed(vec!["pqmesh".to_string()])
        .context("cannot make the throwaway QUIC certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?))
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    let transport = Arc::new(transport);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
    server.transport_config(transport.clone());

    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
    client.transport_config(transport);

    let mut endpoint = quinn::Endpoint::server(server, listen)
        .with_context(|| format!("cannot listen for QUIC on {listen}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
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

/// Runs one exchange to its end over a bidirectional stream.
async fn drive(
    mut ex: Exchange,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<Established> {
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 8192];
    loop {
        while let Some(msg) = ex.poll_transmit() {
            send.write_all(&frame::encode(&msg)?)
                .await
                .context("sending a handshake message")?;
        }
        match ex.poll_event() {
            Some(Event::Established(est)) => {
                // Let the last message (the responder's confirmation) reach the peer.
                let _ = send.finish();
                let _ = send.stopped().await;
                return Ok(*est);
            }
            Some(Event::Failed(e)) => return Err(anyhow!(e)),
            None => {}
        }
        let deadline = ex
            .poll_timeout()
            .ok_or_else(|| anyhow!("exchange ended without an event"))?;
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, recv.read(&mut buf)).await {
            Err(_) => ex.handle_timeout(Instant::now()),
            Ok(Ok(Some(n))) => {
                decoder.push(&buf[..n]);
                while let Some(msg) = decoder.next_frame() {
                    ex.receive(&msg, Instant::now());
                }
            }
            Ok(Ok(None)) => return Err(anyhow!("peer closed the stream mid-exchange")),
            Ok(Err(e)) => return Err(anyhow!(e).context("reading a handshake message")),
        }
    }
}

/// Dials `peer` (or reuses `conn`) and runs an exchange as initiator.
pub async fn initiate(conn: &quinn::Connection, params: ExchangeParams) -> Result<Established> {
    let ex = Exchange::initiate(params, Instant::now(), unix_now())?;
    let (send, recv) = conn.open_bi().await.context("opening a QUIC stream")?;
    drive(ex, send, recv).await
}

/// Answers the next exchange a peer opens on `conn`. `params` is called only
/// once the peer's stream has arrived, so the exchange is checked against
/// the roster current at that moment, not when we started waiting.
pub async fn respond(
    conn: &quinn::Connection,
    params: impl FnOnce() -> ExchangeParams,
) -> Result<Established> {
    let (send, recv) = conn
        .accept_bi()
        .await
        .context("waiting for the peer's stream")?;
    let ex = Exchange::respond(params(), Instant::now(), unix_now())?;
    drive(ex, send, recv).await
}

/// Opens a QUIC connection to a peer keyd (bounded by a timeout).
pub async fn connect(endpoint: &quinn::Endpoint, peer: SocketAddr) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect(peer, "pqmesh")
        .with_context(|| format!("cannot dial {peer}"))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no QUIC answer from {peer} within {CONNECT_TIMEOUT:?}"))?
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
        let ea = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let eb = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let b_addr = eb.local_addr().unwrap();
        let (pb, rb) = (params(&ca, &roster, &b), eb.clone());
        let responder = tokio::spawn(async move {
            let conn = rb.accept().await.unwrap().await.unwrap();
            let first = respond(&conn, || pb.clone()).await;
            let second = respond(&conn, || pb).await;
            (first, second)
        });
        let conn = connect(&ea, b_addr).await.unwrap();
        let mut pa = params(&ca, &roster, &a);
        pa.expected_peer = Some(b.node_id());
        let i1 = initiate(&conn, pa.clone()).await.unwrap();
        // A second exchange on the same connection (a rotation): fresh key.
        pa.last_epoch = i1.epoch;
        let i2 = initiate(&conn, pa).await.unwrap();
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
        let eb = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let b_addr = eb.local_addr().unwrap();
        let pb = params(&ca, &roster, &b);
        let responder = tokio::spawn(async move {
            let conn = eb.accept().await.unwrap().await.unwrap();
            respond(&conn, || pb).await
        });
        let ea = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = connect(&ea, b_addr).await.unwrap();
        // The stranger trusts our CA, so it gets as far as sending msg3.
        let mut ps = params(&ca, &roster, &stranger);
        ps.trust.local = stranger.node_id();
        let initiator = initiate(&conn, ps).await;
        let refused = responder.await.unwrap().unwrap_err();
        assert!(format!("{refused:#}").contains("another CA"), "{refused:#}");
        assert!(
            initiator.is_err(),
            "no key without the responder's confirmation"
        );
    }
}
