//! The micro-segmentation firewall in the data path (issue 13).
//!
//! keyd hands us a firewall document on a local socket ([`control`]): the
//! network's policy and the identities of this node and its peers. It is
//! compiled into a [`mesh_proto::firewall::engine::Engine`] off the data
//! path and swapped in under a short lock. The TUN transport then asks
//! [`Firewall::batch`] once per batch and [`Batch::allows`] per packet:
//! outbound packets read from TUN before they are encrypted, inbound ones
//! after decryption before they are written to TUN. Until a document
//! arrives, or while the one in force carries no policy, nothing is
//! filtered and the data path takes no lock.

pub mod control;
pub mod status;

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mesh_proto::firewall::conntrack::{Conntrack, ConntrackConfig, DropReason, Verdict};
use mesh_proto::firewall::engine::{Direction, Engine};
use mesh_proto::firewall::packet::{self, PacketMeta};
use tracing::warn;

pub use status::{Drops, FirewallStatus, RuleHits};

/// How often tracked flows are expired, from the batch path.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Drop log lines per [`LOG_WINDOW`], at most; the rest are counted and
/// summed up in one line when the window ends.
const LOG_LINES: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(1);
/// A peer's name is certificate content: at most this many characters of it
/// reach the log, escaped.
const LOG_NAME_CHARS: usize = 64;

/// A compiled firewall document.
pub struct Ruleset {
    pub generation: u64,
    /// `None`: the document carries no policy; everything passes.
    pub engine: Option<Engine>,
    pub peers: usize,
}

impl Ruleset {
    pub fn rules(&self) -> usize {
        self.engine.as_ref().map_or(0, Engine::rules)
    }
}

/// Why a document was not put in force.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    #[error("generation {offered} is not newer than generation {in_force}, the one in force")]
    Stale { offered: u64, in_force: u64 },
}

/// One interface's firewall: the document in force and the flow table,
/// shared by the control socket and the data path's one or two threads.
pub struct Firewall {
    /// Whether a policy is in force: without one the data path skips the lock.
    enforcing: AtomicBool,
    inner: Mutex<Inner>,
    pub documents_applied: AtomicU64,
    pub documents_refused: AtomicU64,
}

struct Inner {
    ruleset: Option<Ruleset>,
    /// `--firewall-required`: until the first document, nothing passes.
    required: bool,
    conntrack: Conntrack,
    last_expire: Instant,
    log: LogBudget,
    /// Rule hits of earlier documents by rule name, and the flow table's
    /// per-rule hits at the last swap, so that a rule's counter keeps
    /// counting across documents that keep its name (Prometheus counters
    /// only go up).
    hits_before: BTreeMap<String, u64>,
    hits_at_swap: Vec<u64>,
}

impl Firewall {
    pub fn new(config: ConntrackConfig) -> Self {
        Self::with_required(config, false)
    }

