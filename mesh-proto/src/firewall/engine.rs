//! One node's compiled view of the policy.
//!
//! Compiled once per (policy, local identity, peers) change: for each peer
//! and direction, the list of rules whose selectors apply (deny rules first,
//! then allow rules, each in policy order), so that deciding a new flow is a
//! short scan on (proto, dport) with no selector work. Lists are shared
//! between peers with the same applicable rules (typically every member of
//! the same groups), so memory follows the number of distinct lists, not
//! peers x rules.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::policy::{Action, Policy, PortRange, Proto, ports_match};
use crate::prefix::IpPrefix;

/// A member's identity as the firewall sees it (from its certificate).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    pub groups: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    pub addresses: Vec<IpPrefix>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This node -> peer.
    Outbound,
    /// Peer -> this node.
    Inbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Allow {
        rule: usize,
    },
    /// `None`: no rule matched (default deny).
    Deny {
        rule: Option<usize>,
    },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

#[derive(Clone, Debug)]
struct CompiledRule {
    deny: bool,
    proto: Proto,
    ports: Box<[PortRange]>,
}

/// A marker in the address table: two peers claim the same prefix.
const CONFLICT: u32 = u32::MAX;

/// Longest-prefix match: one exact-match map per prefix length present,
/// tried from the longest. Addresses are host routes in practice, so a
/// lookup is one or two probes.
#[derive(Clone, Debug, Default)]
struct AddressTable {
    /// (prefix length, masked network -> peer index or CONFLICT), longest first.
    v4: Vec<(u8, HashMap<u128, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
}

fn key(ip: IpAddr, len: u8) -> (bool, u8, u128) {
    match ip {
        IpAddr::V4(a) => {
            let len = len.min(32);
            let mask = u32::MAX.checked_shl(u32::from(32 - len)).unwrap_or(0);
            (true, len, u128::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let len = len.min(128);
            let mask = u128::MAX.checked_shl(u32::from(128 - len)).unwrap_or(0);
            (false, len, u128::from(a) & mask)
        }
    }
}

impl AddressTable {
    fn build(peers: &[PeerInfo]) -> Self {
        let mut v4: BTreeMap<u8, HashMap<u128, u32>> = BTreeMap::new();
        let mut v6: BTreeMap<u8, HashMap<u128, u32>> = BTreeMap::new();
        for (i, p) in peers.iter().enumerate() {
            // More peers than u32 indexes cannot exist in practice; such a
            // peer is left out of the table (no match: its packets drop).
            let Ok(i) = u32::try_from(i) else { break };
            if i == CONFLICT {
                break;
            }
            for a in &p.addresses {
                let (is_v4, len, net) = key(a.addr, a.len);
                let map = if is_v4 { &mut v4 } else { &mut v6 };
                let slot = map.entry(len).or_default().entry(net).or_insert(i);
                // Two peers with the same prefix: neither can be told from
                // the other by address, so the prefix names no peer
                // (fail closed) rather than lending one's rules to the other.
                if *slot != i {
                    *slot = CONFLICT;
                }
            }
        }
        Self {
            v4: v4.into_iter().rev().collect(),
            v6: v6.into_iter().rev().collect(),
        }
    }

    fn lookup(&self, ip: IpAddr) -> Option<usize> {
        let table = if ip.is_ipv4() { &self.v4 } else { &self.v6 };
        for (len, map) in table {
            let (_, _, net) = key(ip, *len);
            if let Some(&peer) = map.get(&net) {
                return (peer != CONFLICT).then_some(peer as usize);
            }
        }
        None
    }
}

/// One node's view: compiled once per (policy, local, peers) change.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    rules: Vec<CompiledRule>,
    rule_names: Vec<String>,
    peer_names: Vec<String>,
    /// Distinct rule lists (indexes into `rules`, deny first).
    lists: Vec<Box<[u32]>>,
    /// Per peer, an index into `lists`.
    outbound: Vec<u32>,
    inbound: Vec<u32>,
    addresses: AddressTable,
    /// This node's own addresses: an inbound packet must be for one of
    /// them and an outbound one from one of them, or a node that forwards
    /// (a router, a container host) would relay flows the policy forbids
    /// between two other members.
    local: Vec<IpPrefix>,
}

impl Engine {
    /// Compiles `policy` for the node `local` and its `peers` (indexes into
    /// `peers` are the peer numbers of [`Engine::peer_for`] and
    /// [`Engine::decide`]).
    pub fn new(policy: &Policy, local: &PeerInfo, peers: &[PeerInfo]) -> Engine {
        let rules: Vec<CompiledRule> = policy
            .rules
            .iter()
            .map(|r| CompiledRule {
                deny: r.action == Action::Deny,
                proto: r.proto,
                ports: r.ports.clone().into_boxed_slice(),
            })
            .collect();
        // Deny first, then allow, each in policy order: the first match of
        // a list is the decision.
        let order: Vec<usize> = (0..rules.len())
            .filter(|&i| rules[i].deny)
            .chain((0..rules.len()).filter(|&i| !rules[i].deny))
            .collect();
        // Only the rules whose local side matches are candidates at all.
        let out_candidates: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| policy.rules[i].from.matches(local))
            .collect();
        let in_candidates: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| policy.rules[i].to.matches(local))
            .collect();

