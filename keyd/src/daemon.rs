//! `keyd run`: the driver of [`crate::policy::MeshPolicy`].
//!
//! One task owns the policy. Everything else — exchanges as initiator (one
//! task per dial), exchanges as responder (one task per connection), the
//! roster file watcher — only sends inputs to it over a channel. The owner
//! performs the policy's actions in the order they come (data-plane calls
//! one at a time, so a check and the install it allows are never separated
//! by a roster change), logs its events, persists its state and writes
//! `status.json` once a second.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::cookie::{self, CookieChecker, CookieError, CookieJar};
use mesh_proto::exchange::{
    DEFAULT_TIMEOUT, Established, ExchangeParams, LocalIdentity, PeerEpochs,
};
use mesh_proto::identity::{NodeId, NoisePrivateKey, WgPrivateKey};
use mesh_proto::roster::{Member, Roster};
use mesh_proto::trust::Trust;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::admission::{Admission, AdmissionConfig, ConnectionDecision, Refusal};
use crate::authority::{client, wire};
use crate::config::Config;
use crate::dataplane::{DataPlane, PeerChange, PeerConfig};
use crate::dialled::Dialled;
use crate::edge::ladder::Rung;
use crate::edge::tcp::TcpLink;
use crate::edge::{self, Edge};
use crate::metrics::exchanges::{ExchangeCounters, ExchangeStats};
use crate::policy::{
    Action, Counters, DataPlaneView, Failure, LocalState, MeshPolicy, Now, PeerStatus,
    PolicyConfig, PolicyEvent, Role,
};
use crate::ratelimit::{LogLimiter, SharedLogLimiter, Verdict};
use crate::state::{self, PersistedState};
use crate::{files, firewall, metrics, quic, refusals, text, time};

/// Exchanges one keyd runs as initiator at once.
const MAX_DIALS_IN_FLIGHT: usize = 8;

/// How long before its expiry `keyd status` warns about the roster.
pub const ROSTER_EXPIRY_WARNING: Duration = Duration::from_secs(24 * 3600);

/// What `keyd status` reads (written atomically to state_dir/status.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub node_id: String,
    pub interface: String,
    /// This node's own standing: member, revoked, roster_expired, ...
    pub local_state: LocalState,
    pub roster_serial: u64,
    /// Unix seconds after which the roster is refused (plus clock skew).
    pub roster_not_after: u64,
    pub updated_at: u64,
    /// Whether the last read of the data plane succeeded; `peers[].in_dataplane`
    /// is what that read found, not what keyd last wrote.
    pub dataplane_reachable: bool,
    /// Peers in the data plane that the roster does not list (removed at
    /// the next reconcile).
    pub unlisted_in_dataplane: usize,
    pub peers: BTreeMap<String, PeerStatus>,
    /// Refused exchanges by reason label (unknown_ca, expired, revoked, ...).
    pub refusals: BTreeMap<String, u64>,
    pub roster_rollbacks_refused: u64,
    pub rosters_refused: u64,
    /// The subscription to the authority, when the node has one.
    #[serde(default)]
    pub authority: Option<client::LinkStatus>,
    #[serde(flatten)]
    pub counters: Counters,
    /// The data plane's firewall (issue 13).
    #[serde(default)]
    pub firewall: firewall::FirewallStatus,
    /// Hybrid exchanges begun, completed, failed, and their durations.
    #[serde(default)]
    pub exchanges: ExchangeCounters,
    /// `rotation_interval` in force: a key much older than this is stuck.
    #[serde(default)]
    pub rotation_interval_secs: u64,
    /// `max_clock_skew` in force: keyd keeps the roster this long past
    /// `roster_not_after`.
    #[serde(default)]
    pub max_clock_skew_secs: u64,
}

/// Inputs from the tasks to the policy's owner.
enum Input {
    Established {
        est: Box<Established>,
        role: Role,
    },
    /// An exchange this node dialled failed.
    DialFailed {
        peer: NodeId,
        label: &'static str,
        error: String,
    },
    Roster(Arc<Roster>),
    RosterRefused {
        rollback: bool,
        error: String,
    },
    /// The edge ladder moved a peer: the data plane's endpoint for it.
    PathEndpoint {
        peer: NodeId,
        endpoint: Option<SocketAddr>,
    },
}

/// What responders and dialers read to build their exchange parameters.
struct Snapshot {
    /// This node's identity: its certificate changes when the authority
    /// renews it.
    identity: Arc<LocalIdentity>,
    roster: Arc<Roster>,
    max_epoch: u64,
    peer_epochs: PeerEpochs,
}

struct Shared {
    config: Config,
    identity: Arc<LocalIdentity>,
    ca: Arc<CaCert>,
    endpoint: quinn::Endpoint,
    snapshot: watch::Sender<Arc<Snapshot>>,
    inputs: mpsc::Sender<Input>,
    /// QUIC connections this node dialled, reused across rotations.
    connections: Dialled<quinn::Connection>,
    admission: Mutex<Admission>,
    /// mac1/cookie check in front of every msg1 this node answers.
    cookies: Mutex<CookieChecker>,
    /// Cookies from the peers this node dials.
    jars: Mutex<HashMap<NodeId, CookieJar>>,
    /// For the tasks that face the network (the driver has its own).
    log: SharedLogLimiter,
    /// The authority subscription's state, when there is one.
    link: Option<client::SharedLinkStatus>,
    /// The fallback ladder: relays, carriers, path probes.
    edge: Arc<Edge>,
    /// Carriers being opened by this node (one attempt per peer and rung).
    edge_connecting: Mutex<HashSet<(NodeId, Rung)>>,
    /// Exchanges counted and timed for the status and `/metrics`.
    exchanges: ExchangeStats,
}

impl Shared {
    /// mac1 and, under load, mac2 on a sealed msg1: one keyed hash before
    /// any public-key work.
    fn gate(&self, sealed: &[u8], source: SocketAddr, under_load: bool) -> quic::Gate {
        // Two getrandom calls per msg1 are cheap next to what they guard,
        // and keep the checker free of a generator of its own.
        let (Ok(nonce), Ok(secret)) = (
            mesh_proto::identity::random_bytes::<{ cookie::NONCE_LEN }>(),
            mesh_proto::identity::random_bytes::<32>(),
        ) else {
            return quic::Gate::Refuse(CookieError::BadReply);
        };
        let fresh = || *secret;
        let mut checker = self
            .cookies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match checker.check(sealed, source, under_load, Instant::now(), fresh, *nonce) {
            cookie::Verdict::Accept(msg1) => quic::Gate::Accept(msg1.to_vec()),
            cookie::Verdict::CookieReply(reply) => quic::Gate::Reply(reply),
            cookie::Verdict::Refuse(e) => quic::Gate::Refuse(e),
        }
    }

