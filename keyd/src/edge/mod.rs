//! The fallback ladder for edge networks (issue 12): per peer pair, direct
//! WireGuard UDP first, then WireGuard packets in QUIC datagrams on the
//! keyds' connection, then the same over TLS on TCP. See docs/edge.md.
//!
//! The decisions are [`ladder::Ladder`]'s (sans-IO); this module only drives
//! it: one task per peer sends the probes it asks for, feeds back their
//! outcomes and asks the daemon to point the data plane at the relay
//! ([`Request::Endpoint`]) or to open a carrier ([`Request::Connect`]).

pub mod backoff;
pub mod batch;
pub mod frame;
pub mod ladder;
pub mod pack;
pub mod prober;
pub mod relay;
pub mod tcp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::identity::NodeId;
use mesh_proto::roster::Roster;
use tokio::sync::mpsc;
use tracing::{info, warn};

use ladder::{Ladder, LadderConfig, LadderStatus, Outcome, Rung};
use prober::Prober;
use relay::PeerPath;

/// How often each side tells the other what its data plane can do: every
/// second until the peer's answer is known, then this often.
const HELLO_INTERVAL: Duration = Duration::from_secs(5);
const HELLO_EAGER: Duration = Duration::from_secs(1);
/// A new path leaves its carriers to the policy's first exchange this long.
const CARRIER_GRACE: Duration = Duration::from_secs(3);
/// A ladder that is off (a data plane without probes, no pin) looks again
/// this often.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// Our own data plane is probed on loopback this often: a data plane that
/// was restarted or replaced may have gained or lost path probes.
const SELF_PROBE_INTERVAL: Duration = Duration::from_secs(30);
const SELF_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Misses in a row (2 s apart) before our data plane counts as probe-less.
const SELF_PROBE_MISSES: u32 = 3;

/// What the ladder needs the daemon to do.
#[derive(Debug)]
pub enum Request {
    /// Open (this side dials) the carrier of `rung` to `peer` and run an
    /// exchange bound to it.
    Connect { peer: NodeId, rung: Rung },
    /// Point the data plane's endpoint for `peer` at this address
    /// (`None`: back to the roster's).
    Endpoint {
        peer: NodeId,
        endpoint: Option<SocketAddr>,
    },
}

/// A peer's path as `keyd status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PathStatus {
    pub rung: Rung,
    /// Whether the ladder runs for this peer (both data planes answer path
    /// probes, or a rung is pinned); off, the peer stays on direct UDP.
    pub ladder: bool,
    pub rtt_ms: serde_json::Value,
    pub changes: u64,
    pub last_change: serde_json::Value,
    /// Packets relayed to / from the peer keyd over quic and tcp.
    pub relayed_out: u64,
    pub relayed_in: u64,
    /// The same per rung: `[to the peer, from the peer]`.
    pub quic_packets: [u64; 2],
    pub tcp_packets: [u64; 2],
    /// The peer's keyd takes PACKED datagrams: what goes to it on quic is
    /// packed (docs/edge.md, "MTU"); otherwise a datagram per packet or
    /// its fragments.
    #[serde(default)]
    pub packed: bool,
    /// Packets from the peer lost because a PACKED datagram they spanned
    /// was lost or reordered.
    #[serde(default)]
    pub packed_partials_lost: u64,
    /// Datagrams from the peer that came after later ones (their whole
    /// packets still delivered).
    #[serde(default)]
    pub packed_late: u64,
    /// Packets that came as fragments (from an older keyd, or from any
    /// before its HELLO) and never became whole (evicted or expired in
    /// reassembly).
    #[serde(default)]
    pub fragments_lost: u64,
    /// Packets and datagrams the relay dropped, by reason.
    #[serde(default)]
    pub dropped: PathDrops,
}

/// What a path's relay dropped since keyd started (relay.rs, PathCounters).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PathDrops {
    /// Data-plane packets no carrier could take (none open, or its queue
    /// full).
    pub no_carrier: u64,
    /// Datagrams from the peer keyd that were not a relay payload,
    /// fragments and PACKED bodies refused, and datagrams sent to the
    /// relay socket from a local address other than the data plane's.
    pub malformed: u64,
    /// Data-plane packets too large to carry.
    pub too_big: u64,
    /// Packets from the peer that the local data plane's socket did not
    /// take (its buffer full).
    pub dataplane_full: u64,
}