    /// `required`: drop everything until the first document arrives (a
    /// data plane that must never carry traffic without its policy, even
    /// when it was restarted behind keyd's back).
    pub fn with_required(config: ConntrackConfig, required: bool) -> Self {
        Self {
            enforcing: AtomicBool::new(required),
            inner: Mutex::new(Inner {
                ruleset: None,
                required,
                conntrack: Conntrack::new(config),
                last_expire: Instant::now(),
                log: LogBudget::default(),
                hits_before: BTreeMap::new(),
                hits_at_swap: Vec::new(),
            }),
            documents_applied: AtomicU64::new(0),
            documents_refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves a usable table: go on with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The generation in force, if a document has arrived.
    pub fn generation(&self) -> Option<u64> {
        self.lock().ruleset.as_ref().map(|r| r.generation)
    }

    /// Puts `ruleset` in force unless one of an equal or later generation
    /// already is. Tracked flows stay: the flow table decides each again at
    /// its next packet against the new engine. Under a document without a
    /// policy the table is left as it is (its counters only go up) and not
    /// consulted.
    pub fn install(&self, ruleset: Ruleset) -> Result<(), InstallError> {
        let enforcing = ruleset.engine.is_some();
        let mut inner = self.lock();
        if let Some(current) = &inner.ruleset
            && ruleset.generation <= current.generation
        {
            return Err(InstallError::Stale {
                offered: ruleset.generation,
                in_force: current.generation,
            });
        }
        let inner_ref = &mut *inner;
        // Fold the outgoing rules' hits into their names.
        if let Some(Ruleset {
            engine: Some(old), ..
        }) = &inner_ref.ruleset
        {
            let hits = &inner_ref.conntrack.counters().rule_hits;
            for (i, &n) in hits.iter().enumerate().take(old.rules()) {
                let since = n.saturating_sub(inner_ref.hits_at_swap.get(i).copied().unwrap_or(0));
                if since > 0 {
                    *inner_ref
                        .hits_before
                        .entry(old.rule_name(i).to_string())
                        .or_default() += since;
                }
            }
        }
        inner.hits_at_swap = inner.conntrack.counters().rule_hits.clone();
        // The first policy after traffic passed unfiltered (no document yet,
        // or one without a policy): the connections opened meanwhile were
        // not tracked, and those the policy allows must go on.
        let was_filtering = match &inner.ruleset {
            Some(r) => r.engine.is_some(),
            None => inner.required,
        };
        if enforcing && !was_filtering {
            inner.conntrack.start_pick_up(Instant::now());
        }
        let old = inner.ruleset.replace(ruleset);
        self.enforcing.store(enforcing, Ordering::Release);
        // The old engine is freed after the lock is let go.
        drop(inner);
        drop(old);
        Ok(())
    }

    /// The firewall for one batch of packets: takes the table's lock (only
    /// while a policy is in force) until the batch is dropped, and expires
    /// flows when a second has passed since the last time.
    pub fn batch(&self) -> Batch<'_> {
        if !self.enforcing.load(Ordering::Acquire) {
            return Batch {
                inner: None,
                now: None,
            };
        }
        let mut inner = self.lock();
        let now = Instant::now();
        if now.duration_since(inner.last_expire) >= EXPIRE_EVERY {
            inner.conntrack.expire(now);
            inner.last_expire = now;
        }
        Batch {
            inner: Some(inner),
            now: Some(now),
        }
    }

    /// Appends the firewall's metrics in Prometheus text format.
    pub fn render_into(&self, s: &mut String) {
        self.status().render_into(s);
    }

    /// A snapshot of what the firewall has done: numbers are copied under
    /// the lock (the data path waits on it), formatting happens outside.
    pub fn status(&self) -> FirewallStatus {
        let inner = self.lock();
        let c = inner.conntrack.counters();
        // Per-rule hits: earlier documents' by name, plus the current ones'.
        let mut before = inner.hits_before.clone();
        let mut rules = Vec::new();
        if let Some(Ruleset {
            engine: Some(engine),
            ..
        }) = &inner.ruleset
        {
            for i in 0..engine.rules() {
                let now = c.rule_hits.get(i).copied().unwrap_or(0);
                let since = now.saturating_sub(inner.hits_at_swap.get(i).copied().unwrap_or(0));
                let name = engine.rule_name(i);
                rules.push(RuleHits {
                    name: name.to_string(),
                    hits: before.remove(name).unwrap_or(0) + since,
                    in_force: true,
                });
            }
        }
        rules.extend(before.into_iter().map(|(name, hits)| RuleHits {
            name,
            hits,
            in_force: false,
        }));
        FirewallStatus {
            generation: inner.ruleset.as_ref().map(|r| r.generation),
            filtering: inner.ruleset.as_ref().is_some_and(|r| r.engine.is_some()),
            required: inner.required,
            peers: inner.ruleset.as_ref().map_or(0, |r| r.peers),
            rules,
            flows: inner.conntrack.flows(),
            max_flows: inner.conntrack.max_flows(),
            flows_new: c.new,
            flows_evicted: c.evicted,
            flows_expired: c.expired,
            flows_rechecked_dropped: c.rechecked_dropped,
            flows_picked_up: c.picked_up,
            drops: Drops {
                policy: c.dropped_policy,
                no_peer: c.dropped_no_peer,
                not_tracked: c.dropped_not_tracked,
                not_local: c.dropped_not_local,
                malformed: c.dropped_malformed,
            },
            documents_applied: self.documents_applied.load(Ordering::Relaxed),
            documents_refused: self.documents_refused.load(Ordering::Relaxed),
        }
    }
}

/// The firewall's view for one batch of packets (see [`Firewall::batch`]).
pub struct Batch<'a> {
    inner: Option<MutexGuard<'a, Inner>>,
    now: Option<Instant>,
}

