//! `keyd run`: turns the signed roster into keys in the local data plane.
//!
//! * Every pair runs one exchange at a time: the member with the lower node
//!   id initiates, the other only answers (no glare, no double exchange).
//! * Initiator, one task per peer: connect (QUIC, reused), exchange, install
//!   peer + PSK, sleep one rotation interval with ±10 % jitter. On failure,
//!   retry with backoff; once the key is older than interval + hard lifetime,
//!   remove the peer from the data plane (fail closed).
//! * Responder: accepts exchanges, each checked against the current roster.
//! * The roster file is watched; a newer serial takes effect at once (new
//!   members dialled, removed or revoked members cut), an older one is
//!   refused (rollback), and the highest serial seen persists in state_dir.
//! * Starting never removes peers: tunnels established before a restart keep
//!   running until their keys are replaced or reach the hard lifetime.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::exchange::{DEFAULT_TIMEOUT, Established, ExchangeParams, LocalIdentity};
use mesh_proto::identity::{NodeId, NoisePrivateKey, WgPrivateKey, WgPublicKey};
use mesh_proto::roster::{Member, Roster};
use mesh_proto::trust::Trust;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use crate::config::Config;
use crate::dataplane::{DataPlane, PeerConfig};
use crate::{files, quic};

/// One peer as `keyd status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: String,
    /// `connecting`, `up`, `retrying`, `expired` (cut off), `removed`.
    pub state: String,
    pub role: String,
    pub epoch: u64,
    /// Unix seconds of the last successful exchange.
    pub last_exchange: Option<u64>,
    pub key_age_secs: Option<u64>,
    pub last_error: Option<String>,
    pub exchanges_ok: u64,
    pub exchanges_failed: u64,
}

/// What `keyd status` reads (written atomically to state_dir/status.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub node_id: String,
    pub interface: String,
    pub roster_serial: u64,
    pub updated_at: u64,
    pub peers: BTreeMap<String, PeerStatus>,
    /// Refusals by reason label (unknown_ca, expired, revoked, ...).
    pub refusals: BTreeMap<String, u64>,
    pub roster_rollbacks_refused: u64,
    pub peers_cut_at_hard_lifetime: u64,
}

struct PeerTrack {
    status: PeerStatus,
    installed_at: Option<Instant>,
    wg_key: Option<WgPublicKey>,
}

struct Shared {
    config: Config,
    identity: Arc<LocalIdentity>,
    ca: Arc<CaCert>,
    roster: watch::Sender<Arc<Roster>>,
    dataplane: DataPlane,
    endpoint: quinn::Endpoint,
    peers: Mutex<BTreeMap<NodeId, PeerTrack>>,
    refusals: Mutex<BTreeMap<String, u64>>,
    rollbacks: AtomicU64,
    cut_at_hard_lifetime: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// ±10 % around `d`, so a large mesh does not rotate in lockstep.
fn jittered(d: Duration) -> Duration {
    let r =
        mesh_proto::identity::random_bytes::<2>().map_or(u16::MAX / 2, |b| u16::from_le_bytes(*b));
    d.mul_f64(0.9 + 0.2 * (f64::from(r) / f64::from(u16::MAX)))
}

fn serial_path(c: &Config) -> PathBuf {
    c.state_dir.join("roster.serial")
}

fn load_roster(c: &Config, ca: &CaCert) -> Result<Roster> {
    Roster::from_text(&files::read_text(&c.roster)?, ca)
        .with_context(|| format!("roster {}", c.roster.display()))
}

/// Refuses a roster older than the highest serial this node has used.
fn check_persisted_serial(c: &Config, roster: &Roster) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(serial_path(c))
        && let Ok(highest) = text.trim().parse::<u64>()
        && roster.serial() < highest
    {
        bail!(
            "roster serial {} is older than serial {highest} already used here (rollback refused)",
            roster.serial()
        );
    }
    Ok(())
}

fn persist_serial(c: &Config, serial: u64) {
    if let Err(e) = files::write_document(&serial_path(c), &format!("{serial}\n")) {
        warn!("cannot persist roster serial: {e:#}");
    }
}

