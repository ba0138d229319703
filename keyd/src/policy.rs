//! keyd's decisions as a sans-IO state machine: who dials whom and when,
//! which keys are installed, when a peer is cut, and what the data plane must
//! hold. Feed it inputs (a roster, a finished or failed exchange, what the
//! data plane really holds, the result of an action, time); drain
//! [`MeshPolicy::poll_action`] and [`MeshPolicy::poll_event`]; arm a timer
//! for [`MeshPolicy::poll_timeout`]. It never reads a clock, a file or a
//! socket, so every path is a unit test on simulated time (see
//! `policy_tests.rs`). `daemon.rs` is the one driver that performs actions.
//!
//! **Enforcement is reconciliation, not events.** Every read of the data
//! plane is compared with the *desired state*: the interface's private key
//! and port, and exactly the peers that are listed in an unexpired roster,
//! unrevoked, hold a certificate valid now (± skew), and have a key younger
//! than rotation interval + hard lifetime — while this node itself is a
//! valid member. Whatever differs is corrected, on every read, so a failed
//! call, a restarted data plane, a keyd restart or a race is repaired at the
//! next read instead of depending on one event having been seen.
//!
//! Check-and-install is serialized by construction: the roster the policy
//! checks an exchange against is the one it holds, and the driver performs
//! the resulting actions in order before it feeds the next input.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::UnixTime;
use mesh_proto::cert::NodeCert;
use mesh_proto::identity::{NodeId, WgPublicKey};
use mesh_proto::prefix::IpPrefix;
use mesh_proto::roster::{Member, Roster};
use mesh_proto::schedule::Psk;
use mesh_proto::uapi;

use crate::text;

/// The first retry after a failure; doubled up to half a rotation interval.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// How often the data plane is read and reconciled.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// After a data-plane restart, peers are installed with a 1 s persistent
/// keepalive for this long: the keepalive makes the restarted side start a
/// WireGuard handshake at once, so the other side, whose old session the
/// restart destroyed, is not left sending into it until WireGuard's own
/// 15 s dead-session timer. Then the configured keepalive is put back.
pub const KICK: Duration = Duration::from_secs(5);

/// How a dial failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An exchange began and failed (refused, timed out, broken).
    Exchange,
    /// The peer's keyd never answered the connection.
    NoAnswer,
}

/// Both clocks at one instant: monotonic for timers, Unix seconds for
/// certificate and roster validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub unix: UnixTime,
}

impl Now {
    /// The monotonic instant at which Unix time `t` is reached; `None` when
    /// it has passed (what it triggers is already done) or is too far away
    /// to matter.
    fn at_unix(&self, t: UnixTime) -> Option<Instant> {
        if t <= self.unix {
            return None;
        }
        self.mono.checked_add(Duration::from_secs(t - self.unix))
    }
}

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub rotation_interval: Duration,
    pub hard_lifetime: Duration,
    pub max_clock_skew: u64,
    pub listen_port: u16,
    pub persistent_keepalive: Option<u16>,
    /// Exchanges this node runs as initiator at once. A large mesh forming
    /// at once would otherwise start every pair's exchange together.
    pub max_dials_in_flight: usize,
}

impl PolicyConfig {
    /// A key older than this is removed: its successor was due a hard
    /// lifetime ago.
    fn key_limit(&self) -> Duration {
        self.rotation_interval + self.hard_lifetime
    }
}

/// Which side of a pair runs the exchanges: the lower node id dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Initiator,
    Responder,
}

/// Why a peer is not in the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutReason {
    /// No fresh key within rotation interval + hard lifetime (fail closed).
    HardLifetime,
    /// Its certificate expired (plus the allowed clock skew).
    CertificateExpired,
    /// Its certificate is not valid yet.
    CertificateNotYetValid,
    /// Revoked in the roster.
    Revoked,
    /// No longer listed in the roster.
    NotListed,
    /// This node itself is revoked, expired, unlisted, or its roster expired.
    LocalNodeInvalid,
}

impl CutReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::HardLifetime => "no fresh key could be agreed within the hard lifetime",
            Self::CertificateExpired => "its certificate expired",
            Self::CertificateNotYetValid => "its certificate is not valid yet",
            Self::Revoked => "revoked in the roster",
            Self::NotListed => "no longer in the roster",
            Self::LocalNodeInvalid => "this node is not a valid member",
        }
    }
}

/// A peer's state as `keyd status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Listed, no key agreed yet.
    Connecting,
    /// A fresh key is agreed and should be in the data plane.
    Up,
    /// The key is still usable but refreshing it fails.
    Retrying,
    /// Out of the data plane.
    Cut(CutReason),
}

impl PeerState {
    /// A short form for a table.
    pub fn label(&self) -> String {
        match self {
            Self::Connecting => "connecting".into(),
            Self::Up => "up".into(),
            Self::Retrying => "retrying".into(),
            Self::Cut(reason) => format!("cut: {reason:?}").to_lowercase(),
        }
    }
}

/// This node's own standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalState {
    Member,
    Revoked,
    NotListed,
    CertificateExpired,
    CertificateNotYetValid,
    RosterExpired,
}