impl Batch<'_> {
    /// Whether `packet` (a plain IP packet) may go on in direction `dir`.
    pub fn allows(&mut self, dir: Direction, packet: &[u8]) -> bool {
        let (Some(inner), Some(now)) = (self.inner.as_deref_mut(), self.now) else {
            return true;
        };
        let Inner {
            ruleset,
            conntrack,
            log,
            required,
            ..
        } = inner;
        let Some(ruleset) = ruleset else {
            // No document yet: with --firewall-required nothing passes.
            return !*required;
        };
        let Ruleset {
            engine: Some(engine),
            generation,
            ..
        } = ruleset
        else {
            return true;
        };
        let meta = match packet::parse(packet) {
            Ok(meta) => meta,
            Err(e) => {
                conntrack.record_drop(DropReason::Malformed);
                if log.grant(now) {
                    warn!(
                        "firewall: dropped a malformed {} packet ({} bytes): {e}",
                        DirName(dir),
                        packet.len()
                    );
                }
                return false;
            }
        };
        let local = match dir {
            Direction::Inbound => meta.dst,
            Direction::Outbound => meta.src,
        };
        if !engine.is_local(local) {
            conntrack.record_drop(DropReason::NotLocal);
            if log.grant(now) {
                log_drop(dir, &meta, engine, &DropReason::NotLocal);
            }
            return false;
        }
        match conntrack.check(dir, &meta, engine, *generation, now) {
            Verdict::Pass => true,
            Verdict::Drop(reason) => {
                if log.grant(now) {
                    log_drop(dir, &meta, engine, &reason);
                }
                false
            }
        }
    }
}

fn log_drop(dir: Direction, meta: &PacketMeta, engine: &Engine, reason: &DropReason) {
    let remote = match dir {
        Direction::Outbound => meta.dst,
        Direction::Inbound => meta.src,
    };
    let peer = engine
        .peer_for(remote)
        .map(|p| PeerName(engine.peer_name(p)));
    let why = match reason {
        DropReason::Policy { rule: Some(rule) } => {
            format!("rule `{}`", engine.rule_name(*rule))
        }
        DropReason::Policy { rule: None } => "default deny".to_string(),
        DropReason::NoPeer => "no peer holds the address".to_string(),
        DropReason::NotTracked => "belongs to no tracked flow and cannot open one".to_string(),
        DropReason::NotLocal => "not to or from this node (no forwarding through it)".to_string(),
        other => other.label().to_string(),
    };
    warn!(
        "firewall: dropped {} {} {} -> {} peer {}: {why}",
        DirName(dir),
        ProtoName(meta.proto),
        Endpoint(meta.src, meta.sport),
        Endpoint(meta.dst, meta.dport),
        match &peer {
            Some(name) => name as &dyn fmt::Display,
            None => &"(none)",
        },
    );
}

