//! The network's firewall policy: rules between members selected by identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::prefix::IpPrefix;

/// The most rules a policy may hold.
pub const MAX_RULES: usize = 1_000;
/// The most bytes an encoded policy may take.
pub const MAX_ENCODED: usize = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub from: Selector,
    pub to: Selector,
    pub proto: Proto,
    /// Destination ports; empty = all. Only for tcp and udp.
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    /// ICMPv4 and ICMPv6.
    Icmp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub any: bool,
    /// The member must have all of them.
    pub groups: Vec<String>,
    /// All must match.
    pub attributes: BTreeMap<String, String>,
    /// Any of them.
    pub names: Vec<String>,
    /// One of the member's overlay addresses lies in any of them.
    pub cidrs: Vec<IpPrefix>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy: {0}")]
    Syntax(String),
}

impl Policy {
    pub fn from_toml(_text: &str) -> Result<Policy, PolicyError> {
        Ok(Policy::default())
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Policy, PolicyError> {
        postcard::from_bytes(bytes).map_err(|e| PolicyError::Syntax(e.to_string()))
    }
}