        let mut lists: Vec<Box<[u32]>> = Vec::new();
        let mut interned: HashMap<Box<[u32]>, u32> = HashMap::new();
        let mut intern = |list: Vec<u32>| -> u32 {
            let list = list.into_boxed_slice();
            if let Some(&id) = interned.get(&list) {
                return id;
            }
            // At most one list per peer and direction, so this fits u32
            // whenever peer indexes do.
            let id = u32::try_from(lists.len()).unwrap_or(u32::MAX);
            lists.push(list.clone());
            interned.insert(list, id);
            id
        };
        let mut outbound = Vec::with_capacity(peers.len());
        let mut inbound = Vec::with_capacity(peers.len());
        let as_u32 = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        for peer in peers {
            let out: Vec<u32> = out_candidates
                .iter()
                .copied()
                .filter(|&i| policy.rules[i].to.matches(peer))
                .map(as_u32)
                .collect();
            outbound.push(intern(out));
            let inb: Vec<u32> = in_candidates
                .iter()
                .copied()
                .filter(|&i| policy.rules[i].from.matches(peer))
                .map(as_u32)
                .collect();
            inbound.push(intern(inb));
        }
        Engine {
            local: local.addresses.clone(),
            rules,
            rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
            peer_names: peers.iter().map(|p| p.name.clone()).collect(),
            lists,
            outbound,
            inbound,
            addresses: AddressTable::build(peers),
        }
    }

    /// The peer whose addresses hold `ip` (longest prefix). `None` when no
    /// peer's do, or when the longest matching prefix is claimed by two
    /// peers.
    pub fn peer_for(&self, ip: IpAddr) -> Option<usize> {
        self.addresses.lookup(ip)
    }

    /// Decides a new flow with `peer` in direction `dir` (`proto`: the IP
    /// protocol number; `dport`: the destination port, ignored by rules
    /// without ports). An unknown peer gets the default deny.
    pub fn decide(&self, dir: Direction, peer: usize, proto: u8, dport: u16) -> Decision {
        let table = match dir {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let Some(list) = table.get(peer).and_then(|&id| self.lists.get(id as usize)) else {
            return Decision::Deny { rule: None };
        };
        for &r in list.iter() {
            let r = r as usize;
            let Some(rule) = self.rules.get(r) else {
                continue;
            };
            if rule.proto.matches(proto) && ports_match(&rule.ports, dport) {
                return if rule.deny {
                    Decision::Deny { rule: Some(r) }
                } else {
                    Decision::Allow { rule: r }
                };
            }
        }
        Decision::Deny { rule: None }
    }

    /// The name of rule `rule` ("" for an index out of range).
    /// Whether `ip` is one of this node's own addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.local
            .iter()
            .any(|p| crate::firewall::policy::prefix_contains(p, ip))
    }

    pub fn rule_name(&self, rule: usize) -> &str {
        self.rule_names.get(rule).map(String::as_str).unwrap_or("")
    }

    /// How many rules the policy has (the length of per-rule counters).
    pub fn rules(&self) -> usize {
        self.rule_names.len()
    }

    /// The name of peer `peer` ("" for an index out of range).
    pub fn peer_name(&self, peer: usize) -> &str {
        self.peer_names.get(peer).map(String::as_str).unwrap_or("")
    }

    /// How many peers this engine was compiled for.
    pub fn peers(&self) -> usize {
        self.peer_names.len()
    }
}