    /// Admission control. A poisoned lock (a panic while held) is taken over:
    /// its counters stay meaningful, and refusing everyone would be worse.
    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log_limited(&self, key: &'static str, line: impl FnOnce() -> String) {
        self.log.warn(key, line);
    }

    /// Counts and logs (at a bounded rate) a refused or failed exchange that
    /// a peer started.
    fn refused(&self, remote: SocketAddr, label: &'static str, error: &dyn std::fmt::Display) {
        self.admission().count_label(label);
        self.log_limited(label, || {
            format!(
                "refused an exchange from {remote} ({label}): {}",
                text::error(error)
            )
        });
    }
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix: time::unix_now(),
    }
}

fn load_roster(c: &Config, ca: &CaCert) -> Result<Roster> {
    Roster::from_text(&files::read_text(&c.roster)?, ca)
        .with_context(|| format!("roster {}", c.roster.display()))
}

/// Loads everything, checks it, and runs until stopped. `datapath`: the
/// runtime of the thread that carries packets (datapath_thread.rs), which
/// must outlive this daemon's runtime.
pub async fn run(
    config: Config,
    reset_state: bool,
    datapath: tokio::runtime::Handle,
) -> Result<()> {
    let ca = Arc::new(crate::cli::load_ca_cert(&config.ca_cert)?);
    let mut cert = NodeCert::from_text(&files::read_text(&config.cert)?)
        .with_context(|| format!("`cert` {}", config.cert.display()))?;
    let wg_key = WgPrivateKey::from_text(&files::read_secret(&config.wg_key)?)
        .with_context(|| format!("`wg_key` {}", config.wg_key.display()))?;
    let noise_key = NoisePrivateKey::from_text(&files::read_secret(&config.noise_key)?)
        .with_context(|| format!("`noise_key` {}", config.noise_key.display()))?;
    if wg_key.public_key() != cert.body().wg_public
        || noise_key.public_key() != cert.body().noise_public
    {
        bail!("the keys in `wg_key`/`noise_key` are not the ones `cert` certifies");
    }
    let roster = load_roster(&config, &ca)?;
    let skew = config.max_clock_skew.as_secs();
    let now_unix = time::unix_now();
    // A roster signed by a key that is not valid now is never used, with or
    // without an authority to follow.
    roster
        .check_signer(None, now_unix, skew)
        .with_context(|| format!("roster {}", config.roster.display()))?;
    match roster.check_fresh(now_unix, skew) {
        Ok(()) => {}
        // Fail closed, not stopped: with an authority to follow, the node
        // starts without peers (an expired roster lists none it accepts)
        // and takes the next roster the authority sends (a VM powered off
        // for longer than a roster lives).
        Err(e) if config.authority.is_some() => warn!(
            "roster {}: {e}; no peers until the authority sends a newer one",
            config.roster.display()
        ),
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("roster {}", config.roster.display()))
            );
        }
    }
    // The roster may list a newer certificate for this node than the file
    // (renewed, or reissued by a signing-key rollover, just before a crash):
    // a verified roster vouches for it, and it carries these keys (the node
    // id derives from them).
    if let Some(m) = roster.member(&cert.body().node_id)
        && m.cert.body().not_before > cert.body().not_before
        && !roster.revokes(&m.cert)
    {
        info!("taking the newer certificate the roster lists for this node");
        cert = m.cert.clone();
        if let Err(e) = files::write_document(&config.cert, &cert.to_text()) {
            warn!("cannot write it to {}: {e:#}", config.cert.display());
        }
    }
    if !roster.issued(&ca, &cert) {
        bail!(
            "`cert` {} is not signed by `ca_cert` {} or an authority its roster lists",
            config.cert.display(),
            config.ca_cert.display()
        );
    }
    let persisted = state::load(&config.state_dir, reset_state)?;
    match &persisted {
        Some(s) => s.check_roster(&roster)?,
        None if reset_state => warn!(
            "--reset-state: starting from roster serial {} with no memory of earlier rosters or epochs",
            roster.serial()
        ),
        None => info!("first start: no state in {}", config.state_dir.display()),
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("`state_dir` {}", config.state_dir.display()))?;
    let records = persisted.map(|s| s.records()).unwrap_or_default();
    state::save(&config.state_dir, &PersistedState::new(&roster, &records))?;

    let seed = mesh_proto::identity::random_bytes::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .context("no randomness for jitter")?;
    let policy = MeshPolicy::new(
        PolicyConfig {
            rotation_interval: config.rotation_interval,
            hard_lifetime: config.hard_lifetime,
            max_clock_skew: skew,
            listen_port: config.wg_listen_port,
            persistent_keepalive: config.persistent_keepalive,
            max_dials_in_flight: MAX_DIALS_IN_FLIGHT,
        },
        cert.clone(),
        Arc::new(roster),
        records,
        seed,
        now(),
    );
    let endpoint = quic::endpoint(
        config.quic_listen,
        Arc::new(crate::datapath_thread::QuinnOn(datapath.clone())),
    )?;
    let identity_static = noise_key.public_key();
    let identity = Arc::new(LocalIdentity { cert, noise_key });
    info!(
        "keyd up: node {} ({}), interface {}, QUIC {}, roster serial {}",
        text::sanitize(&identity.cert.body().name, text::NAME_MAX),
        identity.node_id(),
        config.interface,
        config.quic_listen,
        policy.roster().serial()
    );
    let mut admission = Admission::new(AdmissionConfig {
        accept_unlisted_sources: config.accept_unlisted_sources,
        ..AdmissionConfig::default()
    });
    admission.set_listed(listed_sources(policy.roster()));
    let (inputs, rx) = mpsc::channel(1024);
    let (edge_requests, edge_rx) = mpsc::channel(256);
    let edge = Edge::new(
        config.edge.clone(),
        identity.node_id(),
        config.wg_listen_port,
        config.quic_listen.ip(),
        edge_requests,
        datapath,
    )
    .await?;
    edge.sync(policy.roster()).await;
    // The TCP rung listens where QUIC does, unless this node forbids it.
    let tcp_listener = if config.edge.allowed.contains(&Rung::Tcp) {
        Some(
            tokio::net::TcpListener::bind(config.quic_listen)
                .await
                .map_err(|e| quic::cannot_listen("TCP", config.quic_listen, e))?,
        )
    } else {
        None
    };
    let link = config
        .authority
        .as_ref()
        .map(|_| client::SharedLinkStatus::default());
    let (snapshot, _) = watch::channel(snapshot_of(&policy, &identity));
    let (published, _) = watch::channel(None);
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::server::bind(addr).await?;
        let status = published.subscribe();
        let pages = metrics::page::PageCache::default();
        let render: metrics::server::Render = Arc::new(move || {
            // The Arc cloned out at once: a borrow held while rendering
            // would hold the watch's lock and stall the driver's send_replace.
            let current = status.borrow().clone()?;
            let page = pages.page(current);
            Some(metrics::server::Body {
                shared: page.fixed(),
                fresh: page.clock(time::unix_now()),
            })
        });
        tokio::spawn(metrics::server::serve(
            listener,
            metrics::server::Limits::default(),
            render,
        ));
        info!("metrics on http://{addr}/metrics");
    }
    let shared = Arc::new(Shared {
        config,
        identity,
        ca,
        endpoint,
        snapshot,
        inputs,
        connections: Dialled::default(),
        admission: Mutex::new(admission),
        cookies: Mutex::new(CookieChecker::new(
            &identity_static,
            *mesh_proto::identity::random_bytes::<32>().context("no randomness for cookies")?,
            Instant::now(),
        )),
        jars: Mutex::new(HashMap::new()),
        log: SharedLogLimiter::default(),
        link,
        edge,
        edge_connecting: Mutex::new(HashSet::new()),
        exchanges: ExchangeStats::default(),
    });
    tokio::spawn(accept_loop(shared.clone()));
    tokio::spawn(edge_sync(shared.clone()));
    tokio::spawn(edge_requests_loop(shared.clone(), edge_rx));
    if let Some(listener) = tcp_listener {
        tokio::spawn(tcp_accept_loop(shared.clone(), listener));
    }
    tokio::spawn(watch_roster(shared.clone()));
    if let Some(link) = &shared.config.authority {
        let (tx, rx) = mpsc::channel(16);
        let q = shared.config.quic_listen;
        let follow = client::Follow {
            to: client::AuthorityAddr {
                network_id: shared.ca.body().network_id.clone(),
                endpoints: link.endpoints.clone(),
                key: link.public_key,
            },
            ca: shared.ca.clone(),
            noise: shared.identity.noise_key.clone(),
            me: shared.identity.node_id(),
            report: wire::Endpoints {
                wg: Some(SocketAddr::new(q.ip(), shared.config.wg_listen_port)),
                keyd: Some(q),
            },
            held: shared.snapshot.borrow().roster.clone(),
            log: SharedLogLimiter::default(),
            status: shared.link.clone().unwrap_or_default(),
            max_clock_skew: shared.config.max_clock_skew.as_secs(),
        };
        tokio::spawn(client::follow(follow, tx));
        tokio::spawn(take_authority_rosters(shared.clone(), rx));
    }
    Driver {
        identity: shared.identity.clone(),
        s: shared.clone(),
        policy,
        dataplane: DataPlane::for_interface(&shared.config.socket_dir, &shared.config.interface),
        wg_key: Arc::new(wg_key),
        refusals: BTreeMap::new(),
        rollbacks: 0,
        rosters_refused: 0,
        limiter: LogLimiter::default(),
        next_status: Instant::now(),
        firewall: FirewallPush::default(),
        last_results: HashMap::new(),
        published,
    }
    .run(rx)
    .await;
    Ok(())
}

