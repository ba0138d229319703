//! Connection tracking: the state that lets replies and established flows
//! pass without a rule walk, and that makes a policy change reach flows that
//! are already open.
//!
//! Sans-IO: the caller passes each parsed packet, its direction, the engine
//! in force (with a generation number that changes whenever the engine is
//! rebuilt) and the time. Every operation is O(1) expected (a hash lookup
//! and intrusive list moves) except `expire`, which is O(flows expired).
//!
//! A flow is keyed by its 5-tuple as seen from this node (protocol, local
//! address and port, remote address and port), so a packet and its reply
//! find the same flow. Flows live in a slab threaded on one least-recently
//! seen list per timeout class: the tail of each list is its next flow to
//! expire, and the tails together give the least recently seen flow to evict
//! when the table is full. Flows nobody answered (one-way UDP) and TCP
//! connections whose handshake the opener has not completed (a SYN flood,
//! answered or not) are evicted before the others, so that a flood of new
//! flows recycles its own entries and established flows keep working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::engine::{Decision, Direction, Engine};
use super::packet::{PROTO_TCP, PROTO_UDP, PacketMeta, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// How long a TCP flow stays tracked after RST, or FIN from both sides:
/// long enough for the last ACK and a retransmitted FIN.
pub const TCP_CLOSED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP flow stays tracked while only its opener has spoken (the
/// SYN has had no answer). Capped at `tcp_timeout`.
pub const TCP_OPENING_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// The most flows tracked at once; at the bound the least recently seen
    /// flow is evicted (unanswered flows first). At least 1.
    pub max_flows: usize,
    /// An established TCP flow idle for this long is forgotten.
    pub tcp_timeout: Duration,
    pub udp_timeout: Duration,
    /// ICMP and every other protocol.
    pub other_timeout: Duration,
}

impl Default for ConntrackConfig {
    /// Nebula's timeouts, and a table of 65,536 flows (a few MiB).
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            tcp_timeout: Duration::from_secs(12 * 60),
            udp_timeout: Duration::from_secs(3 * 60),
            other_timeout: Duration::from_secs(10 * 60),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass,
    Drop(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A new flow the policy forbids: by a deny rule, or by default (`None`).
    /// Also a tracked flow that the policy in force no longer allows.
    Policy { rule: Option<usize> },
    /// No peer's addresses contain the remote address.
    NoPeer,
    /// The packet could not be parsed (counted through [`Conntrack::record_drop`]).
    Malformed,
    /// A packet that belongs to no tracked flow and cannot open one: a TCP
    /// segment other than a SYN, or an ICMP error about no tracked flow.
    NotTracked,
    /// An inbound packet not for this node, or an outbound one not from it
    /// (counted through [`Conntrack::record_drop`]): forwarding through a
    /// member is not a way around the policy.
    NotLocal,
    /// Never returned: a full table evicts its oldest flow (counted) instead.
    TableFull,
}

impl DropReason {
    /// A stable label for metrics and log lines.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Policy { rule: Some(_) } => "deny_rule",
            DropReason::Policy { rule: None } => "default_deny",
            DropReason::NoPeer => "no_peer",
            DropReason::Malformed => "malformed",
            DropReason::NotTracked => "not_tracked",
            DropReason::NotLocal => "not_local",
            DropReason::TableFull => "table_full",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackCounters {
    /// Flows opened.
    pub new: u64,
    /// Flows forgotten to make room at the bound.
    pub evicted: u64,
    /// Flows forgotten after their idle timeout.
    pub expired: u64,
    /// Tracked flows dropped and forgotten because a newer engine forbids them.
    pub rechecked_dropped: u64,
    /// TCP connections from before the first policy, tracked mid-stream in
    /// the pick-up window ([`Conntrack::start_pick_up`]).
    pub picked_up: u64,
    /// New flows decided by each rule (allowed or denied), indexed like the
    /// engine's rules. Cumulative: when the engine changes the vector is
    /// resized to its rules and counting goes on, so whoever names the
    /// counts takes a snapshot at each change (a new policy may number its
    /// rules differently).
    pub rule_hits: Vec<u64>,
    /// Drops by reason: by a deny rule or by default (including tracked
    /// flows a new policy forbids).
    pub dropped_policy: u64,
    pub dropped_no_peer: u64,
    pub dropped_malformed: u64,
    pub dropped_not_tracked: u64,
    pub dropped_not_local: u64,
}

/// What the table knows of one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedFlow {
    /// The peer, as the engine of `generation` numbers peers.
    pub peer: usize,
    /// Who opened it: this node (`Outbound`) or the peer (`Inbound`).
    pub opened: Direction,
    /// The rule that allowed it, in the engine of `generation`.
    pub rule: usize,
    /// The engine that last decided it.
    pub generation: u64,
    /// Whether the side that did not open it has sent anything.
    pub answered: bool,
}

/// What conntrack asks of the engine (a seam so that its tests can script
/// decisions without building a policy).
trait Rules {
    fn peer_for(&self, ip: IpAddr) -> Option<usize>;
    fn decide(&self, dir: Direction, peer: usize, proto: u8, dport: u16) -> Decision;
    fn rules(&self) -> usize;
}

impl Rules for Engine {
    fn peer_for(&self, ip: IpAddr) -> Option<usize> {
        Engine::peer_for(self, ip)
    }
    fn decide(&self, dir: Direction, peer: usize, proto: u8, dport: u16) -> Decision {
        Engine::decide(self, dir, peer, proto, dport)
    }
    fn rules(&self) -> usize {
        Engine::rules(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
}

impl FlowKey {
    fn of(dir: Direction, proto: u8, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Self {
        let ((local, local_port), (remote, remote_port)) = match dir {
            Direction::Outbound => (src, dst),
            Direction::Inbound => (dst, src),
        };
        Self {
            proto,
            local,
            local_port,
            remote,
            remote_port,
        }
    }

    /// The destination port the opener asked for: what the policy judges.
    fn opener_dport(&self, opened: Direction) -> u16 {
        match opened {
            Direction::Outbound => self.remote_port,
            Direction::Inbound => self.local_port,
        }
    }
}

/// Timeout classes, one list each. The first four are flows nobody has
/// answered (or that are over): evicted before the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    TcpClosed,
    TcpOpening,
    UdpUnanswered,
    OtherUnanswered,
    TcpEstablished,
    UdpAnswered,
    OtherAnswered,
}

const CLASSES: usize = 7;
const EVICT_FIRST: usize = 4;

#[derive(Clone, Debug)]
struct Flow {
    peer: usize,
    opened: Direction,
    rule: usize,
    generation: u64,
    last_seen: Instant,
    answered: bool,
    /// TCP: the opener acknowledged after the answer (the handshake is
    /// complete); until then the flow is opening, however it was answered.
    opener_acked: bool,
    fin_opener: bool,
    fin_answerer: bool,
    closed: bool,
}

impl Flow {
    fn class(&self, proto: u8) -> Class {
        match (proto, self.answered) {
            (PROTO_TCP, _) if self.closed => Class::TcpClosed,
            (PROTO_TCP, true) if self.opener_acked => Class::TcpEstablished,
            (PROTO_TCP, _) => Class::TcpOpening,
            (PROTO_UDP, false) => Class::UdpUnanswered,
            (PROTO_UDP, true) => Class::UdpAnswered,
            (_, false) => Class::OtherUnanswered,
            (_, true) => Class::OtherAnswered,
        }
    }

    /// Updates the state with one packet of this flow.
    fn saw(&mut self, proto: u8, from_opener: bool, tcp_flags: u8) {
        if !from_opener {
            self.answered = true;
        }
        if proto == PROTO_TCP {
            if from_opener && self.answered && tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
                self.opener_acked = true;
            }
            if tcp_flags & TCP_RST != 0 {
                self.closed = true;
            }
            if tcp_flags & TCP_FIN != 0 {
                if from_opener {
                    self.fin_opener = true;
                } else {
                    self.fin_answerer = true;
                }
                self.closed |= self.fin_opener && self.fin_answerer;
            }
        }
    }
}

const NIL: usize = usize::MAX;

struct Node {
    key: FlowKey,
    flow: Flow,
    class: Class,
    /// Towards the most recently seen end of its class list.
    newer: usize,
    older: usize,
}

#[derive(Clone, Copy)]
struct Ends {
    newest: usize,
    oldest: usize,
}

const EMPTY: Ends = Ends {
    newest: NIL,
    oldest: NIL,
};

pub struct Conntrack {
    config: ConntrackConfig,
    index: HashMap<FlowKey, usize>,
    slots: Vec<Option<Node>>,
    free: Vec<usize>,
    lists: [Ends; CLASSES],
    /// Tracked flows per (protocol, local, remote): how a non-first
    /// fragment, which has no ports, finds that it belongs to a known flow.
    pairs: HashMap<(u8, IpAddr, IpAddr), u32>,
    generation: Option<u64>,
    counters: ConntrackCounters,
    /// See [`Conntrack::start_pick_up`].
    pick_up_until: Option<Instant>,
}

impl Conntrack {
    pub fn new(mut config: ConntrackConfig) -> Self {
        config.max_flows = config.max_flows.max(1);
        Self {
            config,
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY; CLASSES],
            pairs: HashMap::new(),
            generation: None,
            counters: ConntrackCounters::default(),
            pick_up_until: None,
        }
    }

    /// Decides one packet. A packet of a tracked flow (either direction)
    /// passes without a rule walk; a new flow is decided by `engine` and
    /// tracked when allowed. `generation` identifies the engine: when it
    /// changes, a tracked flow is decided again at its next packet and
    /// dropped (and untracked) if the new policy forbids it.
    pub fn check(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        engine: &Engine,
        generation: u64,
        now: Instant,
    ) -> Verdict {
        self.check_with(dir, meta, engine, generation, now)
    }

    /// For the TCP timeout from `now` (a connection idle longer would have
    /// been forgotten had it been tracked), a mid-stream TCP segment (ACK,
    /// no SYN or RST) of an untracked connection that the policy allows in
    /// either orientation is tracked instead of dropped. For the first
    /// policy after a time without one: connections opened then were never
    /// tracked, and an allowed one must not be cut by the policy's arrival.
    /// Only TCP, which opens nothing without a SYN: a stray ACK gets a
    /// reset from the local stack, and a bare SYN from the side that did
    /// not open a tracked flow is decided by the rules as the new
    /// connection it is; a UDP datagram the other way round is still a new
    /// flow. So no local port becomes reachable that the policy closes.
    pub fn start_pick_up(&mut self, now: Instant) {
        self.pick_up_until = Some(now + self.config.tcp_timeout);
    }

    /// Forgets every flow idle past its timeout.
    pub fn expire(&mut self, now: Instant) {
        for class in 0..CLASSES {
            loop {
                let oldest = self.lists[class].oldest;
                let Some(node) = self.slots.get(oldest).and_then(Option::as_ref) else {
                    break;
                };
                if !self.is_expired(node, now) {
                    break;
                }
                self.remove(oldest);
                self.counters.expired += 1;
            }
        }
    }

    /// The tracked flow `meta` belongs to, if any (for logs and status).
    pub fn tracked(&self, dir: Direction, meta: &PacketMeta) -> Option<TrackedFlow> {
        let key = FlowKey::of(
            dir,
            meta.proto,
            (meta.src, meta.sport),
            (meta.dst, meta.dport),
        );
        let node = self.slots.get(*self.index.get(&key)?)?.as_ref()?;
        Some(TrackedFlow {
            peer: node.flow.peer,
            opened: node.flow.opened,
            rule: node.flow.rule,
            generation: node.flow.generation,
            answered: node.flow.answered,
        })
    }

    pub fn flows(&self) -> usize {
        self.index.len()
    }

    /// The table's bound.
    pub fn max_flows(&self) -> usize {
        self.config.max_flows
    }

    pub fn counters(&self) -> &ConntrackCounters {
        &self.counters
    }

    /// Counts a drop decided outside `check` (a packet that did not parse).
    pub fn record_drop(&mut self, reason: DropReason) {
        let c = &mut self.counters;
        match reason {
            DropReason::Policy { .. } => c.dropped_policy += 1,
            DropReason::NoPeer => c.dropped_no_peer += 1,
            DropReason::Malformed => c.dropped_malformed += 1,
            DropReason::NotTracked => c.dropped_not_tracked += 1,
            DropReason::NotLocal => c.dropped_not_local += 1,
            DropReason::TableFull => {}
        }
    }

    fn check_with<R: Rules>(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        rules: &R,
        generation: u64,
        now: Instant,
    ) -> Verdict {
        if self.generation != Some(generation) {
            self.generation = Some(generation);
            self.counters.rule_hits.resize(rules.rules(), 0);
        }
        let verdict = if let Some(quoted) = meta.icmp_error_of {
            self.icmp_error(dir, meta, quoted, rules, generation, now)
        } else if meta.fragment {
            self.later_fragment(dir, meta, rules)
        } else {
            self.packet(dir, meta, rules, generation, now)
        };
        if let Verdict::Drop(reason) = verdict {
            self.record_drop(reason);
        }
        verdict
    }

    fn packet<R: Rules>(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        rules: &R,
        generation: u64,
        now: Instant,
    ) -> Verdict {
        let key = FlowKey::of(
            dir,
            meta.proto,
            (meta.src, meta.sport),
            (meta.dst, meta.dport),
        );
        // Only a bare SYN opens a TCP flow (not SYN-ACK, nor SYN with RST or FIN).
        let opens = meta.proto != PROTO_TCP
            || meta.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN;
        if let Some(i) = self.live(&key, now) {
            let reopened = opens
                && meta.proto == PROTO_TCP
                && self.slots[i].as_ref().is_some_and(|n| n.flow.closed);
            // A bare SYN from the side that did not open the flow is no
            // packet of it: it would open the reverse connection, which
            // the rules decide (a flow picked up or opened one way must
            // not lend the peer a way in the other).
            let reverse_syn = opens
                && meta.proto == PROTO_TCP
                && self.slots[i].as_ref().is_some_and(|n| n.flow.opened != dir);
            if reverse_syn && !reopened {
                return match rules.peer_for(key.remote) {
                    None => Verdict::Drop(DropReason::NoPeer),
                    Some(peer) => match rules.decide(dir, peer, meta.proto, meta.dport) {
                        Decision::Allow { .. } => Verdict::Pass,
                        Decision::Deny { rule } => Verdict::Drop(DropReason::Policy { rule }),
                    },
                };
            }
            if !reopened {
                if let Err(reason) = self.recheck(i, rules, generation) {
                    return Verdict::Drop(reason);
                }
                if let Some(node) = self.slots[i].as_mut() {
                    let from_opener = dir == node.flow.opened;
                    node.flow.saw(meta.proto, from_opener, meta.tcp_flags);
                    node.flow.last_seen = now;
                }
                self.relink(i);
                return Verdict::Pass;
            }
            // A new connection on the 5-tuple of a closed one: decided afresh.
            self.remove(i);
        }
        if !opens {
            // A mid-stream segment carries ACK (every one after the SYN
            // does), and no SYN or RST.
            let picking_up = meta.proto == PROTO_TCP
                && meta.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
                && self.pick_up_until.is_some_and(|until| now < until);
            if picking_up {
                return self.pick_up(dir, meta, key, rules, generation, now);
            }
            return Verdict::Drop(DropReason::NotTracked);
        }
        let Some(peer) = rules.peer_for(key.remote) else {
            return Verdict::Drop(DropReason::NoPeer);
        };
        match rules.decide(dir, peer, meta.proto, meta.dport) {
            Decision::Allow { rule } => {
                self.hit(rule);
                let flow = Flow {
                    peer,
                    opened: dir,
                    rule,
                    generation,
                    last_seen: now,
                    answered: false,
                    opener_acked: false,
                    fin_opener: false,
                    fin_answerer: false,
                    closed: false,
                };
                self.insert(key, flow, now);
                Verdict::Pass
            }
            Decision::Deny { rule } => {
                if let Some(rule) = rule {
                    self.hit(rule);
                }
                Verdict::Drop(DropReason::Policy { rule })
            }
        }
    }

    /// Tracks a mid-stream TCP segment's connection if the policy allows it
    /// as opened by either side (see [`Conntrack::start_pick_up`]).
    fn pick_up<R: Rules>(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        key: FlowKey,
        rules: &R,
        generation: u64,
        now: Instant,
    ) -> Verdict {
        let Some(peer) = rules.peer_for(key.remote) else {
            return Verdict::Drop(DropReason::NoPeer);
        };
        let reverse = match dir {
            Direction::Inbound => Direction::Outbound,
            Direction::Outbound => Direction::Inbound,
        };
        let as_sent = rules.decide(dir, peer, meta.proto, meta.dport);
        let (opened, rule) = match as_sent {
            Decision::Allow { rule } => (dir, rule),
            Decision::Deny { rule: denied } => {
                match rules.decide(reverse, peer, meta.proto, meta.sport) {
                    Decision::Allow { rule } => (reverse, rule),
                    Decision::Deny { .. } => {
                        return Verdict::Drop(DropReason::Policy { rule: denied });
                    }
                }
            }
        };
        self.hit(rule);
        self.counters.picked_up += 1;
        let flow = Flow {
            peer,
            opened,
            rule,
            generation,
            last_seen: now,
            answered: dir != opened,
            // Mid-stream: established once both sides have been seen, the
            // opener with an acknowledgement.
            opener_acked: dir == opened && meta.tcp_flags & TCP_ACK != 0,
            fin_opener: false,
            fin_answerer: false,
            closed: false,
        };
        self.insert(key, flow, now);
        Verdict::Pass
    }

    /// An ICMP error passes only when it is about a tracked flow and comes
    /// from (or goes to) that flow's peer: another peer cannot reset or
    /// shrink the MTU of a flow it is not part of.
    fn icmp_error<R: Rules>(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        (qsrc, qdst, qproto, qsport, qdport): (IpAddr, IpAddr, u8, u16, u16),
        rules: &R,
        generation: u64,
        now: Instant,
    ) -> Verdict {
        // The quoted packet went the other way: an error this node receives
        // is about a packet it sent, and vice versa.
        let (key, error_remote) = match dir {
            Direction::Inbound => (
                FlowKey::of(Direction::Outbound, qproto, (qsrc, qsport), (qdst, qdport)),
                meta.src,
            ),
            Direction::Outbound => (
                FlowKey::of(Direction::Inbound, qproto, (qsrc, qsport), (qdst, qdport)),
                meta.dst,
            ),
        };
        let Some(i) = self.live(&key, now) else {
            return Verdict::Drop(DropReason::NotTracked);
        };
        if let Err(reason) = self.recheck(i, rules, generation) {
            return Verdict::Drop(reason);
        }
        let flow_peer = self.slots[i].as_ref().map(|n| n.flow.peer);
        if rules.peer_for(error_remote) != flow_peer {
            return Verdict::Drop(DropReason::NotTracked);
        }
        Verdict::Pass
    }

    /// A fragment after the first has no ports: it passes when a flow of its
    /// protocol between the same two addresses is tracked, or else when the
    /// policy allows its protocol on every port (it is never tracked).
    fn later_fragment<R: Rules>(
        &mut self,
        dir: Direction,
        meta: &PacketMeta,
        rules: &R,
    ) -> Verdict {
        let key = FlowKey::of(dir, meta.proto, (meta.src, 0), (meta.dst, 0));
        if self
            .pairs
            .contains_key(&(meta.proto, key.local, key.remote))
        {
            return Verdict::Pass;
        }
        let Some(peer) = rules.peer_for(key.remote) else {
            return Verdict::Drop(DropReason::NoPeer);
        };
        match rules.decide(dir, peer, meta.proto, 0) {
            Decision::Allow { .. } => Verdict::Pass,
            Decision::Deny { rule } => Verdict::Drop(DropReason::Policy { rule }),
        }
    }

    /// The slot of `key`'s flow if it is tracked and not yet idle past its
    /// timeout (an expired flow found here is forgotten and counted).
    fn live(&mut self, key: &FlowKey, now: Instant) -> Option<usize> {
        let i = *self.index.get(key)?;
        let node = self.slots.get(i)?.as_ref()?;
        if self.is_expired(node, now) {
            self.remove(i);
            self.counters.expired += 1;
            return None;
        }
        Some(i)
    }

    /// Decides a tracked flow again if the engine changed since it was last
    /// decided; a flow the new engine forbids is forgotten.
    fn recheck<R: Rules>(
        &mut self,
        i: usize,
        rules: &R,
        generation: u64,
    ) -> Result<(), DropReason> {
        let Some(node) = self.slots[i].as_mut() else {
            return Ok(());
        };
        if node.flow.generation == generation {
            return Ok(());
        }
        let opened = node.flow.opened;
        let decision = rules.peer_for(node.key.remote).map(|peer| {
            (
                peer,
                rules.decide(opened, peer, node.key.proto, node.key.opener_dport(opened)),
            )
        });
        match decision {
            Some((peer, Decision::Allow { rule })) => {
                node.flow.peer = peer;
                node.flow.rule = rule;
                node.flow.generation = generation;
                Ok(())
            }
            forbidden => {
                self.remove(i);
                self.counters.rechecked_dropped += 1;
                Err(match forbidden {
                    Some((_, Decision::Deny { rule })) => DropReason::Policy { rule },
                    _ => DropReason::NoPeer,
                })
            }
        }
    }

    fn hit(&mut self, rule: usize) {
        if let Some(count) = self.counters.rule_hits.get_mut(rule) {
            *count += 1;
        }
    }

    fn timeout(&self, class: Class) -> Duration {
        let c = &self.config;
        match class {
            Class::TcpClosed => TCP_CLOSED_TIMEOUT.min(c.tcp_timeout),
            Class::TcpOpening => TCP_OPENING_TIMEOUT.min(c.tcp_timeout),
            Class::TcpEstablished => c.tcp_timeout,
            Class::UdpUnanswered | Class::UdpAnswered => c.udp_timeout,
            Class::OtherUnanswered | Class::OtherAnswered => c.other_timeout,
        }
    }

    fn is_expired(&self, node: &Node, now: Instant) -> bool {
        now.saturating_duration_since(node.flow.last_seen) >= self.timeout(node.class)
    }

    fn insert(&mut self, key: FlowKey, flow: Flow, now: Instant) {
        if self.index.len() >= self.config.max_flows {
            self.expire(now);
        }
        while self.index.len() >= self.config.max_flows {
            let Some(victim) = self.least_recently_seen() else {
                break;
            };
            self.remove(victim);
            self.counters.evicted += 1;
        }
        let class = flow.class(key.proto);
        let node = Node {
            key,
            flow,
            class,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(node);
                i
            }
            None => {
                self.slots.push(Some(node));
                self.slots.len() - 1
            }
        };
        self.index.insert(key, i);
        *self
            .pairs
            .entry((key.proto, key.local, key.remote))
            .or_insert(0) += 1;
        self.push_newest(i, class);
        self.counters.new += 1;
    }

    /// The eviction victim: the least recently seen unanswered flow, or if
    /// there is none, the least recently seen flow.
    fn least_recently_seen(&self) -> Option<usize> {
        let oldest_of = |lists: &[Ends]| {
            lists
                .iter()
                .filter_map(|ends| {
                    let node = self.slots.get(ends.oldest)?.as_ref()?;
                    Some((node.flow.last_seen, ends.oldest))
                })
                .min()
                .map(|(_, i)| i)
        };
        oldest_of(&self.lists[..EVICT_FIRST]).or_else(|| oldest_of(&self.lists[EVICT_FIRST..]))
    }

    fn remove(&mut self, i: usize) {
        self.unlink(i);
        let Some(node) = self.slots.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.index.remove(&node.key);
        let pair = (node.key.proto, node.key.local, node.key.remote);
        if let Some(count) = self.pairs.get_mut(&pair) {
            *count -= 1;
            if *count == 0 {
                self.pairs.remove(&pair);
            }
        }
        self.free.push(i);
    }

    /// Moves a flow to the newest end of the list of its (possibly new) class.
    fn relink(&mut self, i: usize) {
        let Some((class, unchanged)) = self.slots[i].as_ref().map(|n| {
            let class = n.flow.class(n.key.proto);
            (class, class == n.class && n.newer == NIL)
        }) else {
            return;
        };
        if unchanged {
            // Already the newest of its list: a busy stream's common case.
            return;
        }
        self.unlink(i);
        self.push_newest(i, class);
    }

    fn unlink(&mut self, i: usize) {
        let Some(node) = self.slots.get(i).and_then(Option::as_ref) else {
            return;
        };
        let (class, newer, older) = (node.class as usize, node.newer, node.older);
        match self.slots.get_mut(newer).and_then(Option::as_mut) {
            Some(n) => n.older = older,
            None => self.lists[class].newest = older,
        }
        match self.slots.get_mut(older).and_then(Option::as_mut) {
            Some(n) => n.newer = newer,
            None => self.lists[class].oldest = newer,
        }
    }

    fn push_newest(&mut self, i: usize, class: Class) {
        let ends = &mut self.lists[class as usize];
        let previous = ends.newest;
        ends.newest = i;
        if previous == NIL {
            ends.oldest = i;
        }
        if let Some(n) = self.slots.get_mut(previous).and_then(Option::as_mut) {
            n.newer = i;
        }
        if let Some(n) = self.slots[i].as_mut() {
            n.class = class;
            n.newer = NIL;
            n.older = previous;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{PROTO_ICMP, build, parse};
    use super::*;
    use std::cell::Cell;
    use std::net::Ipv4Addr;

    const LOCAL: u8 = 1;

    fn addr(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, last))
    }

    /// A scripted engine: peer `n` is 10.77.0.(n+2); it allows what
    /// `allow` says (rule 0) and denies the rest by default.
    struct Script<F: Fn(Direction, usize, u8, u16) -> bool> {
        allow: F,
        walks: Cell<usize>,
        rules: usize,
    }

    fn script<F: Fn(Direction, usize, u8, u16) -> bool>(allow: F) -> Script<F> {
        Script {
            allow,
            walks: Cell::new(0),
            rules: 1,
        }
    }

    impl<F: Fn(Direction, usize, u8, u16) -> bool> Rules for Script<F> {
        fn peer_for(&self, ip: IpAddr) -> Option<usize> {
            match ip {
                IpAddr::V4(v4) if v4.octets()[..3] == [10, 77, 0] && v4.octets()[3] >= 2 => {
                    Some(usize::from(v4.octets()[3] - 2))
                }
                _ => None,
            }
        }
        fn decide(&self, dir: Direction, peer: usize, proto: u8, dport: u16) -> Decision {
            self.walks.set(self.walks.get() + 1);
            if (self.allow)(dir, peer, proto, dport) {
                Decision::Allow { rule: 0 }
            } else {
                Decision::Deny { rule: None }
            }
        }
        fn rules(&self) -> usize {
            self.rules
        }
    }

    fn meta(packet: Vec<u8>) -> PacketMeta {
        parse(&packet).unwrap()
    }

    fn out_tcp(peer: u8, sport: u16, dport: u16, flags: u8) -> PacketMeta {
        meta(build::tcp(addr(LOCAL), sport, addr(peer), dport, flags))
    }

    fn in_tcp(peer: u8, sport: u16, dport: u16, flags: u8) -> PacketMeta {
        meta(build::tcp(addr(peer), sport, addr(LOCAL), dport, flags))
    }

    fn out_udp(peer: u8, sport: u16, dport: u16) -> PacketMeta {
        meta(build::udp(addr(LOCAL), sport, addr(peer), dport))
    }

    fn in_udp(peer: u8, sport: u16, dport: u16) -> PacketMeta {
        meta(build::udp(addr(peer), sport, addr(LOCAL), dport))
    }

    use Direction::{Inbound, Outbound};
    const PASS: Verdict = Verdict::Pass;
    const DEFAULT_DENY: Verdict = Verdict::Drop(DropReason::Policy { rule: None });

    fn outbound_only() -> Script<impl Fn(Direction, usize, u8, u16) -> bool> {
        script(|dir, _, _, _| dir == Outbound)
    }

    /// A TCP connection open before the first policy came into force (the
    /// table tracked nothing then) and allowed by it keeps going: within
    /// the pick-up window a mid-stream segment of an untracked connection
    /// the policy allows, in either orientation, is tracked. Nothing else
    /// is: not a denied one, not UDP the other way, not after the window.
    #[test]
    fn tcp_connections_from_before_the_first_policy_are_picked_up_in_the_window() {
        // Outbound to any port of peer 0; inbound only to port 22.
        let rules = script(|dir, peer, _, dport| peer == 0 && (dir == Outbound || dport == 22));
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let ack = TCP_ACK;
        // Without a window: mid-stream segments of unknown flows are dropped.
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 40_000, 5432, ack), &rules, 1, t),
            Verdict::Drop(DropReason::NotTracked)
        );
        ct.start_pick_up(t);
        // We opened it (to 5432): our segment picks it up, its reply passes.
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 40_000, 5432, ack), &rules, 1, t),
            PASS
        );
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 5432, 40_000, ack), &rules, 1, t),
            PASS
        );
        // The reply side speaks first: picked up the same way round.
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 6000, 40_001, ack), &rules, 1, t),
            PASS
        );
        let f = ct.tracked(Inbound, &in_tcp(2, 6000, 40_001, ack)).unwrap();
        assert_eq!(
            f.opened, Outbound,
            "40001 -> 6000 is the allowed orientation"
        );
        // The peer opened it to our port 22.
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 50_000, 22, ack), &rules, 1, t),
            PASS
        );
        assert_eq!(
            ct.tracked(Inbound, &in_tcp(2, 50_000, 22, ack))
                .unwrap()
                .opened,
            Inbound
        );
        assert_eq!(ct.counters().picked_up, 3);
        // Peer 1 may not talk to us at all: no orientation is allowed.
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(3, 50_000, 22, ack), &rules, 1, t),
            DEFAULT_DENY
        );
        // UDP the other way round is a new inbound flow, decided as ever:
        // a reply-looking datagram reaches no local port through the window.
        assert_eq!(
            ct.check_with(Inbound, &in_udp(2, 53, 40_002), &rules, 1, t),
            DEFAULT_DENY
        );
        // After the window (the established timeout): strict again.
        let window = ConntrackConfig::default().tcp_timeout;
        let mid = t + window / 2;
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 40_000, 5432, ack), &rules, 1, mid),
            PASS
        );
        let later = t + window;
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 50_001, 22, ack), &rules, 1, later),
            Verdict::Drop(DropReason::NotTracked)
        );
        // A picked-up flow stays tracked after the window.
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 5432, 40_000, ack), &rules, 1, later),
            PASS
        );
    }

    #[test]
    fn replies_pass_without_a_rule_walk_and_unsolicited_inbound_is_dropped() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let syn = out_tcp(2, 40000, 5432, TCP_SYN);
        assert_eq!(ct.check_with(Outbound, &syn, &rules, 1, t), PASS);
        assert_eq!(rules.walks.get(), 1);
        let synack = in_tcp(2, 5432, 40000, TCP_SYN | TCP_ACK);
        assert_eq!(ct.check_with(Inbound, &synack, &rules, 1, t), PASS);
        let ack = out_tcp(2, 40000, 5432, TCP_ACK);
        assert_eq!(ct.check_with(Outbound, &ack, &rules, 1, t), PASS);
        assert_eq!(rules.walks.get(), 1, "tracked packets skip the rules");
        assert_eq!(ct.flows(), 1);

        // The peer opening its own connection to us: the policy says no.
        let unsolicited = in_tcp(2, 5432, 22, TCP_SYN);
        assert_eq!(
            ct.check_with(Inbound, &unsolicited, &rules, 1, t),
            DEFAULT_DENY
        );
        // A forged mid-stream segment of no tracked flow.
        let stray = in_tcp(2, 5432, 40001, TCP_ACK);
        assert_eq!(
            ct.check_with(Inbound, &stray, &rules, 1, t),
            Verdict::Drop(DropReason::NotTracked)
        );
        let udp = in_udp(3, 53, 5353);
        assert_eq!(ct.check_with(Inbound, &udp, &rules, 1, t), DEFAULT_DENY);
        // No peer holds this address.
        let nowhere = meta(build::udp(addr(LOCAL), 1, addr(0), 2));
        assert_eq!(
            ct.check_with(Outbound, &nowhere, &rules, 1, t),
            Verdict::Drop(DropReason::NoPeer)
        );

        let c = ct.counters();
        assert_eq!(c.new, 1);
        assert_eq!(c.rule_hits, vec![1]);
        assert_eq!(c.dropped_policy, 2);
        assert_eq!(c.dropped_not_tracked, 1);
        assert_eq!(c.dropped_no_peer, 1);
    }

    #[test]
    fn the_opener_may_be_the_peer() {
        // Inbound to port 22 allowed; our replies pass, our own SYN to it does not.
        let rules = script(|dir, _, _, dport| dir == Inbound && dport == 22);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 50000, 22, TCP_SYN), &rules, 1, t),
            PASS
        );
        let reply = out_tcp(2, 22, 50000, TCP_SYN | TCP_ACK);
        assert_eq!(ct.check_with(Outbound, &reply, &rules, 1, t), PASS);
        let ours = out_tcp(2, 50001, 22, TCP_SYN);
        assert_eq!(ct.check_with(Outbound, &ours, &rules, 1, t), DEFAULT_DENY);
    }

    #[test]
    fn ping_and_its_reply_are_one_flow() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let ping = meta(build::echo(addr(LOCAL), addr(2), 42, false));
        let pong = meta(build::echo(addr(2), addr(LOCAL), 42, true));
        let other = meta(build::echo(addr(2), addr(LOCAL), 43, true));
        assert_eq!(ct.check_with(Outbound, &ping, &rules, 1, t), PASS);
        assert_eq!(ct.check_with(Inbound, &pong, &rules, 1, t), PASS);
        assert_eq!(ct.check_with(Inbound, &other, &rules, 1, t), DEFAULT_DENY);
    }

    #[test]
    fn flows_expire_by_protocol_and_state() {
        let rules = outbound_only();
        let config = ConntrackConfig::default();
        let mut ct = Conntrack::new(config.clone());
        let t = Instant::now();
        let second = Duration::from_secs(1);

        // Established TCP, answered UDP, ICMP, an unanswered SYN, a closed TCP.
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_SYN), &rules, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 80, 1000, TCP_SYN | TCP_ACK),
            &rules,
            1,
            t,
        );
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_ACK), &rules, 1, t);
        ct.check_with(Outbound, &out_udp(2, 2000, 53), &rules, 1, t);
        ct.check_with(Inbound, &in_udp(2, 53, 2000), &rules, 1, t);
        let ping = meta(build::echo(addr(LOCAL), addr(2), 7, false));
        ct.check_with(Outbound, &ping, &rules, 1, t);
        ct.check_with(Outbound, &out_tcp(3, 3000, 80, TCP_SYN), &rules, 1, t);
        ct.check_with(Outbound, &out_tcp(2, 4000, 80, TCP_SYN), &rules, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 80, 4000, TCP_RST | TCP_ACK),
            &rules,
            1,
            t,
        );
        assert_eq!(ct.flows(), 5);

        ct.expire(t + TCP_CLOSED_TIMEOUT - second);
        assert_eq!(ct.flows(), 5);
        ct.expire(t + TCP_CLOSED_TIMEOUT);
        assert_eq!(ct.flows(), 4, "closed TCP goes first");
        ct.expire(t + TCP_OPENING_TIMEOUT);
        assert_eq!(ct.flows(), 3, "then the unanswered SYN");
        ct.expire(t + config.udp_timeout - second);
        assert_eq!(ct.flows(), 3);
        ct.expire(t + config.udp_timeout);
        assert_eq!(ct.flows(), 2, "then UDP");
        ct.expire(t + config.other_timeout);
        assert_eq!(ct.flows(), 1, "then ICMP");
        // The established flow has been idle 10 minutes: still there, and a
        // packet refreshes it.
        let later = t + config.other_timeout;
        let ack = out_tcp(2, 1000, 80, TCP_ACK);
        assert_eq!(ct.check_with(Outbound, &ack, &rules, 1, later), PASS);
        ct.expire(later + config.tcp_timeout - second);
        assert_eq!(ct.flows(), 1);
        ct.expire(later + config.tcp_timeout);
        assert_eq!(ct.flows(), 0);
        assert_eq!(ct.counters().expired, 5);

        // A reply after its flow expired is no longer a reply.
        let late = in_udp(2, 53, 2000);
        let much_later = later + config.tcp_timeout;
        assert_eq!(
            ct.check_with(Inbound, &late, &rules, 1, much_later),
            DEFAULT_DENY
        );
    }

    #[test]
    fn an_expired_flow_is_not_used_even_before_expire_runs() {
        let rules = outbound_only();
        let config = ConntrackConfig::default();
        let mut ct = Conntrack::new(config.clone());
        let t = Instant::now();
        ct.check_with(Outbound, &out_udp(2, 2000, 53), &rules, 1, t);
        let late = in_udp(2, 53, 2000);
        assert_eq!(
            ct.check_with(Inbound, &late, &rules, 1, t + config.udp_timeout),
            DEFAULT_DENY
        );
        assert_eq!(ct.counters().expired, 1);
        assert_eq!(ct.flows(), 0);
    }

    #[test]
    fn fin_from_both_sides_closes_and_a_new_syn_reopens() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_SYN), &rules, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 80, 1000, TCP_SYN | TCP_ACK),
            &rules,
            1,
            t,
        );
        ct.check_with(
            Outbound,
            &out_tcp(2, 1000, 80, TCP_FIN | TCP_ACK),
            &rules,
            1,
            t,
        );
        // Half closed: still the established timeout.
        ct.expire(t + TCP_CLOSED_TIMEOUT);
        assert_eq!(ct.flows(), 1);
        let t = t + TCP_CLOSED_TIMEOUT;
        ct.check_with(
            Inbound,
            &in_tcp(2, 80, 1000, TCP_FIN | TCP_ACK),
            &rules,
            1,
            t,
        );
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_ACK), &rules, 1, t);
        ct.expire(t + TCP_CLOSED_TIMEOUT);
        assert_eq!(ct.flows(), 0);

        // Closed, then the same 5-tuple opened again: decided and tracked anew.
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_SYN), &rules, 1, t);
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_RST), &rules, 1, t);
        let walks = rules.walks.get();
        ct.check_with(Outbound, &out_tcp(2, 1000, 80, TCP_SYN), &rules, 1, t);
        assert_eq!(rules.walks.get(), walks + 1);
        ct.expire(t + TCP_CLOSED_TIMEOUT);
        assert_eq!(ct.flows(), 1, "the reopened flow is not closed");
    }

    /// The review's finding: a peer that this node may only open
    /// connections to (port 5432) must not reach local port 22 through the
    /// pick-up window: a segment without ACK is no mid-stream segment (a
    /// listening socket drops a flagless one silently, so it would have
    /// stood as a picked-up flow), and a bare SYN from the side that did
    /// not open a tracked flow is decided as the new flow it is.
    #[test]
    fn the_pick_up_window_opens_no_port_the_policy_closes() {
        let rules = script(|dir, _, _, dport| dir == Outbound && dport == 5432);
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        ct.start_pick_up(t);
        for flags in [0, TCP_FIN, TCP_SYN | TCP_FIN] {
            assert_ne!(
                ct.check_with(Inbound, &in_tcp(2, 5432, 22, flags), &rules, 1, t),
                PASS,
                "flags {flags:#x}"
            );
        }
        // An ACK the other way round is picked up (as our connection to
        // 5432: the local stack answers it with a reset if it is not)...
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 5432, 22, TCP_ACK), &rules, 1, t),
            PASS
        );
        // ...but it lends the peer no SYN to our port 22.
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 5432, 22, TCP_SYN), &rules, 1, t),
            DEFAULT_DENY
        );
        assert_eq!(ct.counters().picked_up, 1);
        // The same holds for a flow opened the ordinary way.
        let mut ct = Conntrack::new(ConntrackConfig::default());
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 40_000, 5432, TCP_SYN), &rules, 1, t),
            PASS
        );
        assert_eq!(
            ct.check_with(Inbound, &in_tcp(2, 5432, 40_000, TCP_SYN), &rules, 1, t),
            DEFAULT_DENY,
            "a SYN from the answering side"
        );
        assert_eq!(
            ct.check_with(
                Inbound,
                &in_tcp(2, 5432, 40_000, TCP_SYN | TCP_ACK),
                &rules,
                1,
                t
            ),
            PASS
        );
    }

    /// A SYN the server answered but whose opener never acknowledged the
    /// answer (a SYN flood from a peer allowed to reach an open port) is
    /// still opening: evicted before an established connection, even one
    /// seen less recently.
    #[test]
    fn an_answered_syn_is_not_established_until_the_opener_acknowledges() {
        let rules = script(|dir, _, _, _| dir == Inbound);
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 2,
            ..ConntrackConfig::default()
        });
        let t = Instant::now();
        let s = Duration::from_secs(1);
        // A full handshake, the oldest flow.
        ct.check_with(Inbound, &in_tcp(2, 1000, 22, TCP_SYN), &rules, 1, t);
        ct.check_with(
            Outbound,
            &out_tcp(2, 22, 1000, TCP_SYN | TCP_ACK),
            &rules,
            1,
            t,
        );
        ct.check_with(Inbound, &in_tcp(2, 1000, 22, TCP_ACK), &rules, 1, t);
        // A SYN answered, never acknowledged; then a third flow.
        ct.check_with(Inbound, &in_tcp(2, 1001, 22, TCP_SYN), &rules, 1, t + s);
        ct.check_with(
            Outbound,
            &out_tcp(2, 22, 1001, TCP_SYN | TCP_ACK),
            &rules,
            1,
            t + s,
        );
        ct.check_with(Inbound, &in_tcp(2, 1002, 22, TCP_SYN), &rules, 1, t + 2 * s);
        assert_eq!(ct.counters().evicted, 1);
        let at = t + 3 * s;
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 22, 1000, TCP_ACK), &rules, 1, at),
            PASS
        );
        assert_eq!(
            ct.check_with(Outbound, &out_tcp(2, 22, 1001, TCP_ACK), &rules, 1, at),
            Verdict::Drop(DropReason::NotTracked),
            "the half-open flow went first"
        );
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen_unanswered_flow_first() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: 3,
            ..ConntrackConfig::default()
        });
        let t = Instant::now();
        let s = Duration::from_secs(1);
        // An answered flow, the oldest of all.
        ct.check_with(Outbound, &out_udp(2, 1, 53), &rules, 1, t);
        ct.check_with(Inbound, &in_udp(2, 53, 1), &rules, 1, t);
        ct.check_with(Outbound, &out_udp(2, 2, 53), &rules, 1, t + s);
        ct.check_with(Outbound, &out_udp(2, 3, 53), &rules, 1, t + 2 * s);
        // Seeing port 2 again makes port 3 the least recently seen unanswered.
        ct.check_with(Outbound, &out_udp(2, 2, 53), &rules, 1, t + 3 * s);
        ct.check_with(Outbound, &out_udp(2, 4, 53), &rules, 1, t + 4 * s);
        assert_eq!(ct.flows(), 3);
        assert_eq!(ct.counters().evicted, 1);
        assert_eq!(ct.counters().new, 4);
        let reply = |port| in_udp(2, 53, port);
        let at = t + 5 * s;
        assert_eq!(ct.check_with(Inbound, &reply(1), &rules, 1, at), PASS);
        assert_eq!(ct.check_with(Inbound, &reply(2), &rules, 1, at), PASS);
        assert_eq!(ct.check_with(Inbound, &reply(4), &rules, 1, at), PASS);
        assert_eq!(
            ct.check_with(Inbound, &reply(3), &rules, 1, at),
            DEFAULT_DENY
        );

        // All answered now: the least recently seen of them goes.
        ct.check_with(Outbound, &out_udp(2, 1, 53), &rules, 1, t + 6 * s);
        ct.check_with(Outbound, &out_udp(2, 5, 53), &rules, 1, t + 7 * s);
        assert_eq!(ct.counters().evicted, 2);
        assert_eq!(
            ct.check_with(Inbound, &reply(2), &rules, 1, t + 8 * s),
            DEFAULT_DENY
        );
        assert_eq!(
            ct.check_with(Inbound, &reply(1), &rules, 1, t + 8 * s),
            PASS
        );
    }

    #[test]
    fn a_flood_of_new_flows_keeps_the_table_at_its_bound_and_established_flows_alive() {
        let rules = script(|_, _, _, _| true);
        let max = 64;
        let mut ct = Conntrack::new(ConntrackConfig {
            max_flows: max,
            ..ConntrackConfig::default()
        });
        let t = Instant::now();
        ct.check_with(Outbound, &out_tcp(2, 1000, 5432, TCP_SYN), &rules, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 5432, 1000, TCP_SYN | TCP_ACK),
            &rules,
            1,
            t,
        );
        ct.check_with(Outbound, &out_tcp(2, 1000, 5432, TCP_ACK), &rules, 1, t);
        let flood = 10_000u16;
        for i in 0..flood {
            let syn = in_tcp(3, 10_000 + i, 80, TCP_SYN);
            assert_eq!(ct.check_with(Inbound, &syn, &rules, 1, t), PASS);
            assert!(ct.flows() <= max);
        }
        assert_eq!(ct.flows(), max);
        assert_eq!(ct.counters().evicted, u64::from(flood) - (max as u64 - 1));
        // The established flow was idle through the flood and survived it.
        let data = in_tcp(2, 5432, 1000, TCP_ACK);
        let walks = rules.walks.get();
        assert_eq!(ct.check_with(Inbound, &data, &rules, 1, t), PASS);
        assert_eq!(rules.walks.get(), walks, "still tracked");
        // The slab did not grow past the bound either.
        assert!(ct.slots.len() <= max);
    }

    #[test]
    fn a_new_generation_drops_and_untracks_a_forbidden_flow_and_keeps_the_others() {
        let t = Instant::now();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let open = script(|dir, _, _, _| dir == Outbound);
        ct.check_with(Outbound, &out_tcp(2, 1000, 22, TCP_SYN), &open, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 22, 1000, TCP_SYN | TCP_ACK),
            &open,
            1,
            t,
        );
        ct.check_with(Outbound, &out_tcp(2, 1001, 5432, TCP_SYN), &open, 1, t);
        ct.check_with(
            Inbound,
            &in_tcp(2, 5432, 1001, TCP_SYN | TCP_ACK),
            &open,
            1,
            t,
        );
        assert_eq!(ct.flows(), 2);

        // The new policy allows only port 5432.
        let narrowed = script(|dir, _, _, dport| dir == Outbound && dport == 5432);
        let reply22 = in_tcp(2, 22, 1000, TCP_ACK);
        assert_eq!(
            ct.check_with(Inbound, &reply22, &narrowed, 2, t),
            DEFAULT_DENY
        );
        assert_eq!(ct.flows(), 1);
        assert_eq!(ct.counters().rechecked_dropped, 1);
        // Untracked: its next packet is no longer part of a flow.
        let again = out_tcp(2, 1000, 22, TCP_ACK);
        assert_eq!(
            ct.check_with(Outbound, &again, &narrowed, 2, t),
            Verdict::Drop(DropReason::NotTracked)
        );
        // The allowed flow is re-decided once (by the opener's port, even
        // on a reply), then passes without a walk.
        let reply5432 = in_tcp(2, 5432, 1001, TCP_ACK);
        assert_eq!(ct.check_with(Inbound, &reply5432, &narrowed, 2, t), PASS);
        assert_eq!(ct.tracked(Inbound, &reply5432).unwrap().generation, 2);
        assert_eq!(ct.tracked(Outbound, &again), None);
        let walks = narrowed.walks.get();
        assert_eq!(ct.check_with(Inbound, &reply5432, &narrowed, 2, t), PASS);
        assert_eq!(narrowed.walks.get(), walks);
        assert_eq!(ct.counters().rechecked_dropped, 1);
    }

    #[test]
    fn rule_hits_follow_the_engine_s_rules() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        ct.check_with(Outbound, &out_udp(2, 1, 53), &rules, 1, t);
        ct.check_with(Outbound, &out_udp(2, 2, 53), &rules, 1, t);
        // Rechecks and tracked packets are no hits.
        ct.check_with(Outbound, &out_udp(2, 2, 53), &rules, 2, t);
        assert_eq!(ct.counters().rule_hits, vec![2]);
        let mut three = script(|_, _, _, dport| dport == 53);
        three.rules = 3;
        ct.check_with(Outbound, &out_udp(2, 3, 53), &three, 3, t);
        assert_eq!(ct.counters().rule_hits, vec![3, 0, 0]);
    }

    #[test]
    fn icmp_errors_pass_only_for_a_tracked_flow_of_their_peer() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let sent = build::tcp(addr(LOCAL), 1000, addr(2), 80, TCP_SYN);
        ct.check_with(Outbound, &parse(&sent).unwrap(), &rules, 1, t);

        // Packet too big / unreachable from the peer about our flow.
        let about_ours = meta(build::icmp_error(addr(2), addr(LOCAL), 3, 4, &sent));
        assert_eq!(ct.check_with(Inbound, &about_ours, &rules, 1, t), PASS);
        // The same claim made by another peer.
        let from_other = meta(build::icmp_error(addr(3), addr(LOCAL), 3, 4, &sent));
        assert_eq!(
            ct.check_with(Inbound, &from_other, &rules, 1, t),
            Verdict::Drop(DropReason::NotTracked)
        );
        // About a flow nobody opened.
        let never = build::tcp(addr(LOCAL), 1001, addr(2), 80, TCP_SYN);
        let unrelated = meta(build::icmp_error(addr(2), addr(LOCAL), 3, 1, &never));
        assert_eq!(
            ct.check_with(Inbound, &unrelated, &rules, 1, t),
            Verdict::Drop(DropReason::NotTracked)
        );
        // This node's own error about a packet the peer sent on an allowed
        // inbound flow goes out.
        let inbound_ok = script(|_, _, _, _| true);
        let theirs = build::udp(addr(2), 5000, addr(LOCAL), 9);
        ct.check_with(Inbound, &parse(&theirs).unwrap(), &inbound_ok, 1, t);
        let port_unreachable = meta(build::icmp_error(addr(LOCAL), addr(2), 3, 3, &theirs));
        assert_eq!(
            ct.check_with(Outbound, &port_unreachable, &rules, 1, t),
            PASS
        );
        // Errors never open flows.
        assert_eq!(ct.flows(), 2);
        assert_eq!(ct.counters().dropped_not_tracked, 2);
        assert_eq!(about_ours.proto, PROTO_ICMP);
    }

    #[test]
    fn later_fragments_follow_their_flow() {
        let rules = outbound_only();
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let fragment = |src, dst| {
            let mut p = build::udp(src, 0, dst, 0);
            p[7] = 0x10;
            meta(p)
        };
        // No flow yet: the policy decides (and the scripted one says no inbound).
        let early = fragment(addr(2), addr(LOCAL));
        assert!(early.fragment);
        assert_eq!(ct.check_with(Inbound, &early, &rules, 1, t), DEFAULT_DENY);
        ct.check_with(Outbound, &out_udp(2, 2000, 53), &rules, 1, t);
        assert_eq!(ct.check_with(Inbound, &early, &rules, 1, t), PASS);
        // Another peer's fragments are not covered by that flow.
        let other = fragment(addr(3), addr(LOCAL));
        assert_eq!(ct.check_with(Inbound, &other, &rules, 1, t), DEFAULT_DENY);
        assert_eq!(ct.flows(), 1);
    }

    /// Walks every list both ways: each tracked flow is on exactly the list
    /// of its class, lists are ordered by last seen, and nothing else is.
    fn assert_consistent(ct: &Conntrack) {
        let mut seen = 0;
        for (class, ends) in ct.lists.iter().enumerate() {
            let mut at = ends.oldest;
            let mut newer_than = None;
            let mut previous = NIL;
            while at != NIL {
                let node = ct.slots[at].as_ref().expect("listed slot is live");
                assert_eq!(node.class as usize, class);
                assert_eq!(node.class, node.flow.class(node.key.proto));
                assert_eq!(node.older, previous);
                assert_eq!(ct.index.get(&node.key), Some(&at));
                assert!(newer_than <= Some(node.flow.last_seen));
                newer_than = Some(node.flow.last_seen);
                previous = at;
                at = node.newer;
                seen += 1;
            }
            assert_eq!(ends.newest, previous);
        }
        assert_eq!(seen, ct.index.len());
        assert!(ct.index.len() <= ct.config.max_flows);
        let pairs: u32 = ct.pairs.values().sum();
        assert_eq!(pairs as usize, seen);
    }

    proptest::proptest! {
        #[test]
        fn the_table_stays_consistent_and_bounded(
            steps in proptest::collection::vec(
                (0u8..6, proptest::bool::ANY, 2u8..5, 0u16..6, 0u8..0x20, 0u64..90, 0u64..3),
                1..300,
            ),
        ) {
            let rules = script(|_, peer, _, dport| peer != 2 || dport % 2 == 0);
            let mut ct = Conntrack::new(ConntrackConfig { max_flows: 8, ..ConntrackConfig::default() });
            let mut now = Instant::now();
            let mut generation = 1;
            for (kind, inbound, peer, port, flags, advance, bump) in steps {
                now += Duration::from_secs(advance);
                generation += bump / 2;
                let dir = if inbound { Inbound } else { Outbound };
                let (a, b) = if inbound { (addr(peer), addr(LOCAL)) } else { (addr(LOCAL), addr(peer)) };
                // Odd kinds are shaped as answers to even kinds' packets.
                let (sport, dport) = if kind % 2 == 1 {
                    (2000 + port % 2, 1000 + port)
                } else {
                    (1000 + port, 2000 + port % 2)
                };
                let packet = match kind {
                    0 | 1 => build::tcp(a, sport, b, dport, flags),
                    2 | 3 => build::udp(a, sport, b, dport),
                    4 => build::echo(a, b, port, inbound),
                    _ => {
                        let original = build::udp(b, 1000 + port, a, 2000);
                        build::icmp_error(a, b, 3, 3, &original)
                    }
                };
                ct.check_with(dir, &parse(&packet).unwrap(), &rules, generation, now);
                assert_consistent(&ct);
                if advance > 80 {
                    ct.expire(now);
                    assert_consistent(&ct);
                }
            }
        }
    }

    #[test]
    fn the_real_engine_drives_it() {
        use super::super::engine::PeerInfo;
        use super::super::policy::{Action, PortRange, Proto, Rule, Selector};
        let node = |name: &str, group: &str, last: u8| PeerInfo {
            name: name.into(),
            groups: vec![group.into()],
            attributes: Default::default(),
            addresses: vec![format!("10.77.0.{last}/32").parse().unwrap()],
        };
        let group = |g: &str| Selector {
            groups: vec![g.into()],
            ..Selector::default()
        };
        let policy = super::super::policy::Policy {
            rules: vec![Rule {
                name: "web-to-db".into(),
                action: Action::Allow,
                from: group("web"),
                to: group("db"),
                proto: Proto::Tcp,
                ports: vec![PortRange {
                    first: 5432,
                    last: 5432,
                }],
            }],
        };
        let engine = Engine::new(
            &policy,
            &node("web1", "web", LOCAL),
            &[node("db1", "db", 2)],
        );
        let mut ct = Conntrack::new(ConntrackConfig::default());
        let t = Instant::now();
        let syn = out_tcp(2, 40000, 5432, TCP_SYN);
        assert_eq!(ct.check(Outbound, &syn, &engine, 1, t), PASS);
        let synack = in_tcp(2, 5432, 40000, TCP_SYN | TCP_ACK);
        assert_eq!(ct.check(Inbound, &synack, &engine, 1, t), PASS);
        let flow = ct.tracked(Inbound, &synack).unwrap();
        assert_eq!((flow.rule, flow.opened, flow.answered), (0, Outbound, true));
        assert_eq!(engine.peer_name(flow.peer), "db1");
        let ssh = out_tcp(2, 40001, 22, TCP_SYN);
        assert_eq!(ct.check(Outbound, &ssh, &engine, 1, t), DEFAULT_DENY);
        let back = in_tcp(2, 40002, 5432, TCP_SYN);
        assert_eq!(ct.check(Inbound, &back, &engine, 1, t), DEFAULT_DENY);
        assert_eq!(ct.counters().rule_hits, vec![1]);
    }
}
