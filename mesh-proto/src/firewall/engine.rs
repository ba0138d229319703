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