/// The addresses from which members' keyds may connect.
fn listed_sources(roster: &Roster) -> Vec<std::net::IpAddr> {
    roster
        .members()
        .iter()
        .filter_map(|m| m.keyd_endpoint.map(|e| e.ip()))
        .collect()
}

fn snapshot_of(policy: &MeshPolicy, identity: &Arc<LocalIdentity>) -> Arc<Snapshot> {
    let (max_epoch, per_peer) = policy.epochs();
    Arc::new(Snapshot {
        identity: identity.clone(),
        roster: policy.roster().clone(),
        max_epoch,
        peer_epochs: PeerEpochs::new(per_peer),
    })
}

/// The owner of the policy.
struct Driver {
    s: Arc<Shared>,
    identity: Arc<LocalIdentity>,
    policy: MeshPolicy,
    dataplane: DataPlane,
    wg_key: Arc<WgPrivateKey>,
    refusals: BTreeMap<String, u64>,
    rollbacks: u64,
    rosters_refused: u64,
    limiter: LogLimiter,
    next_status: Instant,
    firewall: FirewallPush,
    /// Each peer's last exchange (`ok` or the failure's label), by node id.
    last_results: HashMap<String, &'static str>,
    /// The status as last written, for `/metrics`.
    published: watch::Sender<Option<Arc<Status>>>,
}

/// The firewall document in the data plane: what was pushed for which
/// roster serial and which data-plane incarnation (a restarted data plane
/// starts without one).
#[derive(Default)]
struct FirewallPush {
    /// Bumped whenever the data plane was (re)configured.
    dataplane_epoch: u64,
    pushed: Option<(u64, u64)>,
    retry_at: Option<Instant>,
    status: firewall::FirewallStatus,
}

