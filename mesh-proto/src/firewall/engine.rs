//! One node's compiled view of the policy.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::policy::Policy;
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

#[derive(Clone, Debug, Default)]
pub struct Engine {
    names: Vec<String>,
    peers: Vec<String>,
}

impl Engine {
    pub fn new(policy: &Policy, _local: &PeerInfo, peers: &[PeerInfo]) -> Engine {
        Engine {
            names: policy.rules.iter().map(|r| r.name.clone()).collect(),
            peers: peers.iter().map(|p| p.name.clone()).collect(),
        }
    }

    pub fn peer_for(&self, _ip: IpAddr) -> Option<usize> {
        None
    }

    pub fn decide(&self, _dir: Direction, _peer: usize, _proto: u8, _dport: u16) -> Decision {
        Decision::Deny { rule: None }
    }

    pub fn rule_name(&self, rule: usize) -> &str {
        self.names.get(rule).map(String::as_str).unwrap_or("")
    }

    pub fn rules(&self) -> usize {
        self.names.len()
    }

    pub fn peer_name(&self, peer: usize) -> &str {
        self.peers.get(peer).map(String::as_str).unwrap_or("")
    }
}

/// The decision for a flow from `from` to `to`.
pub fn explain(
    _policy: &Policy,
    _from: &PeerInfo,
    _to: &PeerInfo,
    _proto: u8,
    _dport: u16,
) -> Decision {
    Decision::Deny { rule: None }
}
