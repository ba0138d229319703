//! A node's side of the authority: `keyd join` (enroll once) and the
//! subscription `keyd run` keeps (every roster change, verified and in
//! order).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::channel::ClientHandshake;
use mesh_proto::cookie::{self, CookieJar};
use mesh_proto::delta::RosterDelta;
use mesh_proto::identity::{NodeId, NoisePrivateKey, NoisePublicKey, WgPublicKey};
use mesh_proto::roster::Roster;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::link::{self, Framed, Link};
use super::token::JoinToken;
use super::wire::{
    self, Endpoints, Hello, JoinRequest, MAX_REPLY, Refusal, Reply, SubscribeRequest,
};
use crate::ratelimit::SharedLogLimiter;
use crate::text;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// A subscription silent for this long (keepalives come every 20 s) is dead.
const SILENCE: Duration = Duration::from_secs(45);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Clock skew tolerated when checking what enrollment returns (keyd run's
/// default `max_clock_skew`).
const JOIN_CLOCK_SKEW: u64 = 300;

/// The authority said no; `keyd join` exits with its reason.
#[derive(Debug, thiserror::Error)]
#[error("the authority refused: {0}")]
pub struct Refused(pub Refusal);

/// What enrollment gives a node.
#[derive(Debug)]
pub struct Enrollment {
    pub ca: CaCert,
    pub cert: NodeCert,
    pub roster: Roster,
}

/// Where the authority is and who it is.
#[derive(Clone, Debug)]
pub struct AuthorityAddr {
    pub network_id: String,
    pub endpoints: Vec<SocketAddr>,
    pub key: NoisePublicKey,
}

/// Opens the channel to the first endpoint that answers and says `hello`.
async fn open(
    quic: &quinn::Endpoint,
    to: &AuthorityAddr,
    local: &NoisePrivateKey,
    hello: &Hello,
) -> Result<Link> {
    let mut last = anyhow!("the authority has no endpoints");
    for &addr in &to.endpoints {
        let attempt = async {
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, quic.connect(addr, "pqmesh")?)
                .await
                .map_err(|_| anyhow!("no QUIC answer from {addr}"))??;
            tokio::time::timeout(HANDSHAKE_DEADLINE, async {
                let mut stream = Framed::new(conn.open_bi().await?);
                let (hs, msg1) = ClientHandshake::start(&to.network_id, local, &to.key)?;
                // mac1 keyed by the authority's key; a cookie when it asks.
                let mut jar = CookieJar::default();
                let now = std::time::Instant::now();
                let mut sealed = jar.seal(&to.key, &msg1, now);
                stream.write(&sealed).await?;
                let no_answer = || {
                    format!("{addr} did not answer the channel handshake (another authority key or network?)")
                };
                let mut msg2 = stream.read_required().await.with_context(no_answer)?;
                if msg2.len() == cookie::COOKIE_REPLY_LEN {
                    jar.accept_reply(&to.key, &sealed, &msg2, now)?;
                    sealed = jar.seal(&to.key, &msg1, now);
                    stream.write(&sealed).await?;
                    msg2 = stream.read_required().await.with_context(no_answer)?;
                }
                // A join's hello holds the token's secret.
                let hello = zeroize::Zeroizing::new(wire::encode(hello));
                let (mut channel, msg3) = hs.finish(&msg2, &hello)?;
                channel.set_max_message(MAX_REPLY);
                stream.write(&msg3).await?;
                anyhow::Ok(Link { stream, channel })
            })
            .await
            .map_err(|_| anyhow!("the channel handshake with {addr} did not finish in time"))?
        };
        match attempt.await {
            Ok(link) => return Ok(link),
            Err(e) => last = e.context(format!("authority {addr}")),
        }
    }
    Err(last)
}

async fn next_reply(link: &mut Link, wait: Duration) -> Result<Reply> {
    let msg = tokio::time::timeout(wait, link.receive())
        .await
        .map_err(|_| anyhow!("the authority went silent"))??
        .ok_or_else(|| anyhow!("the authority closed the connection"))?;
    Ok(wire::decode(&msg)?)
}