/// A refused or failed push is tried again after this.
const FIREWALL_RETRY: Duration = Duration::from_secs(5);
/// A taken one is sent again this often (answered `stale` while in force).
const FIREWALL_REFRESH: Duration = Duration::from_secs(30);

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        let mut ready = false;
        loop {
            self.perform().await;
            if !ready && self.policy.interface_configured() {
                ready = true;
                crate::notify::ready();
            }
            self.ensure_firewall().await;
            self.log_events();
            self.s
                .snapshot
                .send_replace(snapshot_of(&self.policy, &self.identity));
            if Instant::now() >= self.next_status {
                self.write_status();
                self.next_status = Instant::now() + Duration::from_secs(1);
            }
            let wake = self.policy.poll_timeout(now()).min(self.next_status);
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.feed(input),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => self.policy.handle_timeout(now()),
            }
        }
    }

    fn feed(&mut self, input: Input) {
        let now = now();
        match input {
            Input::Established { est, role } => {
                let Established {
                    peer, epoch, psk, ..
                } = *est;
                self.s.edge.peer_reachable(peer.node_id());
                self.last_results.insert(peer.node_id().to_string(), "ok");
                self.policy
                    .exchange_established(peer.cert(), epoch, psk, role, now);
            }
            Input::DialFailed { peer, label, error } => {
                *self.refusals.entry(label.to_string()).or_default() += 1;
                self.last_results.insert(peer.to_string(), label);
                self.log_limited(label, || {
                    format!("exchange with {peer} failed ({label}): {error}")
                });
                let failure = if label == refusals::NO_ANSWER {
                    Failure::NoAnswer
                } else {
                    Failure::Exchange
                };
                self.policy
                    .exchange_failed(Some(peer), failure, &format!("{label}: {error}"), now);
            }
            // Two sources (the authority subscription, and the roster file it
            // writes) can deliver the same roster twice, or an older one
            // after a newer: only a newer one is taken. Each source checked
            // for rollback itself, against what it saw.
            Input::Roster(roster)
                if !matches!(
                    Roster::check_update(
                        Some(self.policy.roster()),
                        &roster,
                        now.unix,
                        self.s.config.max_clock_skew.as_secs()
                    ),
                    Ok(true)
                ) => {}
            Input::Roster(roster) => {
                info!(
                    "roster serial {} -> {}",
                    self.policy.roster().serial(),
                    roster.serial()
                );
                self.policy.set_roster(roster.clone(), now);
                self.s.admission().set_listed(listed_sources(&roster));
            }
            Input::PathEndpoint { peer, endpoint } => {
                self.policy.set_path_endpoint(peer, endpoint, now);
            }
            Input::RosterRefused { rollback, error } => {
                if rollback {
                    self.rollbacks += 1;
                }
                self.rosters_refused += 1;
                self.log_limited("roster_refused", || format!("new roster refused: {error}"));
            }
        }
    }

    fn log_limited(&mut self, key: &'static str, line: impl FnOnce() -> String) {
        if let Verdict::Log { suppressed } = self.limiter.check(key, Instant::now()) {
            if suppressed > 0 {
                warn!("{} ({suppressed} similar suppressed)", line());
            } else {
                warn!("{}", line());
            }
        }
    }

    /// Performs every pending action in order; consecutive peer changes go
    /// to the data plane as one `set`. After a call that could not reach the
    /// data plane, the rest of the batch's data-plane calls are reported
    /// failed without trying (the next read retries), so a hung data plane
    /// costs one timeout, not one per peer.
    async fn perform(&mut self) {
        let mut unreachable = false;
        let mut persist = false;
        loop {
            let actions: Vec<Action> = std::iter::from_fn(|| self.policy.poll_action()).collect();
            if actions.is_empty() {
                break;
            }
            let mut i = 0;
            while i < actions.len() {
                let action = &actions[i];
                i += 1;
                let result = match action {
                    Action::Dial(member) => {
                        self.dial((**member).clone());
                        continue;
                    }
                    Action::Persist => {
                        persist = true;
                        continue;
                    }
                    Action::ReadDataPlane if !unreachable => {
                        unreachable = !self.read_dataplane().await;
                        continue;
                    }
                    _ if unreachable => Err(CallError {
                        message: "data plane unreachable".into(),
                        unreachable: true,
                    }),
                    Action::ReadDataPlane => continue,
                    Action::ConfigureInterface => {
                        self.firewall.dataplane_epoch += 1;
                        let key = self.wg_key.clone();
                        let port = self.s.config.wg_listen_port;
                        self.blocking(move |dp| dp.configure_interface(&key, port))
                            .await
                    }
                    Action::Install(_) | Action::Remove(_) => {
                        // The policy first: a (re)started data plane never
                        // carries a peer's traffic without it.
                        self.ensure_firewall().await;
                        let start = i - 1;
                        while i < actions.len()
                            && matches!(actions[i], Action::Install(_) | Action::Remove(_))
                        {
                            i += 1;
                        }
                        let batch = &actions[start..i];
                        // Fail closed: a data plane whose firewall did not
                        // take the roster's policy gets no peer (removals
                        // still go through); the policy retries the installs.
                        let blocked = self.firewall_blocks_installs();
                        let (refused, allowed): (Vec<&Action>, Vec<&Action>) = batch
                            .iter()
                            .partition(|a| blocked.is_some() && matches!(a, Action::Install(_)));
                        let changes: Vec<PeerChange> =
                            allowed.iter().filter_map(|a| peer_change(a)).collect();
                        let result = self.blocking(move |dp| dp.change_peers(&changes)).await;
                        for a in allowed {
                            self.report(a, &result, &mut unreachable);
                        }
                        if let Some(why) = blocked {
                            let refusal = Err(CallError {
                                message: why,
                                unreachable: false,
                            });
                            for a in refused {
                                self.report(a, &refusal, &mut unreachable);
                            }
                        }
                        continue;
                    }
                };
                self.report(action, &result, &mut unreachable);
            }
        }
        if persist {
            let state = PersistedState::new(self.policy.roster(), &self.policy.persisted());
            if let Err(e) = state::save(&self.s.config.state_dir, &state) {
                error!("cannot persist state: {e:#}");
            }
        }
    }

    fn report(&mut self, action: &Action, result: &Result<(), CallError>, unreachable: &mut bool) {
        let result = match result {
            Ok(()) => Ok(()),
            Err(e) => {
                *unreachable |= e.unreachable;
                self.log_limited("dataplane_call", || {
                    format!("data-plane call failed: {}", e.message)
                });
                Err(e.message.clone())
            }
        };
        self.policy.action_done(action, result, now());
    }

    /// Reads the data plane into the policy; false if it could not be read.
    async fn read_dataplane(&mut self) -> bool {
        let dp = self.dataplane.clone();
        let key = self.wg_key.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut info = dp.get()?;
            let own = info
                .private_key
                .take()
                .is_some_and(|k| k.0 == *key.0.as_bytes());
            anyhow::Ok(DataPlaneView::from_device(info, own))
        })
        .await;
        match read {
            Ok(Ok(view)) => {
                self.policy.observed(view, now());
                true
            }
            Ok(Err(e)) => {
                self.log_limited("dataplane_read", || {
                    format!("cannot read the data plane: {e:#}")
                });
                self.policy.observe_failed(now());
                false
            }
            Err(e) => {
                error!("data-plane read task failed: {e}");
                self.policy.observe_failed(now());
                false
            }
        }
    }

    async fn blocking(
        &self,
        call: impl FnOnce(&DataPlane) -> Result<()> + Send + 'static,
    ) -> Result<(), CallError> {
        let dp = self.dataplane.clone();
        match tokio::task::spawn_blocking(move || call(&dp)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CallError {
                message: format!("{e:#}"),
                // An I/O error (connect, read, write, timeout) means the data
                // plane is not there; an errno answer means it refused.
                unreachable: e.chain().any(|c| c.is::<std::io::Error>()),
            }),
            Err(e) => Err(CallError {
                message: format!("data-plane task failed: {e}"),
                unreachable: false,
            }),
        }
    }

    fn log_events(&mut self) {
        while let Some(event) = self.policy.poll_event() {
            match event {
                PolicyEvent::Installed { name, epoch, role } => {
                    info!("key epoch {epoch} installed for {name} ({role:?})")
                }
                PolicyEvent::NotInstalled { name, why } => {
                    warn!("key agreed with {name} not installed: {why}")
                }
                PolicyEvent::Cut { name, reason } => {
                    warn!("peer {name} cut off: {}", reason.describe())
                }
                PolicyEvent::Removed { public_key } => self.log_limited("removed", || {
                    format!("removing peer {public_key} from the data plane: not a valid member with a fresh key")
                }),
                PolicyEvent::InterfaceRestored => {
                    warn!(
                        "the data plane had lost its private key (restarted?): interface and peers restored"
                    )
                }
                PolicyEvent::CertificateRenewed { not_after } => self.adopt_certificate(not_after),
                PolicyEvent::LocalStateChanged { state } => match state {
                    LocalState::Member => info!("this node is a valid member"),
                    other => error!(
                        "this node is not a valid member ({other:?}): every peer is dropped until a roster or certificate makes it one again"
                    ),
                },
            }
        }
    }

    /// Takes the certificate the roster lists for this node: exchanges
    /// present it from now on, and the certificate file gets it so that a
    /// restart starts with it.
    fn adopt_certificate(&mut self, not_after: mesh_proto::UnixTime) {
        let cert = self.policy.my_cert().clone();
        let text = cert.to_text();
        self.identity = Arc::new(LocalIdentity {
            cert,
            noise_key: self.identity.noise_key.clone(),
        });
        info!("this node's certificate was renewed (valid until {not_after})");
        if let Err(e) = files::write_document(&self.s.config.cert, &text) {
            error!(
                "cannot write the renewed certificate to {}: {e:#}",
                self.s.config.cert.display()
            );
        }
    }

    fn dial(&self, member: Member) {
        let s = self.s.clone();
        tokio::spawn(async move {
            let id = member.cert.body().node_id;
            let input = match counted(&s.exchanges, initiate(&s, &member)).await {
                Ok(est) => Input::Established {
                    est: Box::new(est),
                    role: Role::Initiator,
                },
                Err(e) => Input::DialFailed {
                    peer: id,
                    label: label_of(&e),
                    error: text::sanitize(&format!("{e:#}"), text::ERROR_MAX),
                },
            };
            let _ = s.inputs.send(input).await;
        });
    }

    /// Why no peer may be installed now: the roster has a policy and the
    /// data plane's firewall (it has one) did not take it. A data plane
    /// without a firewall gets its peers (status says NOT ENFORCED).
    fn firewall_blocks_installs(&self) -> Option<String> {
        let s = &self.firewall.status;
        (self.policy.roster().policy().is_some() && s.state == firewall::FirewallState::Failed)
            .then(|| {
                format!(
                    "the data plane's firewall has not taken the roster's policy: {}",
                    s.detail.as_deref().unwrap_or("unknown")
                )
            })
    }

    /// Pushes the firewall document for the current roster, once per roster
    /// serial and data-plane incarnation (again after a failure, later).
    async fn ensure_firewall(&mut self) {
        let f = &mut self.firewall;
        let wanted = (self.policy.roster().serial(), f.dataplane_epoch);
        // Also every FIREWALL_REFRESH: a data plane restarted behind our
        // back (its key set by someone else) answers with an older
        // generation, or none, and gets the document again.
        let retry = f.retry_at.is_some_and(|t| Instant::now() >= t);
        if f.pushed == Some(wanted) && !retry {
            return;
        }
        let doc = firewall::document_for(self.policy.roster(), self.policy.my_cert());
        let ifname = self.s.config.interface.clone();
        let dir = self.s.config.socket_dir.clone();
        let status = tokio::task::spawn_blocking(move || firewall::push(&dir, &ifname, &doc))
            .await
            .unwrap_or_else(|e| firewall::FirewallStatus {
                state: firewall::FirewallState::Failed,
                detail: Some(format!("the push task failed: {e}")),
                ..Default::default()
            });
        let f = &mut self.firewall;
        if status != f.status {
            match status.state {
                firewall::FirewallState::Enforced => info!(
                    "firewall: roster serial {}'s policy in force in the data plane ({} rules, {} peers)",
                    wanted.0, status.rules, status.peers
                ),
                firewall::FirewallState::NoPolicy => {
                    info!("firewall: the roster has no policy; every member reaches every other")
                }
                _ => warn!(
                    "firewall: {}",
                    status.detail.as_deref().unwrap_or("not enforced")
                ),
            }
        }
        f.retry_at = Some(
            Instant::now()
                + if status.state == firewall::FirewallState::Failed {
                    FIREWALL_RETRY
                } else {
                    FIREWALL_REFRESH
                },
        );
        f.pushed = Some(wanted);
        f.status = status;
    }

    fn write_status(&mut self) {
        let now = now();
        let roster = self.policy.roster();
        let status = Status {
            node: text::sanitize(&self.s.identity.cert.body().name, text::NAME_MAX),
            node_id: self.s.identity.node_id().to_string(),
            interface: self.s.config.interface.clone(),
            local_state: self.policy.local_state(),
            roster_serial: roster.serial(),
            roster_not_after: roster.not_after(),
            updated_at: now.unix,
            dataplane_reachable: self.policy.dataplane_reachable(),
            unlisted_in_dataplane: self.policy.unlisted_in_dataplane(),
            peers: {
                let mut paths = self.s.edge.status_all();
                self.policy
                    .peer_status(now)
                    .into_iter()
                    .map(|mut p| {
                        p.path = paths.remove(&p.node_id);
                        p.last_result = self.last_results.get(&p.node_id).map(|r| r.to_string());
                        (p.name.clone(), p)
                    })
                    .collect()
            },
            refusals: {
                let mut all = self.refusals.clone();
                for (label, n) in self.s.admission().refusals() {
                    *all.entry((*label).to_string()).or_default() += n;
                }
                all
            },
            roster_rollbacks_refused: self.rollbacks,
            rosters_refused: self.rosters_refused,
            authority: self
                .s
                .link
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            counters: self.policy.counters().clone(),
            firewall: self.firewall.status.clone(),
            exchanges: self.s.exchanges.snapshot(),
            rotation_interval_secs: self.s.config.rotation_interval.as_secs(),
            max_clock_skew_secs: self.s.config.max_clock_skew.as_secs(),
        };
        // Peers that left the roster leave no result behind.
        let listed: HashSet<&str> = status.peers.values().map(|p| p.node_id.as_str()).collect();
        self.last_results
            .retain(|id, _| listed.contains(id.as_str()));
        if let Ok(json) = serde_json::to_string_pretty(&status)
            && let Err(e) = files::write_document(&status_path(&self.s.config), &json)
        {
            warn!("cannot write status: {e:#}");
        }
        self.published.send_replace(Some(Arc::new(status)));
    }
}