/// At most [`LOG_LINES`] drop lines per [`LOG_WINDOW`]; what is left out is
/// counted and reported once the window has passed.
#[derive(Default)]
struct LogBudget {
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn grant(&mut self, now: Instant) -> bool {
        let fresh = self
            .window
            .is_none_or(|start| now.duration_since(start) >= LOG_WINDOW);
        if fresh {
            if self.suppressed > 0 {
                warn!(
                    "firewall: {} more drops not logged (at most {LOG_LINES} lines a second)",
                    self.suppressed
                );
            }
            *self = LogBudget {
                window: Some(now),
                used: 0,
                suppressed: 0,
            };
        }
        if self.used < LOG_LINES {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

struct DirName(Direction);

impl fmt::Display for DirName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

struct ProtoName(u8);

impl fmt::Display for ProtoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("icmp"),
            6 => f.write_str("tcp"),
            17 => f.write_str("udp"),
            58 => f.write_str("icmpv6"),
            n => write!(f, "proto {n}"),
        }
    }
}

/// `addr:port`, `[addr]:port` for IPv6.
struct Endpoint(IpAddr, u16);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// A peer-supplied name for a log line: escaped (no control characters or
/// line breaks reach the log) and cut at [`LOG_NAME_CHARS`].
struct PeerName<'a>(&'a str);