/// Enrolls with `token`. The keys were made on this machine; only the
/// public halves leave it (the Noise key is proven in the channel).
pub async fn join(
    token: &JoinToken,
    name: &str,
    wg_public: WgPublicKey,
    noise: &NoisePrivateKey,
    endpoints: Endpoints,
) -> Result<Enrollment> {
    let quic = link::client_endpoint(unspecified_like(token.endpoints[0]))?;
    let to = AuthorityAddr {
        network_id: token.network_id.clone(),
        endpoints: token.endpoints.clone(),
        key: token.authority_key,
    };
    let hello = Hello::Join(JoinRequest {
        token_id: token.id,
        token_secret: token.secret.clone(),
        name: name.to_string(),
        wg_public,
        endpoints,
    });
    let mut link = open(&quic, &to, noise, &hello).await?;
    let reply = next_reply(&mut link, HANDSHAKE_DEADLINE).await?;
    quic.close(0u32.into(), b"done");
    let (ca, cert, roster) = match reply {
        Reply::Enrolled { ca, cert, roster } => (ca, cert, roster),
        Reply::Refused(r) => return Err(Refused(r).into()),
        other => bail!("unexpected answer to a join: {}", kind(&other)),
    };
    // Trust nothing the channel carried beyond what the token pins.
    let ca = CaCert::from_bytes(&ca).context("the CA certificate sent")?;
    if ca.fingerprint() != token.ca_fingerprint {
        bail!(
            "the authority sent CA {}, but the token names CA {}",
            ca.fingerprint(),
            token.ca_fingerprint
        );
    }
    let roster = Roster::from_bytes(&roster, &ca).context("the roster sent")?;
    roster
        .check_signer(None, crate::time::unix_now(), JOIN_CLOCK_SKEW)
        .context("the roster sent")?;
    let cert = NodeCert::from_bytes(&cert).context("the certificate sent")?;
    let b = cert.body();
    if b.wg_public != wg_public || b.noise_public != noise.public_key() {
        bail!("the certificate sent is not for this machine's keys");
    }
    if !roster.issued(&ca, &cert) || roster.member(&b.node_id).map(|m| &m.cert) != Some(&cert) {
        bail!("the roster sent does not list the certificate sent");
    }
    Ok(Enrollment { ca, cert, roster })
}

/// The unspecified address of `addr`'s family, port 0.
fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap_or(addr),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap_or(addr),
    }
}

fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Enrolled { .. } => "enrolled",
        Reply::Refused(_) => "refused",
        Reply::Snapshot(_) => "snapshot",
        Reply::Delta(_) => "delta",
        Reply::Keepalive => "keepalive",
    }
}

/// The subscription as `keyd status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub subscribed: bool,
    pub updates_by_delta: u64,
    pub updates_by_snapshot: u64,
    /// Subscriptions that failed or ended (each followed by a reconnect).
    pub failures: u64,
    pub last_error: Option<String>,
    /// Unix seconds of the last roster update received.
    pub last_update_at: Option<u64>,
}

/// Shared between the subscription task and the status writer.
pub type SharedLinkStatus = Arc<std::sync::Mutex<LinkStatus>>;