fn peer_change(action: &Action) -> Option<PeerChange> {
    match action {
        Action::Install(i) => Some(PeerChange::Upsert(PeerConfig {
            public_key: i.public_key,
            preshared_key: i.preshared_key.clone(),
            endpoint: i.endpoint,
            allowed_ips: i.allowed_ips.clone(),
            persistent_keepalive: i.persistent_keepalive,
        })),
        Action::Remove(key) => Some(PeerChange::Remove(*key)),
        _ => None,
    }
}

/// A failed data-plane call.
struct CallError {
    message: String,
    unreachable: bool,
}

fn label_of(e: &anyhow::Error) -> &'static str {
    if e.is::<quic::NoAnswer>() {
        return refusals::NO_ANSWER;
    }
    e.downcast_ref::<mesh_proto::ExchangeError>()
        .map_or(refusals::TRANSPORT, |x| x.label())
}

fn params(s: &Shared, snap: &Snapshot, expected: Option<NodeId>) -> ExchangeParams {
    ExchangeParams {
        identity: snap.identity.clone(),
        trust: Trust {
            ca: s.ca.clone(),
            roster: snap.roster.clone(),
            max_clock_skew: s.config.max_clock_skew.as_secs(),
            local: s.identity.node_id(),
        },
        timeout: DEFAULT_TIMEOUT,
        last_epoch: match expected {
            Some(id) => snap.peer_epochs.get(&id),
            None => snap.max_epoch,
        },
        peer_epochs: snap.peer_epochs.clone(),
        expected_peer: expected,
        channel_binding: Vec::new(),
    }
}