/// What the data plane holds, as read through the userspace API. The
/// interface's private key is compared by the driver and never reaches the
/// policy; preshared keys are zeroized on drop ([`uapi::Key`]).
#[derive(Clone, Debug, Default)]
pub struct DataPlaneView {
    /// The interface holds this node's WireGuard private key.
    pub interface_key_ok: bool,
    pub listen_port: u16,
    pub peers: BTreeMap<WgPublicKey, ViewPeer>,
}

#[derive(Clone, Debug, Default)]
pub struct ViewPeer {
    pub preshared_key: Option<uapi::Key>,
    pub allowed_ips: Vec<IpPrefix>,
    /// Seconds, 0 when off.
    pub persistent_keepalive: u16,
    pub last_handshake: Option<u64>,
    pub endpoint: Option<std::net::SocketAddr>,
}

impl DataPlaneView {
    /// Turns a `get` answer into a view; `own_key_matches` says whether its
    /// private key is ours (compared by the caller, then dropped).
    pub fn from_device(info: uapi::DeviceInfo, own_key_matches: bool) -> Self {
        let peers = info
            .peers
            .into_iter()
            .map(|p| {
                (
                    WgPublicKey(p.public_key.0),
                    ViewPeer {
                        preshared_key: p.preshared_key.clone(),
                        allowed_ips: p.allowed_ips.clone(),
                        persistent_keepalive: p.persistent_keepalive_interval,
                        last_handshake: p.last_handshake.map(|(s, _)| s),
                        endpoint: p.endpoint,
                    },
                )
            })
            .collect();
        Self {
            interface_key_ok: own_key_matches,
            listen_port: info.listen_port,
            peers,
        }
    }
}

/// One peer to put into the data plane.
#[derive(Clone, Debug)]
pub struct PeerInstall {
    pub node: NodeId,
    pub public_key: WgPublicKey,
    pub preshared_key: Psk,
    pub endpoint: Option<std::net::SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    pub persistent_keepalive: Option<u16>,
}

/// What the driver must do. Data-plane actions are performed in order, and
/// each one's result is fed back with [`MeshPolicy::action_done`].
#[derive(Clone, Debug)]
pub enum Action {
    /// Set the interface's private key and listen port.
    ConfigureInterface,
    /// Add or update a peer with its key.
    Install(PeerInstall),
    /// Remove a peer from the data plane.
    Remove(WgPublicKey),
    /// Read the data plane and feed it to [`MeshPolicy::observed`].
    ReadDataPlane,
    /// Start an exchange as initiator with this member; report with
    /// [`MeshPolicy::exchange_established`] or [`MeshPolicy::exchange_failed`].
    Dial(Box<Member>),
    /// Persist [`MeshPolicy::persisted`] (epochs, key times, roster serial).
    Persist,
}

/// What happened, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    Installed {
        name: String,
        epoch: u64,
        role: Role,
    },
    /// A key from an exchange was not installed: the roster changed under it.
    NotInstalled {
        name: String,
        why: &'static str,
    },
    Cut {
        name: String,
        reason: CutReason,
    },
    /// Something in the data plane that should not be there was removed.
    Removed {
        public_key: WgPublicKey,
    },
    /// The data plane had lost its interface key (restarted): restored.
    InterfaceRestored,
    LocalStateChanged {
        state: LocalState,
    },
    /// The roster lists a new certificate for this node (renewed or
    /// reissued by the authority, same keys): it is this node's now.
    CertificateRenewed {
        not_after: UnixTime,
    },
}

/// Per-pair facts that survive restarts (state.rs writes them).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairRecord {
    pub epoch: u64,
    /// Unix seconds when the current key was installed.
    pub installed_at: Option<UnixTime>,
}

/// A key this node holds for a peer.
struct Key {
    /// `None` for a key found in the data plane after a keyd restart: its
    /// age is known from the persisted record, its value is not.
    psk: Option<Psk>,
    public_key: WgPublicKey,
    /// Removed from the data plane once this passes.
    deadline: Instant,
}

enum Dial {
    /// This side does not dial (the peer has the lower node id).
    NotDialer,
    Idle {
        next: Instant,
    },
    InFlight,
}

struct Peer {
    member: Member,
    role: Role,
    state: PeerState,
    key: Option<Key>,
    record: PairRecord,
    dial: Dial,
    backoff: Duration,
    /// A short keepalive until then (see [`KICK`]).
    kick_until: Option<Instant>,
    last_error: Option<String>,
    exchanges_ok: u64,
    exchanges_failed: u64,
    dials_unanswered: u64,
    /// The edge ladder's relay socket while the peer is on a fallback rung
    /// (edge/): the data plane's endpoint for it instead of the roster's.
    path_endpoint: Option<std::net::SocketAddr>,
    /// The last relay it had: back on direct UDP, a data plane that roamed
    /// to it (the peer still relaying for a moment) is set straight, once.
    last_relay: Option<std::net::SocketAddr>,
    /// The deadline of the key last installed: while its successors fail to
    /// install, the data plane still holds it, and it must go at its own
    /// limit, not live on behind fresh keys that never reached the data
    /// plane.
    installed_deadline: Option<Instant>,
}

