//! What the firewall has done, as one snapshot: the Prometheus metrics and
//! `mesh-node status` both show it, so each number has one source.

use std::fmt;

use mesh_proto::exposition::{Exposition, Kind};

use serde::{Deserialize, Serialize};

/// A snapshot of one interface's firewall (copied under the data path's
/// lock, formatted outside it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallStatus {
    /// The document in force (`None`: none has arrived yet).
    pub generation: Option<u64>,
    /// Whether a policy is in force (without one nothing is filtered).
    pub filtering: bool,
    /// `--firewall-required`: nothing passes before the first document.
    pub required: bool,
    pub peers: usize,
    /// The rules in force, in their order, then rules of earlier documents
    /// that no longer exist (their hits are kept: counters only go up).
    pub rules: Vec<RuleHits>,
    pub flows: usize,
    pub max_flows: usize,
    pub flows_new: u64,
    pub flows_evicted: u64,
    pub flows_expired: u64,
    pub flows_rechecked_dropped: u64,
    /// TCP connections from before the first policy, tracked mid-stream.
    pub flows_picked_up: u64,
    pub drops: Drops,
    pub documents_applied: u64,
    pub documents_refused: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    pub name: String,
    /// New flows the rule decided (allowed or denied), over every document
    /// that had a rule of this name.
    pub hits: u64,
    pub in_force: bool,
}

/// Packets dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    /// By a deny rule or by default deny (also tracked flows a new policy
    /// forbids).
    pub policy: u64,
    /// To or from an address no peer holds.
    pub no_peer: u64,
    /// Belongs to no tracked flow and cannot open one.
    pub not_tracked: u64,
    /// Neither to nor from this node.
    pub not_local: u64,
    pub malformed: u64,
}

impl Drops {
    fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("policy", self.policy),
            ("no_peer", self.no_peer),
            ("not_tracked", self.not_tracked),
            ("not_local", self.not_local),
            ("malformed", self.malformed),
        ]
    }
}

impl FirewallStatus {
    /// Appends the Prometheus text format.
    pub fn render_into(&self, s: &mut String) {
        let mut e = Exposition::new();
        let in_force = self.rules.iter().filter(|r| r.in_force).count();
        for (name, help, value) in [
            (
                "mesh_node_firewall_generation",
                "Generation of the firewall document in force (0: none yet)",
                self.generation.unwrap_or(0),
            ),
            (
                "mesh_node_firewall_rules",
                "Rules of the policy in force (0: no policy, nothing filtered)",
                in_force as u64,
            ),
            (
                "mesh_node_firewall_flows",
                "Flows in the firewall's connection table",
                self.flows as u64,
            ),
            (
                "mesh_node_firewall_flows_max",
                "The connection table's bound (--firewall-max-flows)",
                self.max_flows as u64,
            ),
        ] {
            e.single(name, Kind::Gauge, help, value);
        }
        for (name, help, value) in [
            (
                "mesh_node_firewall_flows_new_total",
                "Flows the policy allowed and the table began to track",
                self.flows_new,
            ),
            (
                "mesh_node_firewall_flows_evicted_total",
                "Flows evicted, oldest first, to make room in a full table",
                self.flows_evicted,
            ),
            (
                "mesh_node_firewall_flows_expired_total",
                "Flows removed after their idle timeout",
                self.flows_expired,
            ),
            (
                "mesh_node_firewall_flows_rechecked_dropped_total",
                "Tracked flows that a new policy forbids, cut at their next packet",
                self.flows_rechecked_dropped,
            ),
            (
                "mesh_node_firewall_flows_picked_up_total",
                "TCP connections open before the first policy and allowed by it, tracked mid-stream",
                self.flows_picked_up,
            ),
            (
                "mesh_node_firewall_documents_applied_total",
                "Firewall documents put in force",
                self.documents_applied,
            ),
            (
                "mesh_node_firewall_documents_refused_total",
                "Firewall documents refused (malformed, invalid or stale)",
                self.documents_refused,
            ),
        ] {
            e.single(name, Kind::Counter, help, value);
        }
        let name = "mesh_node_firewall_rule_hits_total";
        e.family(
            name,
            Kind::Counter,
            "New flows each rule decided (allowed or denied)",
        );
        let mut by_name: Vec<&RuleHits> = self.rules.iter().collect();
        by_name.sort_by(|a, b| a.name.cmp(&b.name));
        for r in by_name {
            e.sample(name, &[("rule", &r.name)], r.hits);
        }
        let name = "mesh_node_firewall_drops_total";
        e.family(
            name,
            Kind::Counter,
            "Packets the firewall dropped, by reason",
        );
        for (reason, n) in self.drops.by_reason() {
            e.sample(name, &[("reason", reason)], n);
        }
        s.push_str(&e.finish());
    }
}