/// Counts and times an exchange this node initiates.
async fn counted(
    stats: &ExchangeStats,
    exchange: impl std::future::Future<Output = Result<Established>>,
) -> Result<Established> {
    let start = Instant::now();
    stats.started(Role::Initiator);
    let result = exchange.await;
    match &result {
        Ok(_) => stats.completed(Role::Initiator, start.elapsed()),
        Err(_) => stats.failed(Role::Initiator),
    }
    result
}

/// Counts an exchange this node answered, if it began (was admitted at
/// `admitted`): one refused before that is a refusal, not an exchange.
fn count_answered(stats: &ExchangeStats, admitted: &OnceLock<Instant>, ok: bool) {
    if let Some(start) = admitted.get() {
        if ok {
            stats.completed(Role::Responder, start.elapsed());
        } else {
            stats.failed(Role::Responder);
        }
    }
}

/// One exchange as initiator: over the QUIC connection (reused or new), or
/// over the peer's TCP link when the edge ladder has one and QUIC does not
/// pass.
async fn initiate(s: &Shared, member: &Member) -> Result<Established> {
    let id = member.cert.body().node_id;
    let path = s.edge.path(&id);
    // QUIC unless it is down or the ladder found that only TCP passes (a
    // QUIC connection can look up for its idle timeout after UDP stopped).
    let quic_up = path
        .as_ref()
        .is_some_and(|p| p.quic().is_some() && p.rung() != Rung::Tcp);
    if !quic_up && let Some(link) = path.as_ref().and_then(|p| p.tcp()) {
        return initiate_tcp(s, member, &link).await;
    }
    match initiate_quic(s, member).await {
        Err(e) if e.is::<quic::NoAnswer>() => match s.edge.path(&id).and_then(|p| p.tcp()) {
            Some(link) => initiate_tcp(s, member, &link).await,
            None => Err(e),
        },
        other => other,
    }
}

/// An exchange over an (authenticated or new) TCP link, bound to it.
async fn initiate_tcp(s: &Shared, member: &Member, link: &Arc<TcpLink>) -> Result<Established> {
    let id = member.cert.body().node_id;
    let snap = s.snapshot.borrow().clone();
    let mut params = params(s, &snap, Some(id));
    params.channel_binding = link.binding.clone();
    let mut jar = s
        .jars
        .lock()
        .ok()
        .and_then(|mut j| j.remove(&id))
        .unwrap_or_default();
    let responder = member.cert.body().noise_public;
    let result = tokio::time::timeout(quic::EXCHANGE_DEADLINE, async {
        let io = link.exchange_io().await;
        quic::initiate_on(io, params, &responder, &mut jar).await
    })
    .await
    .map_err(|_| anyhow::anyhow!(mesh_proto::ExchangeError::Timeout))
    .and_then(|r| r);
    if let Ok(mut j) = s.jars.lock() {
        j.insert(id, jar);
    }
    match &result {
        Ok(_) => s.edge.attach_tcp(id, link),
        Err(_) => link.close(),
    }
    result
}

/// One exchange over a reused or new QUIC connection.
async fn initiate_quic(s: &Shared, member: &Member) -> Result<Established> {
    let id = member.cert.body().node_id;
    let addr = member.keyd_endpoint.with_context(|| {
        format!(
            "roster has no keyd endpoint for {}",
            text::sanitize(&member.cert.body().name, text::NAME_MAX)
        )
    })?;
    let conn = s
        .connections
        .get_or_dial(
            id,
            |c| c.close_reason().is_none(),
            || quic::connect(&s.endpoint, addr),
        )
        .await?;
    let snap = s.snapshot.borrow().clone();
    let mut jar = s
        .jars
        .lock()
        .ok()
        .and_then(|mut j| j.remove(&id))
        .unwrap_or_default();
    let responder = member.cert.body().noise_public;
    let result = quic::initiate(&conn, params(s, &snap, Some(id)), &responder, &mut jar).await;
    if let Ok(mut j) = s.jars.lock() {
        j.insert(id, jar);
    }
    match &result {
        Ok(_) => s.edge.attach_quic(id, &conn),
        // A failed exchange ends its connection on both sides: this one,
        // not one dialled since (a failed exchange on the TCP link, which
        // used to end the cached connection too, leaves QUIC alone).
        Err(_) => {
            let ours = |c: &quinn::Connection| c.stable_id() == conn.stable_id();
            if let Some(c) = s.connections.remove_if(&id, ours) {
                c.close(1u32.into(), b"exchange failed");
            }
        }
    }
    result
}