/// Counters for `keyd status` and the metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub peers_cut_at_hard_lifetime: u64,
    pub peers_cut_at_certificate_expiry: u64,
    pub peers_cut_revoked_or_unlisted: u64,
    pub removals_failed: u64,
    pub installs_failed: u64,
    pub installs_refused_roster_changed: u64,
    pub dataplane_reads_failed: u64,
    pub dataplane_restarts_healed: u64,
    pub unknown_peers_removed: u64,
}

pub struct MeshPolicy {
    config: PolicyConfig,
    me: NodeId,
    my_cert: NodeCert,
    roster: Arc<Roster>,
    local: LocalState,
    peers: BTreeMap<NodeId, Peer>,
    /// What the data plane holds, as last read and then changed by our own
    /// successful actions.
    view: Option<DataPlaneView>,
    /// The interface has held our key once: losing it later is a restart.
    configured_once: bool,
    /// The interface lost its key; counted and said once it is restored.
    restart_pending: bool,
    next_read: Instant,
    read_in_flight: bool,
    actions: VecDeque<Action>,
    events: VecDeque<PolicyEvent>,
    counters: Counters,
    /// Highest epoch used with any peer (the responder's msg2 value).
    max_epoch: u64,
    rng: u64,
}

impl MeshPolicy {
    /// `records` are the persisted per-pair facts; `seed` drives the jitter.
    pub fn new(
        config: PolicyConfig,
        my_cert: NodeCert,
        roster: Arc<Roster>,
        records: BTreeMap<NodeId, PairRecord>,
        seed: u64,
        now: Now,
    ) -> Self {
        let max_epoch = records.values().map(|r| r.epoch).max().unwrap_or(0);
        let mut policy = Self {
            config,
            me: my_cert.body().node_id,
            my_cert,
            roster: roster.clone(),
            local: LocalState::Member,
            peers: BTreeMap::new(),
            view: None,
            configured_once: false,
            restart_pending: false,
            next_read: now.mono,
            read_in_flight: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            max_epoch,
            rng: seed | 1,
        };
        policy.apply_roster(roster, now);
        for (id, record) in records {
            if let Some(p) = policy.peers.get_mut(&id) {
                p.record = record;
            }
        }
        policy.handle_timeout(now);
        policy
    }

    // ----- inputs -------------------------------------------------------

    /// A new verified roster (the caller checked signature and rollback).
    pub fn set_roster(&mut self, roster: Arc<Roster>, now: Now) {
        self.apply_roster(roster, now);
        self.actions.push_back(Action::Persist);
        self.reconcile(now);
    }