/// `mesh-node status`: rule names come from the network's signed policy,
/// but are still escaped (no control characters reach the terminal).
impl fmt::Display for FirewallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match (self.generation, self.filtering) {
            (None, _) if self.required => {
                "no document yet: nothing passes (--firewall-required)".to_string()
            }
            (None, _) => "no document yet: nothing filtered".to_string(),
            (Some(g), false) => format!("generation {g}, no policy: nothing filtered"),
            (Some(g), true) => format!(
                "generation {g}, {} rules, default deny",
                self.rules.iter().filter(|r| r.in_force).count()
            ),
        };
        writeln!(f, "firewall: {state}, {} peers", self.peers)?;
        writeln!(
            f,
            "flows: {} of {} tracked; {} opened, {} picked up, {} expired, {} evicted, {} cut by a new policy",
            self.flows,
            self.max_flows,
            self.flows_new,
            self.flows_picked_up,
            self.flows_expired,
            self.flows_evicted,
            self.flows_rechecked_dropped
        )?;
        let drops: Vec<String> = self
            .drops
            .by_reason()
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        writeln!(f, "drops: {}", drops.join(", "))?;
        writeln!(
            f,
            "documents: {} applied, {} refused",
            self.documents_applied, self.documents_refused
        )?;
        if !self.rules.is_empty() {
            writeln!(f, "{:>12}  rule", "hits")?;
            for r in &self.rules {
                let name: String = r.name.chars().take(80).collect();
                writeln!(
                    f,
                    "{:>12}  {}{}",
                    r.hits,
                    name.escape_debug(),
                    if r.in_force {
                        ""
                    } else {
                        " (no longer in force)"
                    }
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FirewallStatus {
        FirewallStatus {
            generation: Some(4),
            filtering: true,
            peers: 3,
            rules: vec![
                RuleHits {
                    name: "web-to-db".into(),
                    hits: 7,
                    in_force: true,
                },
                RuleHits {
                    name: "bad\"name\n\u{1b}[2J".into(),
                    hits: 1,
                    in_force: true,
                },
                RuleHits {
                    name: "old".into(),
                    hits: 2,
                    in_force: false,
                },
            ],
            flows: 5,
            max_flows: 100,
            drops: Drops {
                policy: 9,
                not_local: 1,
                ..Drops::default()
            },
            ..FirewallStatus::default()
        }
    }

    #[test]
    fn the_text_for_people_escapes_rule_names_and_says_what_is_in_force() {
        let text = sample().to_string();
        assert!(text.starts_with("firewall: generation 4, 2 rules, default deny, 3 peers\n"));
        assert!(text.contains("flows: 5 of 100 tracked"));
        assert!(text.contains("drops: policy 9, no_peer 0, not_tracked 0, not_local 1"));
        assert!(text.contains("           7  web-to-db\n"));
        assert!(text.contains("           2  old (no longer in force)\n"));
        assert!(
            !text.contains('\u{1b}'),
            "a control character reached the terminal"
        );
        assert!(text.contains("bad\\\"name\\n\\u{1b}[2J"));
        let none = FirewallStatus {
            required: true,
            ..FirewallStatus::default()
        };
        assert!(
            none.to_string()
                .contains("nothing passes (--firewall-required)")
        );
    }

    #[test]
    fn the_metrics_carry_every_rule_by_name_and_every_drop_reason() {
        let mut s = String::new();
        sample().render_into(&mut s);
        assert!(s.contains("mesh_node_firewall_rules 2\n"));
        assert!(s.contains("mesh_node_firewall_flows_max 100\n"));
        assert!(s.contains("mesh_node_firewall_rule_hits_total{rule=\"old\"} 2\n"));
        assert!(
            s.contains("mesh_node_firewall_rule_hits_total{rule=\"bad\\\"name\\n\u{1b}[2J\"} 1\n")
        );
        assert!(s.contains("mesh_node_firewall_drops_total{reason=\"not_local\"} 1\n"));
        let json = serde_json::to_string(&sample()).unwrap();
        assert_eq!(
            serde_json::from_str::<FirewallStatus>(&json).unwrap(),
            sample()
        );
    }
}