/// Loads everything, configures the data plane, and runs until stopped.
pub async fn run(config: Config) -> Result<()> {
    let ca = Arc::new(crate::cli::load_ca_cert(&config.ca_cert)?);
    let cert = NodeCert::from_text(&files::read_text(&config.cert)?)
        .with_context(|| format!("`cert` {}", config.cert.display()))?;
    if !ca.signed(&cert) {
        bail!(
            "`cert` {} is not signed by `ca_cert` {}",
            config.cert.display(),
            config.ca_cert.display()
        );
    }
    let wg_key = WgPrivateKey::from_text(&files::read_secret(&config.wg_key)?)
        .with_context(|| format!("`wg_key` {}", config.wg_key.display()))?;
    let noise_key = NoisePrivateKey::from_text(&files::read_secret(&config.noise_key)?)
        .with_context(|| format!("`noise_key` {}", config.noise_key.display()))?;
    if wg_key.public_key() != cert.body().wg_public
        || noise_key.public_key() != cert.body().noise_public
    {
        bail!("the keys in `wg_key`/`noise_key` are not the ones `cert` certifies");
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("`state_dir` {}", config.state_dir.display()))?;
    let roster = load_roster(&config, &ca)?;
    check_persisted_serial(&config, &roster)?;
    persist_serial(&config, roster.serial());

    let dataplane = DataPlane::for_interface(&config.interface);
    dataplane.configure_interface(&wg_key, config.wg_listen_port)?;
    let endpoint = quic::endpoint(config.quic_listen)?;
    let identity = Arc::new(LocalIdentity { cert, noise_key });
    info!(
        "keyd up: node {} ({}), interface {}, QUIC {}, roster serial {}",
        identity.cert.body().name,
        identity.node_id(),
        config.interface,
        config.quic_listen,
        roster.serial()
    );
    let (roster_tx, _) = watch::channel(Arc::new(roster));
    let shared = Arc::new(Shared {
        config,
        identity,
        ca,
        roster: roster_tx,
        dataplane,
        endpoint,
        peers: Mutex::new(BTreeMap::new()),
        refusals: Mutex::new(BTreeMap::new()),
        rollbacks: AtomicU64::new(0),
        cut_at_hard_lifetime: AtomicU64::new(0),
    });
    tokio::spawn(accept_loop(shared.clone()));
    tokio::spawn(watch_roster(shared.clone()));
    tokio::spawn(write_status_loop(shared.clone()));
    tokio::spawn(expire_loop(shared.clone()));
    supervise(shared).await;
    Ok(())
}

fn params(
    s: &Shared,
    roster: Arc<Roster>,
    expected: Option<NodeId>,
    last_epoch: u64,
) -> ExchangeParams {
    ExchangeParams {
        identity: s.identity.clone(),
        trust: Trust {
            ca: s.ca.clone(),
            roster,
            max_clock_skew: s.config.max_clock_skew.as_secs(),
            local: s.identity.node_id(),
        },
        timeout: DEFAULT_TIMEOUT,
        last_epoch,
        expected_peer: expected,
    }
}

