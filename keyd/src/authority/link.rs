//! The authority channel on a QUIC stream: the three handshake messages and
//! then sealed application messages, each Noise message framed by
//! `mesh_proto::frame`. Used by both sides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use mesh_proto::channel::Channel;
use mesh_proto::frame::{self, FrameDecoder};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use super::wire::ALPN;

/// Keep-alives every third of this; a silent authority or node is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// The authority reads only hellos: a small window bounds what a client can
/// make it buffer. Nodes read snapshots: a larger one makes them fast.
const SERVER_RECEIVE_WINDOW: u32 = 16 * 1024;
const CLIENT_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Data the authority buffers per connection for a slow reader; past it,
/// writes wait (and that subscriber lags, then gets a snapshot).
const SERVER_SEND_WINDOW: u64 = 256 * 1024;

fn transport(receive: u32, send: u64) -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?))
        .keep_alive_interval(Some(IDLE_TIMEOUT / 3))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .stream_receive_window(receive.into())
        .receive_window(receive.into())
        .send_window(send);
    Ok(Arc::new(t))
}

/// The authority's QUIC endpoint (TLS only carries bytes; see crate::quic).
pub fn server_endpoint(listen: SocketAddr) -> Result<quinn::Endpoint> {
    let cert = rcgen::generate_simple_self_signed(vec!["pqmesh".to_string()])
        .context("cannot make the throwaway QUIC certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    server.transport_config(transport(SERVER_RECEIVE_WINDOW, SERVER_SEND_WINDOW)?);
    server.migration(false);
    quinn::Endpoint::server(server, listen)
        .with_context(|| format!("cannot listen for QUIC on {listen}"))
}

/// A node's client endpoint for talking to the authority.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint> {
    let mut tls = crate::quic::client_tls()?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    client.transport_config(transport(CLIENT_RECEIVE_WINDOW, 64 * 1024)?);
    let mut endpoint = quinn::Endpoint::client(bind)
        .with_context(|| format!("cannot bind a QUIC client socket on {bind}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Frames on one bidirectional stream.
pub struct Framed {
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl Framed {
    pub fn new((send, recv): (quinn::SendStream, quinn::RecvStream)) -> Self {
        Self {
            send,
            recv,
            decoder: FrameDecoder::default(),
            buf: vec![0u8; 16 * 1024],
        }
    }

    pub async fn write(&mut self, msg: &[u8]) -> Result<()> {
        self.send
            .write_all(&frame::encode(msg)?)
            .await
            .context("sending to the peer")
    }

    /// The next whole frame; `Ok(None)` when the peer finished the stream.
    pub async fn read(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(f) = self.decoder.next_frame() {
                return Ok(Some(f));
            }
            match self.recv.read(&mut self.buf).await {
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                Ok(None) => return Ok(None),
                Err(e) => return Err(anyhow!(e).context("reading from the peer")),
            }
        }
    }

    pub async fn read_required(&mut self) -> Result<Vec<u8>> {
        self.read()
            .await?
            .ok_or_else(|| anyhow!("the peer closed the stream"))
    }
}

/// An established channel on a stream.
pub struct Link {
    pub stream: Framed,
    pub channel: Channel,
}

impl Link {
    pub async fn send(&mut self, message: &[u8]) -> Result<()> {
        for chunk in self.channel.seal(message)? {
            self.stream.write(&chunk).await?;
        }
        Ok(())
    }

    /// The next whole application message; `Ok(None)` at a clean end.
    pub async fn receive(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        loop {
            let Some(noise) = self.stream.read().await? else {
                return Ok(None);
            };
            if let Some(msg) = self.channel.open(&noise)? {
                return Ok(Some(msg));
            }
        }
    }
}