fn update(status: &SharedLinkStatus, f: impl FnOnce(&mut LinkStatus)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// A subscription ended (or never came up) with `error`: the link is down
/// until the next one is up, and the error is peer-influenced text.
fn record_failure(s: &mut LinkStatus, error: &anyhow::Error) {
    s.subscribed = false;
    s.failures += 1;
    s.last_error = Some(text::error(error));
}

/// What the subscription needs from the daemon.
pub struct Follow {
    pub to: AuthorityAddr,
    pub ca: Arc<CaCert>,
    pub noise: NoisePrivateKey,
    pub me: NodeId,
    pub report: Endpoints,
    /// The roster the node holds now.
    pub held: Arc<Roster>,
    pub log: SharedLogLimiter,
    pub status: SharedLinkStatus,
    pub max_clock_skew: u64,
}

/// Keeps a subscription, reconnecting with backoff; sends every verified,
/// newer roster to `out`. Ends when `out` is closed.
pub async fn follow(mut f: Follow, out: mpsc::Sender<Arc<Roster>>) {
    let quic = match link::client_endpoint(unspecified_like(f.to.endpoints[0])) {
        Ok(q) => q,
        Err(e) => {
            warn!("authority subscription disabled: {e:#}");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    let mut fresh_start = false;
    loop {
        let started = tokio::time::Instant::now();
        let result = subscription(&quic, &mut f, &out, fresh_start).await;
        if out.is_closed() {
            return;
        }
        match &result {
            Err(e)
                if e.downcast_ref::<mesh_proto::RosterError>()
                    .is_some_and(|r| {
                        matches!(
                            r,
                            mesh_proto::RosterError::DeltaGap { .. }
                                | mesh_proto::RosterError::DeltaBase { .. }
                        )
                    }) =>
            {
                // Out of step: ask for the whole roster next time.
                fresh_start = true;
            }
            _ => fresh_start = false,
        }
        if let Err(e) = result {
            update(&f.status, |s| record_failure(s, &e));
            let msg = text::error(&e);
            f.log
                .warn("authority", || format!("authority subscription: {msg}"));
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF_MIN;
        }
        // Jitter spreads a fleet's reconnections after an authority restart.
        let jitter = Duration::from_millis(u64::from(rand_u16()) % 1000);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn rand_u16() -> u16 {
    mesh_proto::identity::random_bytes::<2>()
        .map(|b| u16::from_le_bytes(*b))
        .unwrap_or(0)
}

async fn subscription(
    quic: &quinn::Endpoint,
    f: &mut Follow,
    out: &mpsc::Sender<Arc<Roster>>,
    fresh_start: bool,
) -> Result<()> {
    let hello = Hello::Subscribe(SubscribeRequest {
        serial: if fresh_start { 0 } else { f.held.serial() },
        roster: (!fresh_start).then(|| f.held.fingerprint()),
        endpoints: f.report,
    });
    let mut link = open(quic, &f.to, &f.noise, &hello).await?;
    info!(
        "subscribed to the authority at roster serial {}",
        f.held.serial()
    );
    update(&f.status, |s| s.subscribed = true);
    loop {
        let (offered, how) = match next_reply(&mut link, SILENCE).await? {
            Reply::Keepalive => continue,
            Reply::Refused(r) => return Err(Refused(r).into()),
            Reply::Snapshot(bytes) => (Roster::from_bytes(&bytes, &f.ca)?, "snapshot"),
            Reply::Delta(bytes) => (
                f.held.apply(&RosterDelta::from_bytes(&bytes)?, &f.ca)?,
                "delta",
            ),
            other => bail!("unexpected message on a subscription: {}", kind(&other)),
        };
        // Rollback and signer rules, for deltas too: a delta's result is a
        // roster like any other.
        if !Roster::check_update(
            Some(&f.held),
            &offered,
            crate::time::unix_now(),
            f.max_clock_skew,
        )? {
            continue;
        }
        info!(
            "authority: roster serial {} -> {} by {how}",
            f.held.serial(),
            offered.serial()
        );
        update(&f.status, |s| {
            if how == "delta" {
                s.updates_by_delta += 1;
            } else {
                s.updates_by_snapshot += 1;
            }
            s.last_update_at = Some(crate::time::unix_now());
        });
        let offered = Arc::new(offered);
        f.held = offered.clone();
        if out.send(offered.clone()).await.is_err() {
            return Ok(());
        }
        if offered.revoked_nodes().iter().any(|r| r.node_id == f.me) {
            bail!("this node has been revoked");
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