    /// This node's certificate as the policy holds it (the roster's newest).
    /// The edge ladder moved the peer to another rung: `Some(relay)` while
    /// on a fallback rung, `None` back on direct UDP. An installed peer gets
    /// its new endpoint at once; later installs keep it.
    pub fn set_path_endpoint(
        &mut self,
        id: NodeId,
        endpoint: Option<std::net::SocketAddr>,
        now: Now,
    ) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.path_endpoint == endpoint {
            return;
        }
        p.path_endpoint = endpoint;
        p.last_relay = endpoint.or(p.last_relay);
        let Some(Key {
            psk: Some(psk),
            public_key,
            ..
        }) = &p.key
        else {
            return;
        };
        let install = PeerInstall {
            node: id,
            public_key: *public_key,
            preshared_key: psk.clone(),
            endpoint: p.endpoint(),
            allowed_ips: allowed_ips(&p.member.cert),
            persistent_keepalive: p.keepalive(&self.config, now),
        };
        self.actions.push_back(Action::Install(install));
    }

    pub fn my_cert(&self) -> &NodeCert {
        &self.my_cert
    }

    /// Whether the data plane has held this node's key and port since it
    /// was last seen (keyd's readiness).
    pub fn interface_configured(&self) -> bool {
        self.configured_once
    }

    /// What the data plane holds now.
    pub fn observed(&mut self, view: DataPlaneView, now: Now) {
        self.read_in_flight = false;
        self.adopt_unknown_keys(&view, now);
        self.view = Some(view);
        self.reconcile(now);
    }

    /// The data plane could not be read (it is down or restarting).
    pub fn observe_failed(&mut self, now: Now) {
        self.read_in_flight = false;
        self.counters.dataplane_reads_failed += 1;
        self.view = None;
        self.next_read = now.mono + RECONCILE_INTERVAL;
    }

    /// An exchange (either role) agreed `psk` for `epoch` with `cert`'s node.
    /// Installed only if that exact certificate is still a valid, unrevoked
    /// member of the roster held now.
    pub fn exchange_established(
        &mut self,
        cert: &NodeCert,
        epoch: u64,
        psk: Psk,
        role: Role,
        now: Now,
    ) {
        let id = cert.body().node_id;
        let name = text::sanitize(&cert.body().name, text::NAME_MAX);
        let refusal = match self.peers.get(&id) {
            _ if self.local != LocalState::Member => Some("this node is not a valid member"),
            None => Some("it is not an unrevoked member of the current roster"),
            Some(p) if p.member.cert.fingerprint() != cert.fingerprint() => {
                Some("the roster now lists another certificate for it")
            }
            Some(p) => self.member_refusal(&p.member, now).map(CutReason::describe),
        };
        if let Some(why) = refusal {
            self.counters.installs_refused_roster_changed += 1;
            self.events
                .push_back(PolicyEvent::NotInstalled { name, why });
            if let Some(p) = self.peers.get_mut(&id) {
                p.dial_after_failure(now, &self.config);
            }
            return;
        }
        let limit = self.config.key_limit();
        let interval = self.config.rotation_interval;
        let jitter = self.jitter(interval);
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let install = PeerInstall {
            node: id,
            public_key: cert.body().wg_public,
            preshared_key: psk.clone(),
            endpoint: p.endpoint(),
            allowed_ips: allowed_ips(cert),
            persistent_keepalive: p.keepalive(&self.config, now),
        };
        p.key = Some(Key {
            psk: Some(psk),
            public_key: cert.body().wg_public,
            deadline: now.mono + limit,
        });
        p.record = PairRecord {
            epoch,
            installed_at: Some(now.unix),
        };
        p.state = PeerState::Up;
        p.role = role;
        p.last_error = None;
        p.exchanges_ok += 1;
        if !matches!(p.dial, Dial::NotDialer) {
            p.dial = Dial::Idle {
                next: now.mono + jitter,
            };
        }
        self.max_epoch = self.max_epoch.max(epoch);
        self.events
            .push_back(PolicyEvent::Installed { name, epoch, role });
        self.actions.push_back(Action::Install(install));
        self.actions.push_back(Action::Persist);
    }

    /// An exchange failed. `peer` is known when this side dialled it, or
    /// when the peer got far enough to identify itself.
    /// `Failure::NoAnswer`: the peer's keyd did not answer at all (not
    /// started yet, or unreachable), so no exchange began; counted apart.
    pub fn exchange_failed(
        &mut self,
        peer: Option<NodeId>,
        failure: Failure,
        error: &str,
        now: Now,
    ) {
        let Some(p) = peer.and_then(|id| self.peers.get_mut(&id)) else {
            return;
        };
        match failure {
            Failure::Exchange => p.exchanges_failed += 1,
            Failure::NoAnswer => p.dials_unanswered += 1,
        }
        p.last_error = Some(text::sanitize(error, text::ERROR_MAX));
        if p.state == PeerState::Up {
            p.state = PeerState::Retrying;
        }
        match failure {
            Failure::Exchange => p.dial_after_failure(now, &self.config),
            // Nobody answered, so nobody did any work: try again soon,
            // without growing the wait, so that a peer that is starting
            // (a mesh coming up at once) is reached as soon as it listens.
            // A dead peer costs a few unanswered packets per try.
            Failure::NoAnswer => {
                if !matches!(p.dial, Dial::NotDialer) {
                    p.dial = Dial::Idle {
                        next: now.mono + MIN_BACKOFF,
                    };
                }
            }
        }
    }

    /// The result of a data-plane action.
    pub fn action_done(&mut self, action: &Action, result: Result<(), String>, now: Now) {
        match (action, result) {
            (Action::ConfigureInterface, Ok(())) => {
                self.configured_once = true;
                if std::mem::take(&mut self.restart_pending) {
                    self.counters.dataplane_restarts_healed += 1;
                    self.events.push_back(PolicyEvent::InterfaceRestored);
                }
                if let Some(v) = self.view.as_mut() {
                    v.interface_key_ok = true;
                    v.listen_port = self.config.listen_port;
                }
            }
            (Action::Install(i), Ok(())) => {
                if let Some(p) = self.peers.get_mut(&i.node) {
                    p.backoff = MIN_BACKOFF;
                    p.installed_deadline = p
                        .key
                        .as_ref()
                        .filter(|k| k.psk.as_ref() == Some(&i.preshared_key))
                        .map(|k| k.deadline);
                }
                if let Some(v) = self.view.as_mut() {
                    v.peers.insert(
                        i.public_key,
                        ViewPeer {
                            preshared_key: Some(uapi::Key(*i.preshared_key.as_bytes())),
                            allowed_ips: i.allowed_ips.clone(),
                            persistent_keepalive: i.persistent_keepalive.unwrap_or(0),
                            last_handshake: None,
                            endpoint: i.endpoint,
                        },
                    );
                }
            }
            (Action::Remove(key), Ok(())) => {
                if let Some(v) = self.view.as_mut() {
                    v.peers.remove(key);
                }
                // A key left behind by failed installs, gone at its limit.
                let expired = self.peers.values_mut().find(|p| {
                    p.member.cert.body().wg_public == *key
                        && p.installed_deadline.is_some_and(|d| now.mono >= d)
                });
                if let Some(p) = expired {
                    p.installed_deadline = None;
                    self.counters.peers_cut_at_hard_lifetime += 1;
                }
            }
            (Action::Install(i), Err(e)) => {
                // The key stays ours; the next reconcile retries the install,
                // and the next exchange waits longer.
                self.counters.installs_failed += 1;
                if let Some(p) = self.peers.get_mut(&i.node) {
                    p.last_error = Some(text::sanitize(
                        &format!("installing the key failed: {e}"),
                        text::ERROR_MAX,
                    ));
                    p.dial_after_failure(now, &self.config);
                }
                self.view = None;
            }
            (Action::Remove(_), Err(_)) => {
                // Retried at the next read: the view still shows it.
                self.counters.removals_failed += 1;
                self.view = None;
            }
            (Action::ReadDataPlane, Err(_)) => self.observe_failed(now),
            (_, Err(_)) => self.view = None,
            _ => {}
        }
    }

    /// Timers: dials that are due, key and certificate expiry, the next read.
    pub fn handle_timeout(&mut self, now: Now) {
        self.refresh_local(now);
        let local_ok = self.local == LocalState::Member;
        let mut expired = Vec::new();
        let mut in_flight = self.dials_in_flight();
        for (id, p) in &mut self.peers {
            if p.kick_until.is_some_and(|until| now.mono >= until) {
                p.kick_until = None;
            }
            if let Some(k) = &p.key
                && now.mono >= k.deadline
            {
                expired.push(*id);
            }
            if local_ok
                && in_flight < self.config.max_dials_in_flight
                && let Dial::Idle { next } = p.dial
                && now.mono >= next
                && p.member_refusal_reason(&self.roster, now, self.config.max_clock_skew)
                    .is_none()
            {
                in_flight += 1;
                p.dial = Dial::InFlight;
                self.actions
                    .push_back(Action::Dial(Box::new(p.member.clone())));
            }
        }
        for id in expired {
            if let Some(p) = self.peers.get_mut(&id) {
                p.key = None;
                // The whole peer goes (counted here, once).
                p.installed_deadline = None;
                self.counters.peers_cut_at_hard_lifetime += 1;
                p.state = PeerState::Cut(CutReason::HardLifetime);
                self.events.push_back(PolicyEvent::Cut {
                    name: text::sanitize(&p.member.cert.body().name, text::NAME_MAX),
                    reason: CutReason::HardLifetime,
                });
            }
        }
        self.reconcile(now);
        if !self.read_in_flight && now.mono >= self.next_read {
            self.read_in_flight = true;
            self.next_read = now.mono + RECONCILE_INTERVAL;
            self.actions.push_back(Action::ReadDataPlane);
        }
    }

    // ----- outputs ------------------------------------------------------

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PolicyEvent> {
        self.events.pop_front()
    }

    /// The next instant [`Self::handle_timeout`] has work to do.
    pub fn poll_timeout(&self, now: Now) -> Instant {
        let skew = self.config.max_clock_skew;
        // A read in flight is answered by the driver, whatever happens.
        let mut t = Instant::max(now.mono, self.next_read);
        if self.read_in_flight {
            t = now.mono + Duration::from_secs(3600);
        }
        // Only what handle_timeout would act on counts: a due dial that it
        // would skip (this node not a member, the peer refused, no room)
        // must not wake it again and again.
        let local_ok = self.local == LocalState::Member;
        let may_dial = local_ok && self.dials_in_flight() < self.config.max_dials_in_flight;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        for p in self.peers.values() {
            let body = p.member.cert.body();
            match p.member_refusal_reason(&self.roster, now, skew) {
                None => {
                    if let Dial::Idle { next } = p.dial
                        && may_dial
                    {
                        consider(Some(next));
                    }
                }
                Some(CutReason::CertificateNotYetValid) => {
                    consider(now.at_unix(body.not_before.saturating_sub(skew)));
                }
                Some(_) => {}
            }
            consider(p.kick_until);
            if let Some(k) = &p.key {
                consider(Some(k.deadline));
                consider(now.at_unix(body.not_after.saturating_add(skew).saturating_add(1)));
            }
        }
        if local_ok {
            let mine = self.my_cert.body().not_after;
            consider(now.at_unix(mine.saturating_add(skew).saturating_add(1)));
            let roster = self.roster.not_after();
            consider(now.at_unix(roster.saturating_add(skew).saturating_add(1)));
        }
        t.max(now.mono)
    }

    pub fn roster(&self) -> &Arc<Roster> {
        &self.roster
    }

    pub fn local_state(&self) -> LocalState {
        self.local
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Highest epoch used with any peer, and each peer's last epoch: what an
    /// exchange needs to refuse a key that does not advance.
    pub fn epochs(&self) -> (u64, BTreeMap<NodeId, u64>) {
        let per_peer = self
            .peers
            .iter()
            .map(|(id, p)| (*id, p.record.epoch))
            .collect();
        (self.max_epoch, per_peer)
    }

    /// When this node next dials `id` (`None`: it does not, or a dial is
    /// in flight).
    pub fn next_exchange(&self, id: &NodeId) -> Option<Instant> {
        match self.peers.get(id)?.dial {
            Dial::Idle { next } => Some(next),
            _ => None,
        }
    }

    /// The last epoch used with one peer.
    pub fn epoch_with(&self, id: &NodeId) -> u64 {
        self.peers.get(id).map_or(0, |p| p.record.epoch)
    }

    /// What state.rs persists.
    pub fn persisted(&self) -> BTreeMap<NodeId, PairRecord> {
        self.peers
            .iter()
            .filter(|(_, p)| p.record != PairRecord::default())
            .map(|(id, p)| (*id, p.record.clone()))
            .collect()
    }

    /// One line per listed peer, for `keyd status`.
    pub fn peer_status(&self, now: Now) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|(id, p)| {
                let view = self
                    .view
                    .as_ref()
                    .and_then(|v| v.peers.get(&p.member.cert.body().wg_public));
                PeerStatus {
                    name: text::sanitize(&p.member.cert.body().name, text::NAME_MAX),
                    node_id: id.to_string(),
                    state: p.state,
                    role: p.role,
                    epoch: p.record.epoch,
                    last_exchange: p.record.installed_at,
                    key_age_secs: p
                        .key
                        .as_ref()
                        .and(p.record.installed_at)
                        .map(|t| now.unix.saturating_sub(t)),
                    in_dataplane: self.view.as_ref().map(|_| view.is_some()),
                    last_handshake: view.and_then(|v| v.last_handshake),
                    last_error: p.last_error.clone(),
                    exchanges_ok: p.exchanges_ok,
                    exchanges_failed: p.exchanges_failed,
                    dials_unanswered: p.dials_unanswered,
                    path: None,
                    last_result: None,
                }
            })
            .collect()
    }

    /// Peers in the data plane that are not listed members (as last read).
    pub fn unlisted_in_dataplane(&self) -> usize {
        let listed: BTreeSet<WgPublicKey> = self
            .peers
            .values()
            .map(|p| p.member.cert.body().wg_public)
            .collect();
        self.view.as_ref().map_or(0, |v| {
            v.peers.keys().filter(|k| !listed.contains(k)).count()
        })
    }

    pub fn dataplane_reachable(&self) -> bool {
        self.view.is_some()
    }

    // ----- internals ----------------------------------------------------

    fn dials_in_flight(&self) -> usize {
        self.peers
            .values()
            .filter(|p| matches!(p.dial, Dial::InFlight))
            .count()
    }

    /// Uniform in [0, 1).
    fn random(&mut self) -> f64 {
        // xorshift64: deterministic for tests, seeded from the OS in keyd.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        let r = self.random();
        d.mul_f64(0.9 + 0.2 * r)
    }

    fn member_refusal(&self, m: &Member, now: Now) -> Option<CutReason> {
        member_refusal(&self.roster, m, now, self.config.max_clock_skew)
    }

    fn apply_roster(&mut self, roster: Arc<Roster>, now: Now) {
        self.roster = roster.clone();
        // A verified roster vouches for every certificate it lists; one for
        // this node id carries this node's keys (the id derives from them).
        if let Some(m) = roster.member(&self.me)
            && m.cert != self.my_cert
            && m.cert.body().not_before >= self.my_cert.body().not_before
            && !roster.revokes(&m.cert)
        {
            self.my_cert = m.cert.clone();
            self.events.push_back(PolicyEvent::CertificateRenewed {
                not_after: m.cert.body().not_after,
            });
        }
        let listed: BTreeMap<NodeId, &Member> = roster
            .members()
            .iter()
            .map(|m| (m.cert.body().node_id, m))
            .filter(|(id, _)| *id != self.me)
            .collect();
        for (id, p) in &mut self.peers {
            if !listed.contains_key(id) && p.key.take().is_some() {
                self.counters.peers_cut_revoked_or_unlisted += 1;
                p.state = PeerState::Cut(CutReason::NotListed);
                self.events.push_back(PolicyEvent::Cut {
                    name: text::sanitize(&p.member.cert.body().name, text::NAME_MAX),
                    reason: CutReason::NotListed,
                });
            }
        }
        self.peers.retain(|id, _| listed.contains_key(id));
        // First contacts spread over up to 20 ms per member (at most half
        // an interval), so a mesh that starts at once does not dial at once.
        let spread = (Duration::from_millis(20) * listed.len() as u32)
            .min(self.config.rotation_interval / 2);
        let firsts: Vec<Duration> = listed
            .keys()
            .map(|_| spread.mul_f64(self.random()))
            .collect();
        for ((id, m), first) in listed.into_iter().zip(firsts) {
            let role = if self.me < id {
                Role::Initiator
            } else {
                Role::Responder
            };
            let p = self.peers.entry(id).or_insert_with(|| Peer {
                member: m.clone(),
                role,
                state: PeerState::Connecting,
                key: None,
                record: PairRecord::default(),
                dial: if role == Role::Initiator {
                    Dial::Idle {
                        next: now.mono + first,
                    }
                } else {
                    Dial::NotDialer
                },
                backoff: MIN_BACKOFF,
                kick_until: None,
                last_error: None,
                exchanges_ok: 0,
                exchanges_failed: 0,
                dials_unanswered: 0,
                path_endpoint: None,
                last_relay: None,
                installed_deadline: None,
            });
            if p.member.cert.fingerprint() != m.cert.fingerprint() {
                // A renewed certificate: agree a key under it at once. A key
                // for other WireGuard keys goes now; one for the same keys
                // keeps the tunnel up until the new exchange replaces it.
                if p.member.cert.body().wg_public != m.cert.body().wg_public {
                    p.key = None;
                    p.state = PeerState::Connecting;
                }
                if let Dial::Idle { next } = &mut p.dial {
                    *next = now.mono;
                }
            }
            p.member = m.clone();
        }
        self.refresh_local(now);
    }

    /// Re-evaluates this node's own standing and every peer's validity.
    fn refresh_local(&mut self, now: Now) {
        let skew = self.config.max_clock_skew;
        let mine = self.my_cert.body();
        let local = if self.roster.check_fresh(now.unix, skew).is_err() {
            LocalState::RosterExpired
        } else if self.roster.revokes(&self.my_cert) {
            LocalState::Revoked
        } else if self
            .roster
            .member(&self.me)
            .is_none_or(|m| m.cert.fingerprint() != self.my_cert.fingerprint())
        {
            LocalState::NotListed
        } else if now.unix > mine.not_after.saturating_add(skew) {
            LocalState::CertificateExpired
        } else if now.unix.saturating_add(skew) < mine.not_before {
            LocalState::CertificateNotYetValid
        } else {
            LocalState::Member
        };
        if local != self.local {
            self.local = local;
            self.events
                .push_back(PolicyEvent::LocalStateChanged { state: local });
        }
        for p in self.peers.values_mut() {
            let reason = if local != LocalState::Member {
                Some(CutReason::LocalNodeInvalid)
            } else {
                p.member_refusal_reason(&self.roster, now, skew)
            };
            if let Some(reason) = reason
                && (p.key.is_some() || !matches!(p.state, PeerState::Cut(_)))
            {
                let had_key = p.key.take().is_some();
                p.state = PeerState::Cut(reason);
                if had_key {
                    match reason {
                        CutReason::CertificateExpired | CutReason::CertificateNotYetValid => {
                            self.counters.peers_cut_at_certificate_expiry += 1
                        }
                        _ => self.counters.peers_cut_revoked_or_unlisted += 1,
                    }
                    self.events.push_back(PolicyEvent::Cut {
                        name: text::sanitize(&p.member.cert.body().name, text::NAME_MAX),
                        reason,
                    });
                }
            } else if reason.is_none()
                && matches!(p.state, PeerState::Cut(r) if r != CutReason::HardLifetime)
            {
                // Valid again (a new roster, our own renewal): start over.
                p.state = PeerState::Connecting;
                if let Dial::InFlight = p.dial {
                } else if p.role == Role::Initiator {
                    p.dial = Dial::Idle { next: now.mono };
                }
            }
        }
    }

    /// After a keyd restart, peers already in the data plane are tracked
    /// with the age their persisted record gives, so they are cut on time;
    /// a key of unknown age is treated as installed now.
    fn adopt_unknown_keys(&mut self, view: &DataPlaneView, now: Now) {
        let limit = self.config.key_limit();
        for p in self.peers.values_mut() {
            let wg = p.member.cert.body().wg_public;
            if p.key.is_some() || matches!(p.state, PeerState::Cut(_)) {
                continue;
            }
            if view.peers.contains_key(&wg) {
                let age = p.record.installed_at.map_or(Duration::ZERO, |t| {
                    Duration::from_secs(now.unix.saturating_sub(t))
                });
                let remaining = limit.saturating_sub(age);
                p.key = Some(Key {
                    psk: None,
                    public_key: wg,
                    deadline: now.mono + remaining,
                });
                p.installed_deadline = Some(now.mono + remaining);
                p.state = PeerState::Up;
            }
        }
    }

    /// Makes the data plane (as last seen) equal to the desired state.
    fn reconcile(&mut self, now: Now) {
        let Some(view) = &self.view else {
            return;
        };
        let mut actions = Vec::new();
        if view.interface_key_ok {
            self.configured_once = true;
        }
        if !view.interface_key_ok || view.listen_port != self.config.listen_port {
            if !view.interface_key_ok && self.configured_once {
                self.restart_pending = true;
                for p in self.peers.values_mut() {
                    p.kick_until = Some(now.mono + KICK);
                }
            }
            actions.push(Action::ConfigureInterface);
        }
        let mut desired = BTreeSet::new();
        for p in self.peers.values_mut() {
            let Some(k) = &p.key else { continue };
            desired.insert(k.public_key);
            let in_view = view.peers.get(&k.public_key);
            let Some(psk) = &k.psk else {
                if in_view.is_none() {
                    // An adopted key whose value we never knew is gone from
                    // the data plane (it restarted): wait for a new exchange.
                    p.key = None;
                    p.state = PeerState::Connecting;
                    desired.remove(&p.member.cert.body().wg_public);
                    if let Dial::Idle { next } = &mut p.dial {
                        *next = (*next).min(now.mono);
                    }
                }
                continue;
            };
            // The data plane holds an older key of ours (the current one
            // failed to install) that has reached its limit: out it goes;
            // the current key is installed once the data plane takes it.
            let held_older = in_view
                .and_then(|v| v.preshared_key.as_ref())
                .is_some_and(|held| held.0 != *psk.as_bytes());
            // (Until the removal is seen done: a failed one is tried again.)
            if held_older && p.installed_deadline.is_some_and(|d| now.mono >= d) {
                desired.remove(&k.public_key);
                continue;
            }
            let ips = allowed_ips(&p.member.cert);
            let keepalive = p.keepalive(&self.config, now);
            let same = in_view.is_some_and(|v| {
                v.preshared_key
                    .as_ref()
                    .is_some_and(|k| k.0 == *psk.as_bytes())
                    && sorted(&v.allowed_ips) == sorted(&ips)
                    && v.persistent_keepalive == keepalive.unwrap_or(0)
                    // Roaming may move a roster endpoint; a relay endpoint
                    // is ours to keep.
                    && (p.path_endpoint.is_none() || v.endpoint == p.path_endpoint)
                    && (p.path_endpoint.is_some()
                        || p.last_relay.is_none()
                        || v.endpoint != p.last_relay)
            });
            if !same {
                // Set straight once: if the peer keeps relaying, roaming
                // follows its packets and is left alone from then on.
                if p.path_endpoint.is_none() {
                    p.last_relay = None;
                }
                actions.push(Action::Install(PeerInstall {
                    node: p.member.cert.body().node_id,
                    public_key: k.public_key,
                    preshared_key: psk.clone(),
                    endpoint: p.endpoint(),
                    allowed_ips: ips,
                    persistent_keepalive: keepalive,
                }));
            }
        }
        for key in view.peers.keys() {
            if !desired.contains(key) {
                let listed = self
                    .peers
                    .values()
                    .any(|p| p.member.cert.body().wg_public == *key);
                if !listed {
                    self.counters.unknown_peers_removed += 1;
                }
                self.events
                    .push_back(PolicyEvent::Removed { public_key: *key });
                actions.push(Action::Remove(*key));
            }
        }
        self.actions.extend(actions);
    }
}