impl PathDrops {
    /// Every reason with its count, in the order metrics list them.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        [
            ("no_carrier", self.no_carrier),
            ("malformed", self.malformed),
            ("too_big", self.too_big),
            ("dataplane_full", self.dataplane_full),
        ]
    }
}

/// A path's tasks (relay, ladder, carrier readers), stopped with it.
type Tasks = Vec<tokio::task::JoinHandle<()>>;

pub struct Edge {
    config: LadderConfig,
    local: NodeId,
    /// The local data plane on loopback (the relay's target).
    dataplane: SocketAddr,
    /// Probes our own data plane from loopback: mesh-node answers loopback
    /// sources outside the rate limit that flooders share, so a flood of
    /// probes from outside cannot make this node look probe-less.
    self_prober: Prober,
    prober: Prober,
    self_answers: AtomicBool,
    paths: Mutex<HashMap<NodeId, (Arc<PeerPath>, Tasks)>>,
    /// The data-path thread's runtime: the relays run there, beside
    /// quinn's drivers (datapath_thread.rs).
    datapath: tokio::runtime::Handle,
    pub connector: tokio_rustls::TlsConnector,
    pub acceptor: tokio_rustls::TlsAcceptor,
    requests: mpsc::Sender<Request>,
    /// Carriers that failed to open wait before the next try.
    connects: Mutex<HashMap<(NodeId, Rung), backoff::ConnectBackoff>>,
}