/// Accepts connections as admission control allows (source filter, caps,
/// per-source rate, retry under load) and answers the exchanges they open.
async fn accept_loop(s: Arc<Shared>) {
    while let Some(incoming) = s.endpoint.accept().await {
        let remote = incoming.remote_address();
        let decision = s.admission().connection(
            remote.ip(),
            incoming.remote_address_validated(),
            Instant::now(),
        );
        match decision {
            ConnectionDecision::Accept => {
                tokio::spawn(serve_connection(s.clone(), incoming, remote));
            }
            ConnectionDecision::Retry => {
                let _ = incoming.retry();
            }
            ConnectionDecision::Refuse(r) => {
                // No answer at all: a prober learns nothing and costs nothing.
                incoming.ignore();
                s.log_limited(r.label(), || {
                    format!("connection from {remote} refused: {}", r.label())
                });
            }
        }
    }
}

/// Gives the connection slot back however the task ends.
struct ConnectionSlot(Arc<Shared>, std::net::IpAddr);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.admission().connection_closed(self.1);
    }
}

/// Gives the handshake slot back however the exchange ends.
struct HandshakeSlot(Arc<Shared>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.admission().handshake_done();
    }
}

async fn serve_connection(s: Arc<Shared>, incoming: quinn::Incoming, remote: SocketAddr) {
    let _slot = ConnectionSlot(s.clone(), remote.ip());
    let conn = match tokio::time::timeout(quic::EXCHANGE_DEADLINE, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            s.refused(remote, refusals::TRANSPORT, &e);
            return;
        }
        Err(_) => {
            s.refused(
                remote,
                mesh_proto::ExchangeError::Timeout.label(),
                &"QUIC handshake did not finish",
            );
            return;
        }
    };
    // Until an exchange on it succeeds, a connection must open its stream
    // within the exchange deadline: an unauthenticated host cannot hold a
    // connection slot by keeping an idle connection alive. After that it
    // waits for the next rotation like any member's.
    let mut authenticated = false;
    loop {
        let first_stream = (!authenticated).then_some(quic::EXCHANGE_DEADLINE);
        let admitted = OnceLock::new();
        let result = quic::respond(
            &conn,
            first_stream,
            responder_gate(&s, remote),
            responder_admit(&s, remote, &admitted),
        )
        .await;
        count_answered(&s.exchanges, &admitted, result.is_ok());
        match result {
            Ok(est) => {
                authenticated = true;
                s.edge.attach_quic(est.peer.node_id(), &conn);
                let input = Input::Established {
                    est: Box::new(est),
                    role: Role::Responder,
                };
                if s.inputs.send(input).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if conn.close_reason().is_none() {
                    s.refused(remote, responder_label(&e), &format!("{e:#}"));
                }
                // Any failed exchange ends the connection: a new try costs
                // the peer a new QUIC handshake and passes admission again.
                conn.close(1u32.into(), b"refused");
                return;
            }
        }
    }
}

/// mac1 (and mac2 under load) first: one keyed hash before anything else.
fn responder_gate(s: &Shared, remote: SocketAddr) -> impl Fn(&[u8]) -> quic::Gate + '_ {
    move |sealed: &[u8]| {
        let under_load = s.admission().under_load();
        s.gate(sealed, remote, under_load)
    }
}

/// Then a handshake slot, held only while the public-key work runs, and the
/// parameters as of now. The exchange begins there: `admitted` gets the time.
fn responder_admit<'a>(
    s: &'a Arc<Shared>,
    remote: SocketAddr,
    admitted: &'a OnceLock<Instant>,
) -> impl FnOnce() -> Result<(ExchangeParams, HandshakeSlot)> + 'a {
    move || {
        s.admission()
            .handshake(remote.ip(), Instant::now())
            .map_err(|r| anyhow::anyhow!(AdmissionRefused(r)))?;
        let _ = admitted.set(Instant::now());
        s.exchanges.started(Role::Responder);
        let slot = HandshakeSlot(s.clone());
        let snap = s.snapshot.borrow().clone();
        Ok((params(s, &snap, None), slot))
    }
}

fn responder_label(e: &anyhow::Error) -> &'static str {
    if let Some(r) = e.downcast_ref::<AdmissionRefused>() {
        r.0.label()
    } else if let Some(c) = e.downcast_ref::<CookieError>() {
        c.label()
    } else {
        label_of(e)
    }
}

/// Keeps the edge paths in step with the roster the driver publishes.
async fn edge_sync(s: Arc<Shared>) {
    let mut rx = s.snapshot.subscribe();
    let mut serial = None;
    while rx.changed().await.is_ok() {
        let roster = rx.borrow_and_update().roster.clone();
        let current = Some((roster.serial(), roster.fingerprint()));
        if current != serial {
            serial = current;
            s.edge.sync(&roster).await;
        }
    }
}

/// Performs the ladder's requests: endpoints through the policy (so that
/// later installs keep them), carriers opened one attempt at a time.
async fn edge_requests_loop(s: Arc<Shared>, mut rx: mpsc::Receiver<edge::Request>) {
    while let Some(request) = rx.recv().await {
        match request {
            edge::Request::Endpoint { peer, endpoint } => {
                if s.inputs
                    .send(Input::PathEndpoint { peer, endpoint })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            edge::Request::Connect { peer, rung } => {
                // The member first: a request for a peer that just left the
                // roster must not leave its entry behind.
                let Some(member) = s.snapshot.borrow().roster.member(&peer).cloned() else {
                    continue;
                };
                let fresh = s
                    .edge_connecting
                    .lock()
                    .is_ok_and(|mut c| c.insert((peer, rung)));
                if !fresh {
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let result = connect_carrier(&s, &member, rung).await;
                    s.edge.connect_done(peer, rung, result.is_ok());
                    if let Err(e) = result {
                        s.log.warn("edge_connect", || {
                            format!(
                                "edge: cannot open the {rung} carrier to {}: {}",
                                text::sanitize(&member.cert.body().name, text::NAME_MAX),
                                text::error(&e)
                            )
                        });
                    }
                    if let Ok(mut c) = s.edge_connecting.lock() {
                        c.remove(&(peer, rung));
                    }
                });
            }
        }
    }
}