/// Starts an initiator task for every member this node must dial, as the
/// roster changes; cuts members that leave it.
async fn supervise(s: Arc<Shared>) {
    let mut rx = s.roster.subscribe();
    let mut running: HashSet<NodeId> = HashSet::new();
    loop {
        let roster = rx.borrow_and_update().clone();
        let me = s.identity.node_id();
        let current: HashSet<NodeId> = roster
            .members()
            .iter()
            .filter(|m| !roster.is_revoked(&m.cert.fingerprint()))
            .map(|m| m.cert.body().node_id)
            .filter(|id| *id != me)
            .collect();
        let to_dial: Vec<NodeId> = current
            .iter()
            .filter(|id| me < **id && !running.contains(*id))
            .copied()
            .collect();
        for id in to_dial {
            running.insert(id);
            tokio::spawn(initiator(s.clone(), id));
        }
        prune(&s, &roster, &current).await;
        running.retain(|id| current.contains(id));
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Members gone or revoked are cut from the data plane now, whichever side
/// we are; so is any peer in the data plane that is not a member (also after
/// a restart, when nothing is tracked yet).
async fn prune(s: &Shared, roster: &Roster, current: &HashSet<NodeId>) {
    let allowed: HashSet<WgPublicKey> = roster
        .members()
        .iter()
        .filter(|m| current.contains(&m.cert.body().node_id))
        .map(|m| m.cert.body().wg_public)
        .collect();
    match s.dataplane.get() {
        Ok(info) => {
            for p in info.peers {
                let key = WgPublicKey(p.public_key.0);
                if !allowed.contains(&key) {
                    match s.dataplane.remove_peer(&key) {
                        Ok(()) => warn!(
                            "peer {key} cut off: not an unrevoked member of roster {}",
                            roster.serial()
                        ),
                        Err(e) => warn!("cannot remove peer {key}: {e:#}"),
                    }
                }
            }
        }
        Err(e) => warn!("cannot read the data plane's peers: {e:#}"),
    }
    for (id, track) in s.peers.lock().await.iter_mut() {
        if !current.contains(id) {
            track.status.state = "removed".into();
            track.installed_at = None;
        }
    }
}

/// Removes a peer from the data plane (fail closed) and marks it.
async fn cut(s: &Shared, id: NodeId, state: &str, why: &str) {
    let mut peers = s.peers.lock().await;
    let Some(track) = peers.get_mut(&id) else {
        return;
    };
    if let Some(key) = track.wg_key
        && let Err(e) = s.dataplane.remove_peer(&key)
    {
        warn!(
            "cannot remove peer {} from the data plane: {e:#}",
            track.status.name
        );
    }
    warn!("peer {} cut off: {why}", track.status.name);
    track.status.state = state.into();
    track.installed_at = None;
}

/// Puts the agreed key into the data plane and records it.
async fn install(s: &Shared, est: &Established, member: &Member, role: &str) -> Result<()> {
    let body = est.peer.cert().body();
    // The roster may have changed while the exchange ran: install only for a
    // peer that is still an unrevoked member of the current one.
    let current = s.roster.borrow().clone();
    let fingerprint = est.peer.cert().fingerprint();
    let listed = current
        .member(&body.node_id)
        .is_some_and(|m| m.cert.fingerprint() == fingerprint);
    if !listed || current.is_revoked(&fingerprint) {
        bail!(
            "{} left roster serial {} during the exchange; key not installed",
            body.name,
            current.serial()
        );
    }
    s.dataplane.upsert_peer(&PeerConfig {
        public_key: body.wg_public,
        preshared_key: est.psk.clone(),
        endpoint: member.wg_endpoint,
        allowed_ips: body.addresses.iter().map(|a| a.host()).collect(),
        persistent_keepalive: s.config.persistent_keepalive,
    })?;
    let mut peers = s.peers.lock().await;
    let track = peers
        .entry(est.peer.node_id())
        .or_insert_with(|| PeerTrack {
            status: PeerStatus::default(),
            installed_at: None,
            wg_key: None,
        });
    track.wg_key = Some(body.wg_public);
    track.status.name = body.name.clone();
    track.status.node_id = body.node_id.to_string();
    track.status.state = "up".into();
    track.status.role = role.into();
    track.status.epoch = est.epoch;
    track.status.last_exchange = Some(unix_now());
    track.status.last_error = None;
    track.status.exchanges_ok += 1;
    track.installed_at = Some(Instant::now());
    info!(
        "key epoch {} installed for {} ({role})",
        est.epoch, body.name
    );
    Ok(())
}

async fn record_failure(s: &Shared, id: NodeId, name: &str, error: &anyhow::Error) {
    let label = error
        .downcast_ref::<mesh_proto::ExchangeError>()
        .map_or("transport", |e| e.label())
        .to_string();
    *s.refusals.lock().await.entry(label.clone()).or_default() += 1;
    let mut peers = s.peers.lock().await;
    let track = peers.entry(id).or_insert_with(|| PeerTrack {
        status: PeerStatus {
            name: name.into(),
            node_id: id.to_string(),
            state: "connecting".into(),
            ..Default::default()
        },
        installed_at: None,
        wg_key: None,
    });
    if track.status.state == "up" {
        track.status.state = "retrying".into();
    }
    track.status.last_error = Some(format!("{label}: {error:#}"));
    track.status.exchanges_failed += 1;
    warn!("exchange with {name} failed ({label}): {error:#}");
}

/// Dials one peer and rotates its key until it leaves the roster.
async fn initiator(s: Arc<Shared>, id: NodeId) {
    let mut conn: Option<quinn::Connection> = None;
    let mut backoff = Duration::from_secs(1);
    let mut rx = s.roster.subscribe();
    loop {
        let roster = rx.borrow_and_update().clone();
        let Some(member) = roster
            .member(&id)
            .cloned()
            .filter(|m| !roster.is_revoked(&m.cert.fingerprint()))
        else {
            return;
        };
        let name = member.cert.body().name.clone();
        let result = async {
            let addr = member
                .keyd_endpoint
                .with_context(|| format!("roster has no keyd endpoint for {name}"))?;
            let c = match conn.as_ref().filter(|c| c.close_reason().is_none()) {
                Some(c) => c.clone(),
                None => {
                    let c = quic::connect(&s.endpoint, addr).await?;
                    conn = Some(c.clone());
                    c
                }
            };
            let last = s.peers.lock().await.get(&id).map_or(0, |t| t.status.epoch);
            quic::initiate(&c, params(&s, roster.clone(), Some(id), last)).await
        }
        .await;
        let wait = match result {
            Ok(est) => match install(&s, &est, &member, "initiator").await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    jittered(s.config.rotation_interval)
                }
                Err(e) => {
                    record_failure(&s, id, &name, &e).await;
                    backoff
                }
            },
            Err(e) => {
                conn = None;
                record_failure(&s, id, &name, &e).await;
                let w = backoff;
                backoff = (backoff * 2)
                    .min(s.config.rotation_interval / 2)
                    .max(Duration::from_secs(1));
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Fail closed, whatever the role: every second, a key older than rotation
/// interval + hard lifetime is removed from the data plane.
async fn expire_loop(s: Arc<Shared>) {
    let limit = s.config.rotation_interval + s.config.hard_lifetime;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stale: Vec<NodeId> = s
            .peers
            .lock()
            .await
            .iter()
            .filter(|(_, t)| t.installed_at.is_some_and(|at| at.elapsed() > limit))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            s.cut_at_hard_lifetime.fetch_add(1, Ordering::Relaxed);
            cut(
                &s,
                id,
                "expired",
                "no fresh key could be agreed within the hard lifetime",
            )
            .await;
        }
    }
}

/// Answers exchanges from peers that dial us.
async fn accept_loop(s: Arc<Shared>) {
    while let Some(incoming) = s.endpoint.accept().await {
        let s = s.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!("incoming QUIC connection failed: {e}");
                    return;
                }
            };
            loop {
                match quic::respond(&conn, || params(&s, s.roster.borrow().clone(), None, 0)).await
                {
                    Ok(est) => {
                        let id = est.peer.node_id();
                        let roster = s.roster.borrow().clone();
                        if let Some(member) = roster.member(&id)
                            && let Err(e) = install(&s, &est, member, "responder").await
                        {
                            record_failure(&s, id, est.peer.name(), &e).await;
                        }
                    }
                    Err(e) => {
                        if conn.close_reason().is_some() {
                            return;
                        }
                        let label = e
                            .downcast_ref::<mesh_proto::ExchangeError>()
                            .map_or("transport", |x| x.label());
                        *s.refusals
                            .lock()
                            .await
                            .entry(label.to_string())
                            .or_default() += 1;
                        warn!(
                            "refused an exchange from {} ({label}): {e:#}",
                            conn.remote_address()
                        );
                        if label != "transport" {
                            conn.close(1u32.into(), b"refused");
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Reloads the roster when its file changes.
async fn watch_roster(s: Arc<Shared>) {
    let mut last = file_stamp(&s.config.roster);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stamp = file_stamp(&s.config.roster);
        if stamp == last {
            continue;
        }
        last = stamp;
        let offered = match load_roster(&s.config, &s.ca) {
            Ok(r) => r,
            Err(e) => {
                warn!("new roster refused: {e:#}");
                continue;
            }
        };
        let current = s.roster.borrow().clone();
        match Roster::check_update(Some(&current), &offered) {
            Ok(true) => {
                info!("roster serial {} -> {}", current.serial(), offered.serial());
                persist_serial(&s.config, offered.serial());
                s.roster.send_replace(Arc::new(offered));
            }
            Ok(false) => {}
            Err(e) => {
                s.rollbacks.fetch_add(1, Ordering::Relaxed);
                warn!("new roster refused: {e}");
            }
        }
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub fn status_path(c: &Config) -> PathBuf {
    c.state_dir.join("status.json")
}

async fn write_status_loop(s: Arc<Shared>) {
    loop {
        let mut peers = BTreeMap::new();
        for track in s.peers.lock().await.values() {
            let mut st = track.status.clone();
            st.key_age_secs = track.installed_at.map(|t| t.elapsed().as_secs());
            peers.insert(st.name.clone(), st);
        }
        let roster_serial = s.roster.borrow().serial();
        let refusals = s.refusals.lock().await.clone();
        let status = Status {
            node: s.identity.cert.body().name.clone(),
            node_id: s.identity.node_id().to_string(),
            interface: s.config.interface.clone(),
            roster_serial,
            updated_at: unix_now(),
            peers,
            refusals,
            roster_rollbacks_refused: s.rollbacks.load(Ordering::Relaxed),
            peers_cut_at_hard_lifetime: s.cut_at_hard_lifetime.load(Ordering::Relaxed),
        };
        if let Ok(json) = serde_json::to_string_pretty(&status)
            && let Err(e) = files::write_document(&status_path(&s.config), &json)
        {
            warn!("cannot write status: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