impl fmt::Display for PeerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars().take(LOG_NAME_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.0.chars().nth(LOG_NAME_CHARS).is_some() {
            f.write_str("...")?;
        }
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_are_escaped_and_cut_for_the_log() {
        assert_eq!(
            PeerName("evil\nname\u{1b}[31m").to_string(),
            "\"evil\\nname\\u{1b}[31m\""
        );
        let long = "x".repeat(200);
        let shown = PeerName(&long).to_string();
        assert_eq!(shown.len(), 1 + LOG_NAME_CHARS + 3 + 1, "{shown}");
    }

    #[test]
    fn the_log_budget_grants_a_few_lines_per_window() {
        let mut budget = LogBudget::default();
        let t = Instant::now();
        let granted = (0..100).filter(|_| budget.grant(t)).count();
        assert_eq!(granted, LOG_LINES as usize);
        assert_eq!(budget.suppressed, 100 - u64::from(LOG_LINES));
        assert!(budget.grant(t + LOG_WINDOW), "a new window grants again");
        assert_eq!(budget.suppressed, 0);
    }

    use mesh_proto::firewall::engine::PeerInfo;
    use mesh_proto::firewall::policy::Policy;

    fn member(name: &str, group: &str, addr: &str) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            groups: vec![group.into()],
            addresses: vec![addr.parse().unwrap()],
            ..PeerInfo::default()
        }
    }

    /// This node is web1 (10.77.0.1), its one peer db1 (10.77.0.2).
    fn ruleset(generation: u64, toml: Option<&str>) -> Ruleset {
        let local = member("web1", "web", "10.77.0.1/32");
        let peers = [member("db1", "db", "10.77.0.2/32")];
        Ruleset {
            generation,
            engine: toml.map(|t| Engine::new(&Policy::from_toml(t).unwrap(), &local, &peers)),
            peers: 1,
        }
    }

    const WEB_TO_DB: &str = "[[rule]]\nname = \"web-to-db\"\naction = \"allow\"\n\
        from = { groups = [\"web\"] }\nto = { groups = [\"db\"] }\nproto = \"tcp\"\nports = [\"5432\"]\n";
    const DB_TO_WEB: &str = "[[rule]]\nname = \"db-to-web\"\naction = \"allow\"\n\
        from = { groups = [\"db\"] }\nto = { groups = [\"web\"] }\nproto = \"tcp\"\n";

    /// A TCP segment 10.77.0.<src>:sport -> 10.77.0.<dst>:dport.
    fn tcp(src: u8, sport: u16, dst: u8, dport: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[3] = 40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, src]);
        p[16..20].copy_from_slice(&[10, 77, 0, dst]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn metrics(fw: &Firewall) -> String {
        let mut s = String::new();
        fw.render_into(&mut s);
        s
    }

    #[test]
    fn without_a_policy_everything_passes_and_no_lock_is_taken() {
        let fw = Firewall::new(ConntrackConfig::default());
        assert!(fw.batch().inner.is_none());
        assert!(
            fw.batch()
                .allows(Direction::Outbound, &tcp(1, 1000, 2, 22, SYN))
        );
        fw.install(ruleset(1, None)).unwrap();
        assert!(fw.batch().inner.is_none(), "policy null: no lock either");
        assert!(fw.batch().allows(Direction::Inbound, b"not even a packet"));
    }

    /// A member that forwards (a router, a container host) is no way
    /// around the policy: inbound packets must be for this node, outbound
    /// ones from it, whatever the rules between the two members allow.
    #[test]
    fn packets_not_to_or_from_this_node_are_dropped() {
        const ALL: &str = "[[rule]]\nname = \"all\"\naction = \"allow\"\n\
            from = { any = true }\nto = { any = true }\nproto = \"any\"\n";
        let fw = Firewall::new(ConntrackConfig::default());
        fw.install(ruleset(1, Some(ALL))).unwrap();
        let mut b = fw.batch();
        // db1 (.2) sends web1 (.1) a packet for .9: not this node's.
        assert!(!b.allows(Direction::Inbound, &tcp(2, 40000, 9, 22, SYN)));
        // web1 forwards something from .9 to db1: not from this node.
        assert!(!b.allows(Direction::Outbound, &tcp(9, 40000, 2, 22, SYN)));
        // Its own flows pass.
        assert!(b.allows(Direction::Outbound, &tcp(1, 40000, 2, 22, SYN)));
        drop(b);
        let m = metrics(&fw);
        let line = "mesh_node_firewall_drops_total{reason=\"not_local\"} 2";
        assert!(m.lines().any(|l| l == line), "{line} in {m}");
    }

    /// `--firewall-required`: nothing passes before the first document; a
    /// document without a policy then opens the data plane.
    #[test]
    fn a_required_firewall_carries_nothing_before_its_first_document() {
        let fw = Firewall::with_required(ConntrackConfig::default(), true);
        assert!(
            !fw.batch()
                .allows(Direction::Outbound, &tcp(1, 40000, 2, 22, SYN))
        );
        assert!(
            !fw.batch()
                .allows(Direction::Inbound, &tcp(2, 40000, 1, 22, SYN))
        );
        fw.install(ruleset(1, None)).unwrap();
        assert!(
            fw.batch()
                .allows(Direction::Outbound, &tcp(1, 40000, 2, 22, SYN))
        );
    }

    #[test]
    fn a_policy_filters_new_flows_and_lets_replies_through() {
        let fw = Firewall::new(ConntrackConfig::default());
        fw.install(ruleset(1, Some(WEB_TO_DB))).unwrap();
        let mut b = fw.batch();
        assert!(b.allows(Direction::Outbound, &tcp(1, 40000, 2, 5432, SYN)));
        assert!(
            b.allows(Direction::Inbound, &tcp(2, 5432, 1, 40000, SYN | ACK)),
            "reply"
        );
        assert!(
            !b.allows(Direction::Outbound, &tcp(1, 40001, 2, 22, SYN)),
            "port"
        );
        assert!(
            !b.allows(Direction::Inbound, &tcp(2, 40002, 1, 5432, SYN)),
            "unsolicited"
        );
        assert!(!b.allows(Direction::Inbound, &[0x45, 0, 0]), "malformed");
        drop(b);
        let m = metrics(&fw);
        for line in [
            "mesh_node_firewall_generation 1",
            "mesh_node_firewall_rules 1",
            "mesh_node_firewall_flows 1",
            "mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"} 1",
            "mesh_node_firewall_drops_total{reason=\"policy\"} 2",
            "mesh_node_firewall_drops_total{reason=\"malformed\"} 1",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} in {m}");
        }
    }

    /// Connections opened while nothing was filtered survive the first
    /// policy when it allows them (the window is conntrack's to test); a
    /// required firewall carried nothing before, so it has nothing to pick
    /// up.
    #[test]
    fn the_first_policy_picks_up_the_connections_it_allows() {
        let web_to_db = || tcp(1, 40000, 2, 5432, ACK);
        let db_to_web = || tcp(2, 5432, 1, 40000, ACK);
        let ssh = || tcp(1, 40001, 2, 22, ACK);
        for before in [None, Some(None)] {
            let fw = Firewall::new(ConntrackConfig::default());
            if let Some(policy) = before {
                fw.install(ruleset(1, policy)).unwrap();
            }
            fw.install(ruleset(2, Some(WEB_TO_DB))).unwrap();
            let mut b = fw.batch();
            assert!(b.allows(Direction::Inbound, &db_to_web()), "{before:?}");
            assert!(b.allows(Direction::Outbound, &web_to_db()), "{before:?}");
            assert!(
                !b.allows(Direction::Outbound, &ssh()),
                "not allowed: {before:?}"
            );
            drop(b);
            assert_eq!(fw.status().flows_picked_up, 1);
        }
        let fw = Firewall::with_required(ConntrackConfig::default(), true);
        fw.install(ruleset(1, Some(WEB_TO_DB))).unwrap();
        assert!(!fw.batch().allows(Direction::Outbound, &web_to_db()));
    }

    #[test]
    fn stale_documents_are_refused_and_change_nothing() {
        let fw = Firewall::new(ConntrackConfig::default());
        fw.install(ruleset(5, Some(WEB_TO_DB))).unwrap();
        for generation in [5, 4] {
            assert_eq!(
                fw.install(ruleset(generation, None)),
                Err(InstallError::Stale {
                    offered: generation,
                    in_force: 5
                })
            );
        }
        assert_eq!(fw.generation(), Some(5));
        assert!(
            !fw.batch()
                .allows(Direction::Outbound, &tcp(1, 1, 2, 22, SYN))
        );
    }

    #[test]
    fn a_new_policy_cuts_a_tracked_flow_and_rule_hits_keep_their_names() {
        let fw = Firewall::new(ConntrackConfig::default());
        fw.install(ruleset(1, Some(WEB_TO_DB))).unwrap();
        assert!(
            fw.batch()
                .allows(Direction::Outbound, &tcp(1, 40000, 2, 5432, SYN))
        );
        assert!(
            fw.batch()
                .allows(Direction::Inbound, &tcp(2, 5432, 1, 40000, SYN | ACK))
        );
        fw.install(ruleset(2, Some(DB_TO_WEB))).unwrap();
        assert!(
            !fw.batch()
                .allows(Direction::Outbound, &tcp(1, 40000, 2, 5432, ACK)),
            "the established flow is cut at its next packet"
        );
        assert!(
            fw.batch()
                .allows(Direction::Inbound, &tcp(2, 41000, 1, 80, SYN))
        );
        let m = metrics(&fw);
        for line in [
            "mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"} 1",
            "mesh_node_firewall_rule_hits_total{rule=\"db-to-web\"} 1",
            "mesh_node_firewall_flows_rechecked_dropped_total 1",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} in {m}");
        }
        // Back to the first policy: its rule's count goes on from 1.
        fw.install(ruleset(3, Some(WEB_TO_DB))).unwrap();
        assert!(
            fw.batch()
                .allows(Direction::Outbound, &tcp(1, 40005, 2, 5432, SYN))
        );
        let m = metrics(&fw);
        assert!(
            m.lines()
                .any(|l| l == "mesh_node_firewall_rule_hits_total{rule=\"web-to-db\"} 2"),
            "{m}"
        );
    }
}