/// Opens a carrier and runs an exchange bound to it (a key rotation like
/// any other): only then does it carry the peer's packets.
async fn connect_carrier(s: &Shared, member: &Member, rung: Rung) -> Result<()> {
    let est = match rung {
        Rung::Quic => counted(&s.exchanges, initiate_quic(s, member)).await?,
        Rung::Tcp => {
            let addr = member
                .keyd_endpoint
                .context("the roster has no keyd endpoint for it")?;
            let link = TcpLink::connect(&s.edge.connector, addr, s.edge.datapath()).await?;
            counted(&s.exchanges, initiate_tcp(s, member, &link)).await?
        }
        Rung::Direct => return Ok(()),
    };
    s.inputs
        .send(Input::Established {
            est: Box::new(est),
            role: Role::Initiator,
        })
        .await
        .map_err(|_| anyhow::anyhow!("keyd is stopping"))
}

/// Accepts TLS/TCP links (the edge ladder's TCP rung) under the same
/// admission control as QUIC connections.
async fn tcp_accept_loop(s: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                s.log
                    .warn("tcp_accept", || format!("edge: TCP accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // TCP's own handshake has validated the source address.
        match s.admission().connection(remote.ip(), true, Instant::now()) {
            ConnectionDecision::Accept => {
                tokio::spawn(serve_tcp(s.clone(), tcp, remote));
            }
            ConnectionDecision::Retry => {}
            ConnectionDecision::Refuse(r) => s.log_limited(r.label(), || {
                format!("TCP connection from {remote} refused: {}", r.label())
            }),
        }
    }
}

/// A whole exchange message read before the exchange starts, then the rest.
struct FirstThen<'a> {
    first: Option<Vec<u8>>,
    io: crate::edge::tcp::LinkIo<'a>,
}

impl quic::MessageIo for FirstThen<'_> {
    async fn write(&mut self, msg: &[u8]) -> Result<()> {
        self.io.write(msg).await
    }
    async fn read(&mut self) -> Result<Vec<u8>> {
        match self.first.take() {
            Some(m) => Ok(m),
            None => self.io.read().await,
        }
    }
    async fn finish(&mut self) {
        self.io.finish().await
    }
}

/// Answers the exchanges a TCP link carries, as `serve_connection` does for
/// QUIC: the first within the deadline, later ones whenever they come, each
/// bounded once it starts.
async fn serve_tcp(s: Arc<Shared>, tcp: tokio::net::TcpStream, remote: SocketAddr) {
    use quic::MessageIo;
    let _slot = ConnectionSlot(s.clone(), remote.ip());
    let link = match TcpLink::accept(&s.edge.acceptor, tcp, remote, s.edge.datapath()).await {
        Ok(l) => l,
        Err(e) => {
            s.refused(remote, refusals::TRANSPORT, &format!("{e:#}"));
            return;
        }
    };
    let mut authenticated = false;
    loop {
        let mut io = link.exchange_io().await;
        let first = if authenticated {
            io.read().await
        } else {
            tokio::time::timeout(quic::EXCHANGE_DEADLINE, io.read())
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!(mesh_proto::ExchangeError::Timeout)))
        };
        let Ok(first) = first else {
            if !authenticated {
                s.refused(
                    remote,
                    mesh_proto::ExchangeError::Timeout.label(),
                    &"no exchange on a new TCP link",
                );
            }
            link.close();
            return;
        };
        let admitted = OnceLock::new();
        let exchange = quic::respond_on(
            FirstThen {
                first: Some(first),
                io,
            },
            link.binding.clone(),
            responder_gate(&s, remote),
            responder_admit(&s, remote, &admitted),
        );
        let result = tokio::time::timeout(quic::EXCHANGE_DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!(mesh_proto::ExchangeError::Timeout)));
        count_answered(&s.exchanges, &admitted, result.is_ok());
        match result {
            Ok(est) => {
                authenticated = true;
                s.edge.attach_tcp(est.peer.node_id(), &link);
                let input = Input::Established {
                    est: Box::new(est),
                    role: Role::Responder,
                };
                if s.inputs.send(input).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                s.refused(remote, responder_label(&e), &format!("{e:#}"));
                link.close();
                return;
            }
        }
    }
}

/// An exchange refused by admission control before any work was done.
#[derive(Debug, thiserror::Error)]
#[error("refused before the exchange: {}", .0.label())]
struct AdmissionRefused(Refusal);

/// Rosters from the authority subscription (verified, in order, newer):
/// written to the roster file first, so a restart starts from the newest,
/// then given to the policy.
async fn take_authority_rosters(s: Arc<Shared>, mut rx: mpsc::Receiver<Arc<Roster>>) {
    while let Some(roster) = rx.recv().await {
        if let Err(e) = files::write_document(&s.config.roster, &roster.to_text()) {
            s.log_limited("roster_write", || {
                format!(
                    "cannot cache the roster in {}: {e:#}",
                    s.config.roster.display()
                )
            });
        }
        let input = match roster.check_fresh(time::unix_now(), s.config.max_clock_skew.as_secs()) {
            Ok(()) => Input::Roster(roster),
            Err(e) => Input::RosterRefused {
                rollback: false,
                error: e.to_string(),
            },
        };
        if s.inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// Reloads the roster when its file changes; only a verified, newer roster
/// reaches the policy.
async fn watch_roster(s: Arc<Shared>) {
    let mut last = file_stamp(&s.config.roster);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stamp = file_stamp(&s.config.roster);
        if stamp == last {
            continue;
        }
        last = stamp;
        let current = s.snapshot.borrow().roster.clone();
        let input = match load_roster(&s.config, &s.ca) {
            Err(e) => Input::RosterRefused {
                rollback: false,
                error: format!("{e:#}"),
            },
            Ok(offered) => match Roster::check_update(
                Some(&current),
                &offered,
                time::unix_now(),
                s.config.max_clock_skew.as_secs(),
            ) {
                Ok(true) => {
                    match offered.check_fresh(time::unix_now(), s.config.max_clock_skew.as_secs()) {
                        Ok(()) => Input::Roster(Arc::new(offered)),
                        Err(e) => Input::RosterRefused {
                            rollback: false,
                            error: e.to_string(),
                        },
                    }
                }
                Ok(false) => continue,
                Err(e) => Input::RosterRefused {
                    rollback: true,
                    error: e.to_string(),
                },
            },
        };
        if s.inputs.send(input).await.is_err() {
            return;
        }
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

pub fn status_path(c: &Config) -> PathBuf {
    c.state_dir.join("status.json")
}
