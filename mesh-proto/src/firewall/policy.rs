//! The network's firewall policy: rules between members selected by identity.
//!
//! "Members matching `from` may open flows to members matching `to` on
//! proto/ports." Default deny both ways; deny rules are evaluated before allow
//! rules (each in policy order); what an allowed flow's reply direction may do
//! is conntrack's business, not the policy's.
//!
//! The operator writes TOML ([`Policy::from_toml`]); the roster carries the
//! canonical postcard bytes ([`Policy::encode`]), which every node decodes
//! with [`Policy::decode`] (bounded, canonical, validated).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::engine::PeerInfo;
use crate::cert::{MAX_GROUPS, MAX_NAME_LEN, check_attributes, check_label};
use crate::prefix::IpPrefix;

/// The most rules a policy may hold.
pub const MAX_RULES: usize = 1_000;
/// The most bytes an encoded policy may take.
pub const MAX_ENCODED: usize = 64 * 1024;
/// The longest rule name.
pub const MAX_RULE_NAME: usize = 48;

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

/// Which members a rule's `from` or `to` side names. Several criteria must
/// all hold; `any` stands alone.
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
    #[error("policy source is not valid TOML: {0}")]
    Toml(String),
    #[error("policy source: {0}")]
    Source(String),
    #[error("rule `{rule}`, field `{field}`: {reason}")]
    Field {
        rule: String,
        field: String,
        reason: String,
    },
    #[error(
        "rule `{rule}`: a rule name must be 1-{MAX_RULE_NAME} characters of a-z, 0-9, '_' or '-'"
    )]
    BadName { rule: String },
    #[error("rule `{rule}`: the name is already used by an earlier rule")]
    DuplicateName { rule: String },
    #[error(
        "rule `{rule}`: `{side}` selects nobody: give `any = true` or at least one of groups, attributes, names, cidrs"
    )]
    EmptySelector { rule: String, side: &'static str },
    #[error(
        "rule `{rule}`: `{side}` combines `any = true` with other criteria; use one or the other"
    )]
    AnyWithCriteria { rule: String, side: &'static str },
    #[error("rule `{rule}`: ports apply to tcp and udp only, not to proto `{proto}`")]
    PortsWithoutProto { rule: String, proto: Proto },
    #[error("rule `{rule}`: port range {first}-{last}: {reason}")]
    BadPortRange {
        rule: String,
        first: u16,
        last: u16,
        reason: &'static str,
    },
    #[error("rule `{rule}`: `{side}` can never match any member: {reason}")]
    Unsatisfiable {
        rule: String,
        side: &'static str,
        reason: String,
    },
    #[error("the policy has {count} rules; at most {MAX_RULES} are allowed")]
    TooManyRules { count: usize },
    #[error(
        "rule `{rule}` never takes effect: deny rule `{by}` matches every flow it matches, and deny rules are evaluated before allow rules"
    )]
    Shadowed { rule: String, by: String },
    #[error(
        "deny rule `{rule}` is written after allow rule `{by}`, which matches every flow it matches: deny rules are evaluated first, so it does take effect, but read in order it looks dead; move it before `{by}`"
    )]
    Ambiguous { rule: String, by: String },
    #[error("encoded policy is {len} bytes; at most {MAX_ENCODED} are accepted")]
    TooLarge { len: usize },
    #[error("encoded policy is malformed: {0}")]
    Malformed(String),
    #[error("encoded policy is not in canonical form (re-encoding it gives other bytes)")]
    NotCanonical,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Proto {
    /// Whether an IP protocol number (IPv4 protocol / IPv6 next header) is
    /// one this proto names.
    pub fn matches(self, ip_proto: u8) -> bool {
        match self {
            Proto::Any => true,
            Proto::Tcp => ip_proto == 6,
            Proto::Udp => ip_proto == 17,
            Proto::Icmp => ip_proto == 1 || ip_proto == 58,
        }
    }

    /// Whether every packet `other` matches, this matches too.
    fn covers(self, other: Proto) -> bool {
        self == Proto::Any || self == other
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// Whether `dport` is one of `ports` (empty: all ports).
pub fn ports_match(ports: &[PortRange], dport: u16) -> bool {
    ports.is_empty() || ports.iter().any(|r| r.contains(dport))
}

/// Whether `ip` lies inside `prefix` (host bits of the prefix ignored; a
/// length beyond the family's width is read as the full width).
pub fn prefix_contains(prefix: &IpPrefix, ip: IpAddr) -> bool {
    match (prefix.addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let len = u32::from(prefix.len.min(32));
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let len = u32::from(prefix.len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// Whether every address inside `inner` is inside `outer`.
fn prefix_within(inner: &IpPrefix, outer: &IpPrefix) -> bool {
    inner.addr.is_ipv4() == outer.addr.is_ipv4()
        && inner.len >= outer.len
        && prefix_contains(outer, inner.addr)
}

impl Selector {
    /// Whether `member` is one this selector names.
    pub fn matches(&self, member: &PeerInfo) -> bool {
        if self.any {
            return true;
        }
        if !self.has_criteria() {
            return false;
        }
        self.groups.iter().all(|g| member.groups.contains(g))
            && self
                .attributes
                .iter()
                .all(|(k, v)| member.attributes.get(k) == Some(v))
            && (self.names.is_empty() || self.names.contains(&member.name))
            && (self.cidrs.is_empty()
                || member
                    .addresses
                    .iter()
                    .any(|a| self.cidrs.iter().any(|c| prefix_contains(c, a.addr))))
    }

    fn has_criteria(&self) -> bool {
        !(self.groups.is_empty()
            && self.attributes.is_empty()
            && self.names.is_empty()
            && self.cidrs.is_empty())
    }

    /// Whether every member `other` matches, this matches too, judged from
    /// the selectors alone (sound, not complete: see [`Policy::validate`]).
    fn covers(&self, other: &Selector) -> bool {
        if self.any {
            return true;
        }
        if other.any {
            return false;
        }
        // Each of our criteria must follow from one of `other`'s.
        self.groups.iter().all(|g| other.groups.contains(g))
            && self
                .attributes
                .iter()
                .all(|(k, v)| other.attributes.get(k) == Some(v))
            && (self.names.is_empty()
                || (!other.names.is_empty() && other.names.iter().all(|n| self.names.contains(n))))
            && (self.cidrs.is_empty()
                || (!other.cidrs.is_empty()
                    && other
                        .cidrs
                        .iter()
                        .all(|o| self.cidrs.iter().any(|c| prefix_within(o, c)))))
    }

    fn check(&self, rule: &str, side: &'static str) -> Result<(), PolicyError> {
        if self.any {
            if self.has_criteria() {
                return Err(PolicyError::AnyWithCriteria {
                    rule: rule.to_owned(),
                    side,
                });
            }
            return Ok(());
        }
        if !self.has_criteria() {
            return Err(PolicyError::EmptySelector {
                rule: rule.to_owned(),
                side,
            });
        }
        let never = |reason: String| PolicyError::Unsatisfiable {
            rule: rule.to_owned(),
            side,
            reason,
        };
        // Certificates only carry labels (cert::check_label) and checked
        // attributes, so anything else can never equal a member's.
        for (what, value) in self
            .groups
            .iter()
            .map(|g| ("group", g))
            .chain(self.names.iter().map(|n| ("name", n)))
        {
            if check_label("", value).is_err() {
                return Err(never(format!(
                    "{what} `{}` is not a label a certificate can carry (1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.')",
                    value.escape_default()
                )));
            }
        }
        if let Err(e) = check_attributes(&self.attributes) {
            return Err(never(format!("no certificate can carry it: {e}")));
        }
        let distinct: BTreeSet<&String> = self.groups.iter().collect();
        if distinct.len() > MAX_GROUPS {
            return Err(never(format!(
                "it requires {} groups and a certificate carries at most {MAX_GROUPS}",
                distinct.len()
            )));
        }
        for c in &self.cidrs {
            if let Err(e) = c.validate() {
                return Err(never(format!("cidr {c}: {e}")));
            }
        }
        Ok(())
    }
}

fn check_rule_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether every port in `inner` is in `outer` (empty: all ports).
fn ports_cover(outer: &[PortRange], inner: &[PortRange]) -> bool {
    if outer.is_empty() {
        return true;
    }
    if inner.is_empty() {
        // `inner` takes every port, 0 included, which a non-empty `outer`
        // (validated: no port 0) never does.
        return false;
    }
    // Merge `outer` into disjoint sorted intervals, then look each inner
    // range up in them.
    let mut sorted: Vec<(u32, u32)> = outer
        .iter()
        .map(|r| (u32::from(r.first), u32::from(r.last)))
        .collect();
    sorted.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(sorted.len());
    for (first, last) in sorted {
        match merged.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    inner.iter().all(|r| {
        let (first, last) = (u32::from(r.first), u32::from(r.last));
        let i = merged.partition_point(|m| m.1 < first);
        merged.get(i).is_some_and(|m| m.0 <= first && last <= m.1)
    })
}

impl Rule {
    /// Whether every flow `other` matches, this rule matches too.
    fn covers(&self, other: &Rule) -> bool {
        self.proto.covers(other.proto)
            && ports_cover(&self.ports, &other.ports)
            && self.from.covers(&other.from)
            && self.to.covers(&other.to)
    }

    fn check(&self) -> Result<(), PolicyError> {
        let rule = &self.name;
        if !check_rule_name(rule) {
            return Err(PolicyError::BadName { rule: rule.clone() });
        }
        self.from.check(rule, "from")?;
        self.to.check(rule, "to")?;
        if !self.ports.is_empty() && !matches!(self.proto, Proto::Tcp | Proto::Udp) {
            return Err(PolicyError::PortsWithoutProto {
                rule: rule.clone(),
                proto: self.proto,
            });
        }
        for r in &self.ports {
            let reason = if r.first == 0 {
                "port 0 is not a port a flow can be opened to"
            } else if r.first > r.last {
                "the first port is above the last"
            } else {
                continue;
            };
            return Err(PolicyError::BadPortRange {
                rule: rule.clone(),
                first: r.first,
                last: r.last,
                reason,
            });
        }
        Ok(())
    }
}

impl Policy {
    /// Parses the operator's TOML source (see the module documentation of
    /// `keyd policy build`) and validates it.
    ///
    /// ```toml
    /// [[rule]]
    /// name = "web-to-db"
    /// action = "allow"
    /// from = { groups = ["web"] }
    /// to = { groups = ["db"] }
    /// proto = "tcp"                  # any (the default) | tcp | udp | icmp
    /// ports = ["5432", "8000-8080"]  # tcp/udp only; omitted = all ports
    /// ```
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        for (key, value) in &table {
            if key != "rule" {
                return Err(PolicyError::Source(format!(
                    "unknown top-level key `{key}`: a policy is a list of [[rule]] tables"
                )));
            }
            let list = value.as_array().ok_or_else(|| {
                PolicyError::Source("`rule` must be a list of [[rule]] tables".into())
            })?;
            for (i, item) in list.iter().enumerate() {
                let t = item.as_table().ok_or_else(|| {
                    PolicyError::Source(format!("rule #{} is not a table", i + 1))
                })?;
                rules.push(source::rule(i, t)?);
            }
        }
        let policy = Policy { rules };
        policy.validate()?;
        Ok(policy)
    }

    /// Refuses what a member cannot be sure to read the way the operator
    /// meant it: bad or duplicate names, empty selectors, `any` mixed with
    /// criteria, ports where there are none, bad port ranges, selectors no
    /// certificate can satisfy, too many rules, and rules that are
    /// shadowed or ambiguous:
    ///
    /// - an allow rule is refused when some deny rule (anywhere: denies are
    ///   evaluated first) matches every flow it matches: it would never
    ///   take effect;
    /// - a deny rule is refused when an *earlier* allow rule matches every
    ///   flow it matches: it does take effect, but read top to bottom (first
    ///   match) it looks dead, so the operator must put it first.
    ///
    /// "Matches every flow" is judged on the selectors alone, soundly: a
    /// rule is only refused when no set of members could make the two rules
    /// differ. Not detected (accepted): coverage that depends on who the
    /// members are (rule A selects group `web`, rule B names `node1`, which
    /// is in `web`), coverage by the union of several rules, and a port
    /// list covering 1-65535 standing for "all ports" (all ports include 0).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules {
                count: self.rules.len(),
            });
        }
        let mut names = BTreeSet::new();
        for rule in &self.rules {
            rule.check()?;
            if !names.insert(rule.name.as_str()) {
                return Err(PolicyError::DuplicateName {
                    rule: rule.name.clone(),
                });
            }
        }
        for (j, b) in self.rules.iter().enumerate() {
            for (i, a) in self.rules.iter().enumerate() {
                if a.action == b.action || !a.covers(b) {
                    continue;
                }
                match b.action {
                    Action::Allow => {
                        return Err(PolicyError::Shadowed {
                            rule: b.name.clone(),
                            by: a.name.clone(),
                        });
                    }
                    Action::Deny if i < j => {
                        return Err(PolicyError::Ambiguous {
                            rule: b.name.clone(),
                            by: a.name.clone(),
                        });
                    }
                    Action::Deny => {}
                }
            }
        }
        Ok(())
    }

    /// The canonical bytes the roster carries (postcard): equal policies
    /// encode to equal bytes, and [`Policy::decode`] accepts nothing else.
    pub fn encode(&self) -> Vec<u8> {
        // Cannot fail: every field has a known length and no custom
        // serializer reports errors.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes roster bytes: at most [`MAX_ENCODED`] bytes, canonical
    /// (trailing bytes, overlong integers or unsorted attributes are
    /// refused), and valid ([`Policy::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Policy, PolicyError> {
        if bytes.len() > MAX_ENCODED {
            return Err(PolicyError::TooLarge { len: bytes.len() });
        }
        // postcard borrows lengths from the input and caps preallocation, so
        // memory stays proportional to the (bounded) input.
        let policy: Policy =
            postcard::from_bytes(bytes).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        if policy.encode() != bytes {
            return Err(PolicyError::NotCanonical);
        }
        policy.validate()?;
        Ok(policy)
    }
}

/// The TOML source, read field by field so that every error names its rule
/// and field.
mod source {
    use std::collections::BTreeMap;

    use toml::{Table, Value};

    use super::{Action, PolicyError, PortRange, Proto, Rule, Selector};

    pub(super) fn rule(index: usize, t: &Table) -> Result<Rule, PolicyError> {
        let label = match t.get("name").and_then(Value::as_str) {
            Some(name) => name.to_owned(),
            None => format!("#{}", index + 1),
        };
        let err = |field: &str, reason: String| PolicyError::Field {
            rule: label.clone(),
            field: field.to_owned(),
            reason,
        };
        for key in t.keys() {
            if !matches!(
                key.as_str(),
                "name" | "action" | "from" | "to" | "proto" | "ports"
            ) {
                return Err(err(
                    key,
                    "unknown field (expected name, action, from, to, proto, ports)".into(),
                ));
            }
        }
        let name = match t.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(err(
                    "name",
                    format!("expected a string, found {}", v.type_str()),
                ));
            }
            None => return Err(err("name", "missing".into())),
        };
        let action = match t.get("action").map(|v| (v, v.as_str())) {
            Some((_, Some("allow"))) => Action::Allow,
            Some((_, Some("deny"))) => Action::Deny,
            Some((v, _)) => {
                return Err(err(
                    "action",
                    format!("expected \"allow\" or \"deny\", found {v}"),
                ));
            }
            None => return Err(err("action", "missing (\"allow\" or \"deny\")".into())),
        };
        let proto = match t.get("proto").map(|v| (v, v.as_str())) {
            None | Some((_, Some("any"))) => Proto::Any,
            Some((_, Some("tcp"))) => Proto::Tcp,
            Some((_, Some("udp"))) => Proto::Udp,
            Some((_, Some("icmp"))) => Proto::Icmp,
            Some((v, _)) => {
                return Err(err(
                    "proto",
                    format!("expected \"any\", \"tcp\", \"udp\" or \"icmp\", found {v}"),
                ));
            }
        };
        let ports = match t.get("ports") {
            None => Vec::new(),
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(err(
                    "ports",
                    "an empty list matches no port; omit `ports` for all ports".into(),
                ));
            }
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| port_range(v).map_err(|reason| err("ports", reason)))
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(err(
                    "ports",
                    format!(
                        "expected a list such as [\"22\", \"8000-8080\"], found {}",
                        v.type_str()
                    ),
                ));
            }
        };
        let from = selector(&label, "from", t.get("from"))?;
        let to = selector(&label, "to", t.get("to"))?;
        Ok(Rule {
            name,
            action,
            from,
            to,
            proto,
            ports,
        })
    }

    fn port_range(v: &Value) -> Result<PortRange, String> {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("`{s}` is not a port number (0-65535)"))
        };
        match v {
            Value::Integer(n) => u16::try_from(*n)
                .map(|p| PortRange { first: p, last: p })
                .map_err(|_| format!("{n} is not a port number (0-65535)")),
            Value::String(s) => match s.split_once('-') {
                Some((a, b)) => Ok(PortRange {
                    first: port(a)?,
                    last: port(b)?,
                }),
                None => port(s).map(|p| PortRange { first: p, last: p }),
            },
            v => Err(format!(
                "expected \"PORT\" or \"FIRST-LAST\", found {}",
                v.type_str()
            )),
        }
    }

    fn selector(
        rule: &str,
        side: &'static str,
        v: Option<&Value>,
    ) -> Result<Selector, PolicyError> {
        let field_err = |field: String, reason: String| PolicyError::Field {
            rule: rule.to_owned(),
            field,
            reason,
        };
        let t = match v {
            Some(Value::Table(t)) => t,
            Some(v) => {
                return Err(field_err(
                    side.to_owned(),
                    format!(
                        "expected a table such as {{ groups = [\"web\"] }} or {{ any = true }}, found {}",
                        v.type_str()
                    ),
                ));
            }
            None => return Err(field_err(side.to_owned(), "missing".into())),
        };
        let mut sel = Selector::default();
        for (key, value) in t {
            let fail = |reason: String| field_err(format!("{side}.{key}"), reason);
            // An empty list or table given explicitly selects nobody (no
            // member has "any of no names"); refused rather than read as
            // "no criterion".
            let never = || PolicyError::Unsatisfiable {
                rule: rule.to_owned(),
                side,
                reason: format!("`{key}` is given explicitly empty"),
            };
            match key.as_str() {
                "any" => {
                    sel.any = value.as_bool().ok_or_else(|| {
                        fail(format!(
                            "expected true or false, found {}",
                            value.type_str()
                        ))
                    })?;
                }
                "groups" | "names" | "cidrs" => {
                    let list = strings(value).map_err(fail)?;
                    if list.is_empty() {
                        return Err(never());
                    }
                    match key.as_str() {
                        "groups" => sel.groups = list,
                        "names" => sel.names = list,
                        _ => {
                            sel.cidrs = list
                                .iter()
                                .map(|s| s.parse().map_err(|e: String| fail(e)))
                                .collect::<Result<_, _>>()?;
                        }
                    }
                }
                "attributes" => {
                    let a = value.as_table().ok_or_else(|| {
                        fail(format!(
                            "expected a table such as {{ env = \"prod\" }}, found {}",
                            value.type_str()
                        ))
                    })?;
                    if a.is_empty() {
                        return Err(never());
                    }
                    let mut map = BTreeMap::new();
                    for (k, v) in a {
                        let v = v.as_str().ok_or_else(|| {
                            fail(format!(
                                "attribute `{k}`: expected a string, found {}",
                                v.type_str()
                            ))
                        })?;
                        map.insert(k.clone(), v.to_owned());
                    }
                    sel.attributes = map;
                }
                _ => {
                    return Err(fail(
                        "unknown field (expected any, groups, attributes, names, cidrs)".into(),
                    ));
                }
            }
        }
        Ok(sel)
    }

    fn strings(v: &Value) -> Result<Vec<String>, String> {
        let list = v
            .as_array()
            .ok_or_else(|| format!("expected a list of strings, found {}", v.type_str()))?;
        list.iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("expected a string, found {}", s.type_str()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
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
        from = { groups = ["web"], attributes = { env = "prod" } }
        to = { groups = ["db"] }
        proto = "tcp"
        ports = ["5432", "8000-8080", 9000]

        [[rule]]
        name = "admin"
        action = "allow"
        from = { names = ["admin1", "admin2"] }
        to = { any = true }

        [[rule]]
        name = "ping"
        action = "allow"
        from = { cidrs = ["10.77.0.0/24", "fd77::/64"] }
        to = { any = true }
        proto = "icmp"
    "#;

    fn rule(name: &str, action: Action, from: Selector, to: Selector) -> Rule {
        Rule {
            name: name.into(),
            action,
            from,
            to,
            proto: Proto::Any,
            ports: vec![],
        }
    }

    fn everyone() -> Selector {
        Selector {
            any: true,
            ..Selector::default()
        }
    }

    fn groups(g: &[&str]) -> Selector {
        Selector {
            groups: g.iter().map(|s| s.to_string()).collect(),
            ..Selector::default()
        }
    }

    fn one_rule(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml(&format!("[[rule]]\nname = \"r\"\n{text}"))
    }

    #[test]
    fn parses_the_source_format() {
        let p = Policy::from_toml(EXAMPLE).unwrap();
        assert_eq!(p.rules.len(), 4);
        let r = &p.rules[1];
        assert_eq!(r.name, "web-to-db");
        assert_eq!(r.action, Action::Allow);
        assert_eq!(r.from.groups, vec!["web".to_string()]);
        assert_eq!(
            r.from.attributes.get("env").map(String::as_str),
            Some("prod")
        );
        assert_eq!(r.to.groups, vec!["db".to_string()]);
        assert_eq!(r.proto, Proto::Tcp);
        assert_eq!(
            r.ports,
            vec![
                PortRange {
                    first: 5432,
                    last: 5432
                },
                PortRange {
                    first: 8000,
                    last: 8080
                },
                PortRange {
                    first: 9000,
                    last: 9000
                },
            ]
        );
        assert!(p.rules[2].to.any);
        assert_eq!(p.rules[2].proto, Proto::Any, "proto defaults to any");
        assert_eq!(p.rules[3].from.cidrs.len(), 2);
        assert_eq!(p.rules[3].proto, Proto::Icmp);
        assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn source_errors_name_rule_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "action = \"permit\"\nfrom = {any=true}\nto = {any=true}",
                "action",
            ),
            ("from = {any=true}\nto = {any=true}", "action"),
            ("action = \"allow\"\nto = {any=true}", "from"),
            ("action = \"allow\"\nfrom = {any=true}\nto = 3", "to"),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {any=true}\nproto = \"sctp\"",
                "proto",
            ),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {any=true}\nproto = \"tcp\"\nports = [\"x\"]",
                "ports",
            ),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {any=true}\nproto = \"tcp\"\nports = [70000]",
                "ports",
            ),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {any=true}\nproto = \"tcp\"\nports = []",
                "ports",
            ),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {any=true}\nprot = \"tcp\"",
                "prot",
            ),
            (
                "action = \"allow\"\nfrom = {group=[\"a\"]}\nto = {any=true}",
                "from.group",
            ),
            (
                "action = \"allow\"\nfrom = {cidrs=[\"10.0.0.0\"]}\nto = {any=true}",
                "from.cidrs",
            ),
            (
                "action = \"allow\"\nfrom = {any=true}\nto = {attributes={env=1}}",
                "to.attributes",
            ),
        ];
        for (text, field) in cases {
            match one_rule(text) {
                Err(PolicyError::Field { rule, field: f, .. }) => {
                    assert_eq!(rule, "r", "{text}");
                    assert_eq!(&f, field, "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let e = Policy::from_toml("[[rule]]\naction = \"allow\"").unwrap_err();
        assert!(
            matches!(e, PolicyError::Field { ref rule, ref field, .. } if rule == "#1" && field == "name"),
            "{e:?}"
        );
        assert!(matches!(
            Policy::from_toml("[[rule]\n"),
            Err(PolicyError::Toml(_))
        ));
        assert!(matches!(
            Policy::from_toml("rules = []"),
            Err(PolicyError::Source(_))
        ));
        let msg = one_rule("action = \"permit\"\nfrom = {any=true}\nto = {any=true}")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("rule `r`") && msg.contains("`action`"),
            "{msg}"
        );
    }

    #[test]
    fn explicit_empty_lists_are_unsatisfiable() {
        for sel in [
            "groups = []",
            "names = []",
            "cidrs = []",
            "attributes = {}",
            "groups = [], names = []",
        ] {
            let e = one_rule(&format!(
                "action = \"allow\"\nfrom = {{ {sel} }}\nto = {{any=true}}"
            ))
            .unwrap_err();
            assert!(
                matches!(e, PolicyError::Unsatisfiable { ref rule, side: "from", .. } if rule == "r"),
                "{sel}: {e:?}"
            );
        }
    }

    #[test]
    fn validation_errors() {
        let base = || rule("r", Action::Allow, groups(&["web"]), groups(&["db"]));
        let check = |mutate: &dyn Fn(&mut Policy), want: &dyn Fn(&PolicyError) -> bool| {
            let mut p = Policy {
                rules: vec![base()],
            };
            mutate(&mut p);
            let e = p.validate().unwrap_err();
            assert!(want(&e), "{e:?}");
            // Every message names the rule it is about (or the count).
            assert!(e.to_string().contains('`') || matches!(e, PolicyError::TooManyRules { .. }));
        };
        assert_eq!(
            Policy {
                rules: vec![base()]
            }
            .validate(),
            Ok(())
        );

        for bad in ["", "Web", "a b", "x.y", &"a".repeat(49)] {
            check(&|p| p.rules[0].name = bad.into(), &|e| {
                matches!(e, PolicyError::BadName { .. })
            });
        }
        check(
            &|p| p.rules.push(base()),
            &|e| matches!(e, PolicyError::DuplicateName { rule } if rule == "r"),
        );
        check(&|p| p.rules[0].to = Selector::default(), &|e| {
            matches!(e, PolicyError::EmptySelector { side: "to", .. })
        });
        check(&|p| p.rules[0].from.any = true, &|e| {
            matches!(e, PolicyError::AnyWithCriteria { side: "from", .. })
        });
        for proto in [Proto::Any, Proto::Icmp] {
            check(
                &|p| {
                    p.rules[0].proto = proto;
                    p.rules[0].ports = vec![PortRange { first: 1, last: 2 }];
                },
                &|e| matches!(e, PolicyError::PortsWithoutProto { .. }),
            );
        }
        for (first, last) in [(0, 10), (0, 0), (20, 10)] {
            check(
                &|p| {
                    p.rules[0].proto = Proto::Udp;
                    p.rules[0].ports = vec![PortRange { first, last }];
                },
                &|e| matches!(e, PolicyError::BadPortRange { first: f, last: l, .. } if (*f, *l) == (first, last)),
            );
        }
        let unsat = |e: &PolicyError| matches!(e, PolicyError::Unsatisfiable { .. });
        check(
            &|p| p.rules[0].from.groups = vec!["has space".into()],
            &unsat,
        );
        check(&|p| p.rules[0].to.names = vec![String::new()], &unsat);
        check(
            &|p| {
                p.rules[0].to.attributes.insert("env".into(), "a=b".into());
            },
            &unsat,
        );
        check(
            &|p| {
                p.rules[0].to.attributes.insert("Env".into(), "prod".into());
            },
            &unsat,
        );
        check(
            &|p| {
                p.rules[0].to.attributes = (0..=crate::cert::MAX_ATTRIBUTES)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect()
            },
            &unsat,
        );
        // What a certificate can carry is accepted.
        let mut p = Policy {
            rules: vec![base()],
        };
        p.rules[0]
            .to
            .attributes
            .insert("region".into(), "us east 1".into());
        assert_eq!(p.validate(), Ok(()));
        check(
            &|p| p.rules[0].to.groups = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect(),
            &unsat,
        );
        check(
            &|p| {
                p.rules[0].to.cidrs = vec![IpPrefix {
                    addr: "10.0.0.0".parse().unwrap(),
                    len: 33,
                }]
            },
            &unsat,
        );
        check(
            &|p| {
                p.rules = (0..=MAX_RULES)
                    .map(|i| {
                        rule(
                            &format!("r{i}"),
                            Action::Allow,
                            groups(&[&format!("g{i}")]),
                            everyone(),
                        )
                    })
                    .collect()
            },
            &|e| matches!(e, PolicyError::TooManyRules { count } if *count == MAX_RULES + 1),
        );
    }

    #[test]
    fn shadowed_and_ambiguous_rules() {
        let tcp = |mut r: Rule, ports: &[(u16, u16)]| {
            r.proto = Proto::Tcp;
            r.ports = ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect();
            r
        };
        // An allow inside a deny (before or after it) never takes effect.
        let deny_all_web = rule("deny-web", Action::Deny, groups(&["web"]), everyone());
        let allow_web_db = rule(
            "web-db",
            Action::Allow,
            groups(&["web", "x"]),
            groups(&["db"]),
        );
        for rules in [
            vec![deny_all_web.clone(), allow_web_db.clone()],
            vec![allow_web_db.clone(), deny_all_web.clone()],
        ] {
            assert_eq!(
                Policy { rules }.validate(),
                Err(PolicyError::Shadowed {
                    rule: "web-db".into(),
                    by: "deny-web".into()
                })
            );
        }
        // A deny written after a wider allow: effective, but ambiguous.
        let allow = tcp(
            rule("allow", Action::Allow, groups(&["web"]), everyone()),
            &[(1, 1000)],
        );
        let deny = tcp(
            rule("deny", Action::Deny, groups(&["web", "x"]), groups(&["db"])),
            &[(22, 22), (80, 90)],
        );
        assert_eq!(
            Policy {
                rules: vec![allow.clone(), deny.clone()]
            }
            .validate(),
            Err(PolicyError::Ambiguous {
                rule: "deny".into(),
                by: "allow".into()
            })
        );
        // The same two in the unambiguous order (deny first: an exception).
        assert_eq!(
            Policy {
                rules: vec![deny.clone(), allow.clone()]
            }
            .validate(),
            Ok(())
        );
        // Not certain, so accepted: partial port overlap, a name that may or
        // may not be in the group, a wider deny side, proto differs.
        let accepted = [
            tcp(deny.clone(), &[(22, 22), (999, 1001)]),
            rule(
                "deny",
                Action::Deny,
                Selector {
                    names: vec!["n1".into()],
                    ..Selector::default()
                },
                everyone(),
            ),
            rule("deny", Action::Deny, everyone(), groups(&["db"])),
            Rule {
                proto: Proto::Udp,
                ..deny.clone()
            },
        ];
        for d in accepted {
            assert_eq!(
                Policy {
                    rules: vec![allow.clone(), d.clone()]
                }
                .validate(),
                Ok(()),
                "{d:?}"
            );
        }
        // Coverage through names and cidrs.
        let names = |n: &[&str]| Selector {
            names: n.iter().map(|s| s.to_string()).collect(),
            ..Selector::default()
        };
        let cidrs = |c: &[&str]| Selector {
            cidrs: c.iter().map(|s| s.parse().unwrap()).collect(),
            ..Selector::default()
        };
        let shadowed = |a: Selector, b: Selector| {
            Policy {
                rules: vec![
                    rule("d", Action::Deny, a, everyone()),
                    rule("a", Action::Allow, b, everyone()),
                ],
            }
            .validate()
            .is_err()
        };
        assert!(shadowed(names(&["a", "b"]), names(&["b"])));
        assert!(!shadowed(names(&["b"]), names(&["a", "b"])));
        assert!(shadowed(
            cidrs(&["10.0.0.0/16"]),
            cidrs(&["10.0.3.0/24", "10.0.0.7/32"])
        ));
        assert!(!shadowed(cidrs(&["10.0.0.0/16"]), cidrs(&["10.0.0.0/8"])));
        assert!(!shadowed(cidrs(&["10.0.0.0/16"]), cidrs(&["fd00::/16"])));
        assert!(!shadowed(cidrs(&["10.0.0.0/16"]), groups(&["web"])));
        // Same-action overlap is redundant, not ambiguous.
        assert_eq!(
            Policy {
                rules: vec![
                    allow.clone(),
                    Rule {
                        name: "a2".into(),
                        ..allow.clone()
                    }
                ]
            }
            .validate(),
            Ok(())
        );
        // Port coverage by the union of ranges.
        assert!(ports_cover(
            &[
                PortRange { first: 1, last: 10 },
                PortRange {
                    first: 11,
                    last: 20
                }
            ],
            &[PortRange { first: 5, last: 15 }]
        ));
        assert!(!ports_cover(
            &[
                PortRange { first: 1, last: 10 },
                PortRange {
                    first: 12,
                    last: 20
                }
            ],
            &[PortRange { first: 5, last: 15 }]
        ));
        assert!(!ports_cover(
            &[PortRange {
                first: 1,
                last: 65535
            }],
            &[]
        ));
    }

    #[test]
    fn selectors_match_by_every_criterion() {
        let m = PeerInfo {
            name: "node1".into(),
            groups: vec!["web".into(), "prod".into()],
            attributes: [
                ("env".to_string(), "prod".to_string()),
                ("tenant".into(), "a".into()),
            ]
            .into(),
            addresses: vec![
                "10.77.0.1/32".parse().unwrap(),
                "fd77::1/128".parse().unwrap(),
            ],
        };
        let attrs = |kv: &[(&str, &str)]| Selector {
            attributes: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Selector::default()
        };
        let names = |n: &[&str]| Selector {
            names: n.iter().map(|s| s.to_string()).collect(),
            ..Selector::default()
        };
        let cidrs = |c: &[&str]| Selector {
            cidrs: c.iter().map(|s| s.parse().unwrap()).collect(),
            ..Selector::default()
        };
        assert!(everyone().matches(&m));
        assert!(
            !Selector::default().matches(&m),
            "an empty selector matches nobody"
        );
        assert!(groups(&["web"]).matches(&m));
        assert!(groups(&["web", "prod"]).matches(&m));
        assert!(!groups(&["web", "db"]).matches(&m), "groups: all of them");
        assert!(attrs(&[("env", "prod")]).matches(&m));
        assert!(attrs(&[("env", "prod"), ("tenant", "a")]).matches(&m));
        assert!(!attrs(&[("env", "prod"), ("tenant", "b")]).matches(&m));
        assert!(!attrs(&[("zone", "prod")]).matches(&m));
        assert!(names(&["x", "node1"]).matches(&m), "names: any of them");
        assert!(!names(&["node2"]).matches(&m));
        assert!(cidrs(&["10.77.0.0/24"]).matches(&m));
        assert!(cidrs(&["10.0.0.0/8", "fd77::/16"]).matches(&m));
        assert!(cidrs(&["fd77::/64"]).matches(&m));
        assert!(cidrs(&["0.0.0.0/0"]).matches(&m));
        assert!(!cidrs(&["10.78.0.0/16"]).matches(&m));
        assert!(!cidrs(&["10.77.0.2/32"]).matches(&m));
        // Several criteria: all must hold.
        let mut s = groups(&["web"]);
        s.names = vec!["node1".into()];
        assert!(s.matches(&m));
        s.cidrs = vec!["10.99.0.0/16".parse().unwrap()];
        assert!(!s.matches(&m));
    }

    #[test]
    fn encode_decode_round_trip_and_refusals() {
        let p = Policy::from_toml(EXAMPLE).unwrap();
        let bytes = p.encode();
        assert_eq!(Policy::decode(&bytes), Ok(p.clone()));
        assert_eq!(
            Policy::decode(&Policy::default().encode()),
            Ok(Policy::default())
        );
        // Trailing bytes are not canonical.
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Policy::decode(&longer), Err(PolicyError::NotCanonical));
        // An overlong varint for the rule count (4 as 0x84 0x00).
        let mut overlong = vec![0x84, 0x00];
        overlong.extend_from_slice(&bytes[1..]);
        assert_eq!(bytes[0], 4);
        assert!(Policy::decode(&overlong).is_err());
        assert!(matches!(
            Policy::decode(&bytes[..bytes.len() - 1]),
            Err(PolicyError::Malformed(_))
        ));
        assert!(matches!(
            Policy::decode(&vec![0; MAX_ENCODED + 1]),
            Err(PolicyError::TooLarge { len }) if len == MAX_ENCODED + 1
        ));
        // Decoding validates.
        let invalid = Policy {
            rules: vec![rule("r", Action::Allow, Selector::default(), everyone())],
        };
        assert!(matches!(
            Policy::decode(&invalid.encode()),
            Err(PolicyError::EmptySelector { .. })
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn label() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9._-]{0,6}"
        }

        fn selector() -> impl Strategy<Value = Selector> {
            prop_oneof![
                Just(everyone()),
                (
                    proptest::collection::vec(label(), 0..3),
                    proptest::collection::btree_map(label(), label(), 0..3),
                    proptest::collection::vec(label(), 0..3),
                    proptest::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..3),
                )
                    .prop_map(|(groups, attributes, names, cidrs)| Selector {
                        any: false,
                        groups,
                        attributes,
                        names,
                        cidrs: cidrs
                            .into_iter()
                            .map(|(a, len)| IpPrefix {
                                addr: IpAddr::from(a),
                                len
                            })
                            .collect(),
                    }),
            ]
        }

        fn policy() -> impl Strategy<Value = Policy> {
            proptest::collection::vec(
                (
                    any::<bool>(),
                    selector(),
                    selector(),
                    0u8..4,
                    proptest::collection::vec((1u16..100, 0u16..50), 0..3),
                ),
                0..8,
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
                        proto: [Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp][proto as usize],
                        ports: if proto == 1 || proto == 2 {
                            ports
                                .into_iter()
                                .map(|(f, w)| PortRange {
                                    first: f,
                                    last: f + w,
                                })
                                .collect()
                        } else {
                            vec![]
                        },
                    })
                    .collect(),
            })
        }

        proptest! {
            #[test]
            fn round_trips(p in policy()) {
                let bytes = p.encode();
                match Policy::decode(&bytes) {
                    Ok(q) => prop_assert_eq!(q, p),
                    // Refused only for what validate refuses.
                    Err(e) => prop_assert_eq!(Err(e), p.validate()),
                }
            }

            #[test]
            fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Policy::decode(&bytes);
            }

            #[test]
            fn decode_of_mutated_encodings_never_panics(
                p in policy(),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            ) {
                let mut bytes = p.encode();
                for (at, x) in flips {
                    if !bytes.is_empty() {
                        let i = at % bytes.len();
                        bytes[i] ^= x;
                    }
                }
                if let Ok(q) = Policy::decode(&bytes) {
                    // Whatever is accepted is canonical and valid.
                    prop_assert_eq!(q.encode(), bytes);
                    prop_assert_eq!(q.validate(), Ok(()));
                }
            }

            #[test]
            fn from_toml_never_panics(text in "\\PC{0,200}") {
                let _ = Policy::from_toml(&text);
            }
        }
    }
}