impl Edge {
    pub async fn new(
        config: LadderConfig,
        local: NodeId,
        wg_listen_port: u16,
        probe_from: IpAddr,
        requests: mpsc::Sender<Request>,
        datapath: tokio::runtime::Handle,
    ) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        let (connector, acceptor) = tcp::tls()?;
        let prober = Prober::bind(SocketAddr::new(probe_from, 0)).await?;
        let self_prober = Prober::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
        let edge = Arc::new(Self {
            config,
            local,
            dataplane: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), wg_listen_port),
            self_prober,
            prober,
            self_answers: AtomicBool::new(false),
            paths: Mutex::new(HashMap::new()),
            datapath,
            connector,
            acceptor,
            requests,
            connects: Mutex::new(HashMap::new()),
        });
        tokio::spawn(self_probe(Arc::downgrade(&edge)));
        Ok(edge)
    }

    /// Makes the paths match the roster's members: new members get a
    /// path, departed ones lose theirs (carriers closed, tasks stopped).
    pub async fn sync(self: &Arc<Self>, roster: &Roster) {
        let members: HashMap<NodeId, _> = roster
            .members()
            .iter()
            .map(|m| (m.cert.body().node_id, m))
            .filter(|(id, _)| *id != self.local)
            .collect();
        let gone: Vec<_> = {
            let mut paths = lock(&self.paths);
            let gone = paths
                .keys()
                .filter(|id| !members.contains_key(id))
                .copied()
                .collect::<Vec<_>>();
            gone.iter().filter_map(|id| paths.remove(id)).collect()
        };
        for (path, tasks) in gone {
            path.close();
            for t in tasks {
                t.abort();
            }
        }
        // A member that leaves and comes back starts without the backoff
        // of its last life, and the map holds only members.
        lock(&self.connects).retain(|(id, _), _| members.contains_key(id));
        for (id, m) in members {
            let existing = lock(&self.paths).get(&id).map(|(p, _)| p.clone());
            let path = match existing {
                Some(p) => p,
                None => {
                    let ladder = Ladder::new(self.config.clone(), Instant::now());
                    let path = match PeerPath::new(id, self.dataplane, ladder, &self.datapath) {
                        Ok(p) => Arc::new(p),
                        Err(e) => {
                            warn!("edge: cannot open a relay socket: {e}");
                            continue;
                        }
                    };
                    let tasks = vec![
                        path.spawn_relay(),
                        tokio::spawn(drive(Arc::downgrade(self), path.clone())),
                    ];
                    lock(&self.paths).insert(id, (path.clone(), tasks));
                    path
                }
            };
            *lock(&path.name) = crate::text::sanitize(&m.cert.body().name, crate::text::NAME_MAX);
            *lock(&path.direct) = m.wg_endpoint;
            *lock(&path.keyd) = m.keyd_endpoint;
        }
    }

    /// The data-path thread's runtime (carriers' sockets and tasks).
    pub fn datapath(&self) -> &tokio::runtime::Handle {
        &self.datapath
    }

    pub fn path(&self, id: &NodeId) -> Option<Arc<PeerPath>> {
        lock(&self.paths).get(id).map(|(p, _)| p.clone())
    }

    /// An exchange bound to `conn` succeeded with `peer`: its datagrams are
    /// the peer's from now on.
    pub fn attach_quic(&self, peer: NodeId, conn: &quinn::Connection) {
        let Some(path) = self.path(&peer) else { return };
        if path.attach_quic(conn) {
            let reader = path.spawn_reader(conn);
            if let Some((_, tasks)) = lock(&self.paths).get_mut(&peer) {
                tasks.retain(|t| !t.is_finished());
                tasks.push(reader);
            }
            path.send_hello(self.self_answers.load(Ordering::Relaxed));
        }
    }

    /// The same for a TLS/TCP link.
    pub fn attach_tcp(&self, peer: NodeId, link: &Arc<tcp::TcpLink>) {
        let Some(path) = self.path(&peer) else {
            link.close();
            return;
        };
        path.attach_tcp(link);
        path.send_hello(self.self_answers.load(Ordering::Relaxed));
    }

    /// This side dials the pair's carriers (the same rule as exchanges:
    /// the lower node id).
    fn dials(&self, peer: &NodeId) -> bool {
        self.local < *peer
    }

    pub fn status(&self, id: &NodeId) -> Option<PathStatus> {
        let path = self.path(id)?;
        let on = self.active(&path);
        let s: LadderStatus = lock(&path.ladder).status(Instant::now());
        let c = &path.counters;
        let get = |a: &[std::sync::atomic::AtomicU64; 3], i: usize| a[i].load(Ordering::Relaxed);
        let sum = |a: &[std::sync::atomic::AtomicU64; 3]| get(a, 1) + get(a, 2);
        Some(PathStatus {
            rung: path.rung(),
            ladder: on,
            rtt_ms: serde_json::to_value(s.rtt_ms).unwrap_or_default(),
            changes: s.changes,
            last_change: serde_json::to_value(s.last_change).unwrap_or_default(),
            relayed_out: sum(&path.counters.to_peer),
            relayed_in: sum(&path.counters.from_peer),
            quic_packets: [get(&c.to_peer, 1), get(&c.from_peer, 1)],
            tcp_packets: [get(&c.to_peer, 2), get(&c.from_peer, 2)],
            packed: path.takes_packed(),
            packed_partials_lost: path.unpack_counters().partials_lost,
            packed_late: path.unpack_counters().late,
            fragments_lost: path.fragments_lost(),
            dropped: c.drops(),
        })
    }

    /// Every path's status, by node id (as `keyd status` names peers).
    pub fn status_all(&self) -> HashMap<String, PathStatus> {
        let ids: Vec<NodeId> = lock(&self.paths).keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| Some((id.to_string(), self.status(&id)?)))
            .collect()
    }

    /// Whether the ladder runs for this peer: a pinned rung always; else
    /// only when both data planes answer path probes (a stock WireGuard
    /// data plane cannot show that its direct path works, so such pairs
    /// stay on direct UDP).
    fn active(&self, path: &PeerPath) -> bool {
        self.config.pin.is_some()
            || !self.config.allowed.contains(&Rung::Direct)
            || (self.self_answers.load(Ordering::Relaxed)
                && path.peer_answers_probes.load(Ordering::Relaxed))
    }

    /// An exchange with `peer` succeeded: its keyd is up again, so carriers
    /// that failed to open may be tried at once.
    pub fn peer_reachable(&self, peer: NodeId) {
        lock(&self.connects).retain(|(id, _), _| *id != peer);
    }

    /// Asks for a carrier (dropped on a full queue: the next round asks
    /// again). Endpoint moves are sent by `move_to`, awaited.
    fn request(&self, r: Request) {
        if let Request::Connect { peer, rung } = r
            && !lock(&self.connects)
                .get(&(peer, rung))
                .is_none_or(|b| b.may_try(Instant::now()))
        {
            return;
        }
        // A full queue: the next ladder round asks again.
        let _ = self.requests.try_send(r);
    }

    /// How an attempt the ladder asked for ([`Request::Connect`]) ended.
    /// Ignored for a peer no longer listed (its backoff went with it).
    pub fn connect_done(&self, peer: NodeId, rung: Rung, ok: bool) {
        // Checked holding `connects`: a `sync` removing the path between
        // the check and the insert would otherwise miss the entry.
        let mut connects = lock(&self.connects);
        if self.path(&peer).is_none() {
            return;
        }
        if ok {
            connects.remove(&(peer, rung));
        } else {
            connects
                .entry((peer, rung))
                .or_default()
                .failed(Instant::now());
        }
    }
}