impl Peer {
    /// Where the data plane sends this peer's packets.
    fn endpoint(&self) -> Option<std::net::SocketAddr> {
        self.path_endpoint.or(self.member.wg_endpoint)
    }

    /// The keepalive this peer should have now.
    fn keepalive(&self, config: &PolicyConfig, now: Now) -> Option<u16> {
        match self.kick_until {
            Some(until) if now.mono < until => Some(1),
            _ => config.persistent_keepalive,
        }
    }

    fn member_refusal_reason(&self, roster: &Roster, now: Now, skew: u64) -> Option<CutReason> {
        member_refusal(roster, &self.member, now, skew)
    }

    fn dial_after_failure(&mut self, now: Now, config: &PolicyConfig) {
        if matches!(self.dial, Dial::NotDialer) {
            return;
        }
        self.dial = Dial::Idle {
            next: now.mono + self.backoff,
        };
        self.backoff = (self.backoff * 2)
            .min(config.rotation_interval / 2)
            .max(MIN_BACKOFF);
    }
}

/// Why a listed member may not hold a key now, if it may not.
fn member_refusal(roster: &Roster, m: &Member, now: Now, skew: u64) -> Option<CutReason> {
    let body = m.cert.body();
    if roster.revokes(&m.cert) {
        Some(CutReason::Revoked)
    } else if now.unix > body.not_after.saturating_add(skew) {
        Some(CutReason::CertificateExpired)
    } else if now.unix.saturating_add(skew) < body.not_before {
        Some(CutReason::CertificateNotYetValid)
    } else {
        None
    }
}