/// The decision for a flow from `from` to `to` (what `keyd policy explain`
/// prints): the same compiled evaluation the data plane runs, seen from
/// `from`'s side (the decision from `to`'s side is the same: both need
/// `from` to match the rule's `from` and `to` its `to`).
pub fn explain(policy: &Policy, from: &PeerInfo, to: &PeerInfo, proto: u8, dport: u16) -> Decision {
    Engine::new(policy, from, std::slice::from_ref(to)).decide(Direction::Outbound, 0, proto, dport)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::policy::{Rule, Selector};
    use proptest::prelude::*;

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;
    const ICMP6: u8 = 58;

    fn member(name: &str, groups: &[&str], addr: &str) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            attributes: BTreeMap::new(),
            addresses: vec![addr.parse().unwrap()],
        }
    }

    const POLICY: &str = r#"
        [[rule]]
        name = "no-ssh-from-web"
        action = "deny"
        from = { groups = ["web"] }
        to = { any = true }
        proto = "tcp"
        ports = ["22"]

        [[rule]]
        name = "web-to-db"
        action = "allow"
        from = { groups = ["web"] }
        to = { groups = ["db"] }
        proto = "tcp"
        ports = ["5432"]

        [[rule]]
        name = "admin"
        action = "allow"
        from = { groups = ["admin"] }
        to = { any = true }

        [[rule]]
        name = "ping-db"
        action = "allow"
        from = { any = true }
        to = { groups = ["db"] }
        proto = "icmp"
    "#;

    fn nodes() -> Vec<PeerInfo> {
        vec![
            member("web1", &["web"], "10.77.0.1/32"),
            member("db1", &["db"], "10.77.0.2/32"),
            member("admin1", &["admin"], "10.77.0.3/32"),
            member("other", &[], "10.77.0.4/32"),
        ]
    }

    /// The engine of node `i`, with every other node as its peers (peer
    /// numbers: the indexes in `nodes()` with `i` left out).
    fn engine_of(policy: &Policy, i: usize) -> (Engine, Vec<PeerInfo>) {
        let all = nodes();
        let peers: Vec<PeerInfo> = all
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| p.clone())
            .collect();
        (Engine::new(policy, &all[i], &peers), peers)
    }

    #[test]
    fn decides_both_directions_for_each_node() {
        let policy = Policy::from_toml(POLICY).unwrap();
        let (web, _) = engine_of(&policy, 0);
        let db_ip: IpAddr = "10.77.0.2".parse().unwrap();
        let db = web.peer_for(db_ip).unwrap();
        assert_eq!(web.peer_name(db), "db1");
        assert_eq!(
            web.decide(Direction::Outbound, db, TCP, 5432),
            Decision::Allow { rule: 1 }
        );
        assert_eq!(
            web.decide(Direction::Outbound, db, TCP, 22),
            Decision::Deny { rule: Some(0) }
        );
        assert_eq!(
            web.decide(Direction::Outbound, db, UDP, 5432),
            Decision::Deny { rule: None }
        );
        assert_eq!(
            web.decide(Direction::Outbound, db, ICMP, 0),
            Decision::Allow { rule: 3 }
        );
        assert_eq!(
            web.decide(Direction::Outbound, db, ICMP6, 0),
            Decision::Allow { rule: 3 }
        );
        // db does not open flows to web.
        assert_eq!(
            web.decide(Direction::Inbound, db, TCP, 5432),
            Decision::Deny { rule: None }
        );
        assert_eq!(web.rules(), 4);
        assert_eq!(web.rule_name(1), "web-to-db");
        assert_eq!(web.rule_name(99), "");
        assert_eq!(web.peer_name(99), "");

        // The same flow seen from db's side: inbound from web.
        let (db_engine, _) = engine_of(&policy, 1);
        let web_peer = db_engine.peer_for("10.77.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            db_engine.decide(Direction::Inbound, web_peer, TCP, 5432),
            Decision::Allow { rule: 1 }
        );
        assert_eq!(
            db_engine.decide(Direction::Inbound, web_peer, TCP, 22),
            Decision::Deny { rule: Some(0) }
        );
        assert_eq!(
            db_engine.decide(Direction::Outbound, web_peer, TCP, 80),
            Decision::Deny { rule: None }
        );
        // admin reaches everything, on any proto and port; nobody else
        // reaches admin.
        let admin = db_engine.peer_for("10.77.0.3".parse().unwrap()).unwrap();
        assert_eq!(
            db_engine.decide(Direction::Inbound, admin, UDP, 53),
            Decision::Allow { rule: 2 }
        );
        assert_eq!(
            db_engine.decide(Direction::Inbound, admin, 47, 0),
            Decision::Allow { rule: 2 }
        );
        let (admin_engine, _) = engine_of(&policy, 2);
        let other = admin_engine.peer_for("10.77.0.4".parse().unwrap()).unwrap();
        assert_eq!(
            admin_engine.decide(Direction::Outbound, other, TCP, 22),
            Decision::Allow { rule: 2 }
        );
        assert_eq!(
            admin_engine.decide(Direction::Inbound, other, TCP, 22),
            Decision::Deny { rule: None }
        );
        // Unknown peers and addresses.
        assert_eq!(
            db_engine.decide(Direction::Inbound, 99, TCP, 5432),
            Decision::Deny { rule: None }
        );
        assert_eq!(db_engine.peer_for("10.77.0.9".parse().unwrap()), None);
        assert_eq!(db_engine.peer_for("fd77::1".parse().unwrap()), None);
        // No policy: default deny.
        let (empty, _) = engine_of(&Policy::default(), 0);
        assert_eq!(
            empty.decide(Direction::Outbound, 0, TCP, 5432),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn explain_matches_both_engines() {
        let policy = Policy::from_toml(POLICY).unwrap();
        let n = nodes();
        assert_eq!(
            explain(&policy, &n[0], &n[1], TCP, 5432),
            Decision::Allow { rule: 1 }
        );
        assert_eq!(
            explain(&policy, &n[0], &n[1], TCP, 22),
            Decision::Deny { rule: Some(0) }
        );
        assert_eq!(
            explain(&policy, &n[1], &n[0], TCP, 5432),
            Decision::Deny { rule: None }
        );
        assert_eq!(
            explain(&policy, &n[2], &n[3], UDP, 9),
            Decision::Allow { rule: 2 }
        );
    }

    #[test]
    fn peer_for_takes_the_longest_prefix_and_refuses_conflicts() {
        let peers = vec![
            member("subnet", &[], "10.0.0.0/16"),
            member("host", &[], "10.0.1.5/32"),
            PeerInfo {
                addresses: vec!["10.1.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
                ..member("two", &[], "10.1.0.0/24")
            },
            member("clash-a", &[], "10.2.0.1/32"),
            member("clash-b", &[], "10.2.0.1/32"),
            member("wide", &[], "10.0.0.0/8"),
        ];
        let e = Engine::new(
            &Policy::default(),
            &member("me", &[], "10.9.9.9/32"),
            &peers,
        );
        let at = |s: &str| e.peer_for(s.parse().unwrap());
        assert_eq!(at("10.0.1.5"), Some(1));
        assert_eq!(at("10.0.1.6"), Some(0));
        assert_eq!(at("10.1.0.200"), Some(2));
        assert_eq!(at("fd00::1234"), Some(2));
        assert_eq!(at("fd01::1"), None);
        assert_eq!(at("10.2.0.1"), None, "two peers claim it: neither");
        assert_eq!(at("10.3.0.1"), Some(5));
        assert_eq!(at("11.0.0.1"), None);
    }

    #[test]
    fn peers_with_the_same_rules_share_one_list() {
        let policy = Policy::from_toml(POLICY).unwrap();
        let peers: Vec<PeerInfo> = (0..1000u32)
            .map(|i| {
                member(
                    &format!("n{i}"),
                    &[["web", "db", "admin"][i as usize % 3]],
                    &format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255),
                )
            })
            .collect();
        let e = Engine::new(&policy, &member("me", &["web"], "10.200.0.1/32"), &peers);
        assert!(e.lists.len() <= 6, "{} lists", e.lists.len());
        assert_eq!(e.peer_for("10.0.3.231".parse().unwrap()), Some(999));
    }

    /// The reference: walk all rules in order, the first matching deny
    /// wins, else the first matching allow, else default deny.
    fn reference(
        policy: &Policy,
        from: &PeerInfo,
        to: &PeerInfo,
        proto: u8,
        dport: u16,
    ) -> Decision {
        let matching = |r: &Rule| {
            r.from.matches(from)
                && r.to.matches(to)
                && r.proto.matches(proto)
                && ports_match(&r.ports, dport)
        };
        if let Some(i) = policy
            .rules
            .iter()
            .position(|r| r.action == Action::Deny && matching(r))
        {
            return Decision::Deny { rule: Some(i) };
        }
        if let Some(i) = policy
            .rules
            .iter()
            .position(|r| r.action == Action::Allow && matching(r))
        {
            return Decision::Allow { rule: i };
        }
        Decision::Deny { rule: None }
    }

    const GROUPS: [&str; 3] = ["web", "db", "admin"];
    const NAMES: [&str; 4] = ["n0", "n1", "n2", "n3"];

    fn small_prefix() -> impl Strategy<Value = IpPrefix> {
        // A small address space so that cidrs and addresses meet often.
        (
            0u8..4,
            0u8..4,
            prop_oneof![Just(30u8), Just(31), Just(32), Just(24), Just(0)],
        )
            .prop_map(|(a, b, len)| IpPrefix {
                addr: IpAddr::from([10, 0, a, b]),
                len,
            })
    }

    fn identity() -> impl Strategy<Value = PeerInfo> {
        (
            proptest::sample::select(NAMES.to_vec()),
            proptest::sample::subsequence(GROUPS.to_vec(), 0..=3),
            proptest::option::of(proptest::sample::select(vec!["prod", "dev"])),
            proptest::collection::vec(small_prefix(), 1..3),
        )
            .prop_map(|(name, groups, env, addresses)| PeerInfo {
                name: name.into(),
                groups: groups.into_iter().map(String::from).collect(),
                attributes: env
                    .map(|e| ("env".to_string(), e.to_string()))
                    .into_iter()
                    .collect(),
                addresses,
            })
    }

    fn selector() -> impl Strategy<Value = Selector> {
        (
            proptest::bool::weighted(0.2),
            proptest::sample::subsequence(GROUPS.to_vec(), 0..=2),
            proptest::option::of(proptest::sample::select(vec!["prod", "dev"])),
            proptest::sample::subsequence(NAMES.to_vec(), 0..=2),
            proptest::collection::vec(small_prefix(), 0..2),
        )
            .prop_map(|(any, groups, env, names, cidrs)| Selector {
                any,
                groups: groups.into_iter().map(String::from).collect(),
                attributes: env
                    .map(|e| ("env".to_string(), e.to_string()))
                    .into_iter()
                    .collect(),
                names: names.into_iter().map(String::from).collect(),
                cidrs,
            })
    }

    fn policy() -> impl Strategy<Value = Policy> {
        proptest::collection::vec(
            (
                any::<bool>(),
                selector(),
                selector(),
                proptest::sample::select(vec![Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp]),
                proptest::collection::vec((0u16..30, 0u16..10), 0..3),
            ),
            0..12,
        )
        .prop_map(|rules| Policy {
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (deny, from, to, proto, ports))| Rule {
                    name: format!("r{i}"),
                    action: if deny { Action::Deny } else { Action::Allow },
                    from,
                    to,
                    proto,
                    // The engine must be right on any policy, valid or not.
                    ports: ports
                        .into_iter()
                        .map(|(f, w)| PortRange {
                            first: f,
                            last: f.saturating_add(w),
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    fn packet() -> impl Strategy<Value = (u8, u16)> {
        (
            proptest::sample::select(vec![TCP, UDP, ICMP, ICMP6, 47]),
            0u16..45,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decide_agrees_with_the_reference(
            policy in policy(),
            local in identity(),
            peers in proptest::collection::vec(identity(), 0..6),
            packets in proptest::collection::vec(packet(), 1..12),
        ) {
            let e = Engine::new(&policy, &local, &peers);
            for (i, peer) in peers.iter().enumerate() {
                for &(proto, dport) in &packets {
                    prop_assert_eq!(e.decide(Direction::Outbound, i, proto, dport), reference(&policy, &local, peer, proto, dport));
                    prop_assert_eq!(e.decide(Direction::Inbound, i, proto, dport), reference(&policy, peer, &local, proto, dport));
                    prop_assert_eq!(explain(&policy, &local, peer, proto, dport), reference(&policy, &local, peer, proto, dport));
                }
            }
            prop_assert_eq!(e.decide(Direction::Outbound, peers.len(), TCP, 1), Decision::Deny { rule: None });
        }

        #[test]
        fn peer_for_agrees_with_a_scan(
            peers in proptest::collection::vec(identity(), 0..8),
            ips in proptest::collection::vec((0u8..4, 0u8..4), 1..16),
        ) {
            let e = Engine::new(&Policy::default(), &PeerInfo::default(), &peers);
            for (a, b) in ips {
                let ip = IpAddr::from([10, 0, a, b]);
                // The longest matching length, and every peer holding a
                // prefix of that length that contains ip.
                let hits: Vec<(u8, usize)> = peers.iter().enumerate()
                    .flat_map(|(i, p)| p.addresses.iter().filter(|a| super::super::policy::prefix_contains(a, ip)).map(move |a| (a.len, i)))
                    .collect();
                let best = hits.iter().map(|h| h.0).max();
                let mut owners: Vec<usize> = hits.iter().filter(|h| Some(h.0) == best).map(|h| h.1).collect();
                owners.dedup();
                let want = if owners.len() == 1 { Some(owners[0]) } else { None };
                prop_assert_eq!(e.peer_for(ip), want, "{}", ip);
            }
        }
    }
}