/// Probes our own data plane on loopback: does it answer path probes?
async fn self_probe(edge: std::sync::Weak<Edge>) {
    let mut misses = 0u32;
    loop {
        let Some(e) = edge.upgrade() else { return };
        let answered = e
            .self_prober
            .probe(e.dataplane, SELF_PROBE_TIMEOUT)
            .await
            .is_ok();
        // One answer says yes; only several misses in a row say no (a lost
        // probe, a data plane restarting).
        misses = if answered { 0 } else { misses + 1 };
        let answers = if answered {
            Some(true)
        } else if misses >= SELF_PROBE_MISSES {
            Some(false)
        } else {
            None
        };
        if let Some(answers) = answers
            && e.self_answers.swap(answers, Ordering::Relaxed) != answers
        {
            info!(
                "edge: the local data plane {} path probes",
                if answers {
                    "answers"
                } else {
                    "does not answer"
                }
            );
            let paths: Vec<_> = lock(&e.paths).values().map(|(p, _)| p.clone()).collect();
            for p in paths {
                p.send_hello(answers);
                p.wake.notify_one();
            }
        }
        drop(e);
        // Quickly until it answers (the data plane may start after keyd).
        tokio::time::sleep(if answered {
            SELF_PROBE_INTERVAL
        } else {
            Duration::from_secs(2)
        })
        .await;
    }
}

/// One peer's ladder: probes, outcomes, moves.
async fn drive(edge: std::sync::Weak<Edge>, path: Arc<PeerPath>) {
    let mut last_hello: Option<Instant> = None;
    loop {
        let Some(e) = edge.upgrade() else { return };
        let now = Instant::now();
        // Eagerly until the peer's HELLO came (whatever it said).
        let hello_every = if path.peer_hello_seen.load(Ordering::Relaxed) {
            HELLO_INTERVAL
        } else {
            HELLO_EAGER
        };
        if last_hello.is_none_or(|t| now.duration_since(t) >= hello_every) {
            path.send_hello(e.self_answers.load(Ordering::Relaxed));
            last_hello = Some(now);
        }
        // The dialing side keeps the carriers up whatever the ladder says:
        // exchanges and HELLOs need them, and the peer may pin a rung.
        keep_carriers(&e, &path);
        let active = e.active(&path);
        lock(&path.ladder).set_active(active, now);
        let wait_until = if active {
            let moves = step(&e, &path, now);
            for (to, why) in moves {
                move_to(&e, &path, to, &why).await;
            }
            // The data plane follows the ladder, also after the ladder was
            // off for a while (it does not move then; see `active`).
            let current = lock(&path.ladder).current();
            if path.rung() != current {
                move_to(&e, &path, current, "ladder").await;
            }
            lock(&path.ladder).poll_timeout().min(now + hello_every)
        } else {
            // Off (the capability is unknown or missing): stay on the rung
            // we are on, probe nothing, climb nothing. A pair that never had
            // the ladder stays on direct UDP.
            now + IDLE_RECHECK.min(hello_every)
        };
        drop(e);
        tokio::select! {
            _ = tokio::time::sleep_until(wait_until.into()) => {}
            _ = path.wake.notified() => {}
        }
    }
}

/// The dialing side opens a missing carrier (within the backoff): QUIC, and
/// TCP where allowed. Not in a path's first seconds: the policy's first
/// exchange opens the QUIC connection then, and every extra carrier costs
/// the new peer an exchange while it is busy joining the mesh.
fn keep_carriers(e: &Edge, path: &PeerPath) {
    if !e.dials(&path.id) || path.created.elapsed() < CARRIER_GRACE {
        return;
    }
    if path.quic().is_none() {
        e.request(Request::Connect {
            peer: path.id,
            rung: Rung::Quic,
        });
    }
    if e.config.allowed.contains(&Rung::Tcp) && path.tcp().is_none() {
        e.request(Request::Connect {
            peer: path.id,
            rung: Rung::Tcp,
        });
    }
}