/// A member's allowed IPs in the data plane: its certificate's addresses
/// as host routes (the firewall's peer lookup uses the same).
pub fn allowed_ips(cert: &NodeCert) -> Vec<IpPrefix> {
    cert.body().addresses.iter().map(|a| a.host()).collect()
}

fn sorted(ips: &[IpPrefix]) -> Vec<IpPrefix> {
    let mut v = ips.to_vec();
    v.sort_by_key(|p| (p.addr, p.len));
    v
}

/// One peer as `keyd status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: String,
    pub state: PeerState,
    pub role: Role,
    pub epoch: u64,
    /// Unix seconds of the last key agreed.
    pub last_exchange: Option<u64>,
    pub key_age_secs: Option<u64>,
    /// Whether the data plane holds this peer, as last read (`None`: the
    /// data plane could not be read).
    pub in_dataplane: Option<bool>,
    /// The data plane's last WireGuard handshake with it (Unix seconds).
    pub last_handshake: Option<u64>,
    pub last_error: Option<String>,
    pub exchanges_ok: u64,
    pub exchanges_failed: u64,
    /// Dials its keyd did not answer at all (no exchange began).
    pub dials_unanswered: u64,
    /// The edge ladder's path to it (filled in by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<crate::edge::PathStatus>,
    /// The last exchange with it since keyd started: `ok`, or the failure's
    /// reason label (filled in by the daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