/// One round of the ladder: the probes it asks for, and the moves it made.
fn step(e: &Arc<Edge>, path: &Arc<PeerPath>, now: Instant) -> Vec<(Rung, String)> {
    let probes: Vec<Rung> = {
        let mut l = lock(&path.ladder);
        l.handle_timeout(now);
        std::iter::from_fn(|| l.poll_probe(now)).collect()
    };
    for rung in probes {
        match rung {
            Rung::Direct => {
                let Some(target) = *lock(&path.direct) else {
                    lock(&path.ladder).on_outcome(Rung::Direct, Outcome::Lost, now);
                    continue;
                };
                let (e, path) = (Arc::downgrade(e), path.clone());
                tokio::spawn(async move {
                    let Some(edge) = e.upgrade() else { return };
                    let timeout = edge.config.probe_timeout;
                    let outcome = match edge.prober.probe(target, timeout).await {
                        Ok(rtt) => Outcome::Answered { rtt },
                        Err(_) => Outcome::Lost,
                    };
                    lock(&path.ladder).on_outcome(Rung::Direct, outcome, Instant::now());
                    path.wake.notify_one();
                });
            }
            Rung::Quic | Rung::Tcp => match path.ping(rung, now) {
                relay::Ping::Sent => {}
                // Busy with packets: the ladder times the probe out itself
                // if no answer comes; the carrier is there.
                relay::Ping::Busy => {}
                relay::Ping::NoCarrier => {
                    lock(&path.ladder).on_outcome(rung, Outcome::Lost, now);
                    if e.dials(&path.id) && path.created.elapsed() >= CARRIER_GRACE {
                        e.request(Request::Connect {
                            peer: path.id,
                            rung,
                        });
                    }
                }
            },
        }
    }
    let mut l = lock(&path.ladder);
    std::iter::from_fn(|| l.poll_change())
        .map(|c| (c.to, format!("{:?}", c.reason).to_lowercase()))
        .collect()
}

/// Moves the peer's packets to `to`: the data plane's endpoint changes
/// through the policy (awaited: a move is never dropped on a full queue).
async fn move_to(e: &Edge, path: &PeerPath, to: Rung, why: &str) {
    let from = path.rung();
    if from == to {
        return;
    }
    path.set_rung(to);
    info!(
        "edge: peer {} moves from {from} to {to} ({why})",
        lock(&path.name)
    );
    let _ = e
        .requests
        .send(Request::Endpoint {
            peer: path.id,
            endpoint: (to != Rung::Direct).then_some(path.relay_addr),
        })
        .await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::cert::CaCert;
    use mesh_proto::identity::CaSigningKey;

    /// A carrier's backoff ends with its member: one that leaves the
    /// roster and comes back is tried at once, and the map does not grow
    /// with every node id ever seen.
    #[tokio::test]
    async fn a_departed_members_backoff_is_forgotten() {
        let (requests, _r) = mpsc::channel(8);
        let edge = Edge::new(
            LadderConfig::default(),
            NodeId([0; 16]),
            1,
            Ipv4Addr::LOCALHOST.into(),
            requests,
            tokio::runtime::Handle::current(),
        )
        .await
        .unwrap();
        let gone = NodeId([9; 16]);
        lock(&edge.connects)
            .entry((gone, Rung::Tcp))
            .or_default()
            .failed(Instant::now());

        let key = CaSigningKey::generate().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ca = CaCert::create(&key, "ca", "edge-test", now - 60, now + 3600).unwrap();
        let roster = Roster::build(&ca, &key, 1, now, now + 3600, vec![], vec![]).unwrap();
        edge.sync(&roster).await;
        assert!(
            lock(&edge.connects).is_empty(),
            "backoff kept for a departed member"
        );
        // An attempt that was under way when it left ends after it.
        edge.connect_done(gone, Rung::Tcp, false);
        assert!(
            lock(&edge.connects).is_empty(),
            "backoff back for a departed member"
        );
    }
}
