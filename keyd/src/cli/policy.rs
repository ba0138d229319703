//! `keyd policy check|build|explain`: the firewall policy before it is
//! signed into a roster (`keyd roster build --policy`, `keyd authority
//! policy set`), and what it decides for two members.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_proto::firewall::engine::{Decision, Engine, PeerInfo};
use mesh_proto::firewall::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use mesh_proto::firewall::policy::Policy;
use mesh_proto::roster::Roster;
use serde_json::json;

use crate::{files, firewall, text};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file (exit status 1 with the reason if it is refused).
    Check(CheckArgs),
    /// Validate it and show, against a roster's members, whom each rule
    /// lets reach whom; a rule that selects no member is flagged.
    Build(BuildArgs),
    /// Which rule decides a flow from one member to another.
    Explain(ExplainArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The policy source (TOML, `[[rule]]` tables; docs/firewall.md).
    file: PathBuf,
}

#[derive(Args, Debug)]
pub struct RosterArgs {
    /// A signed roster whose members the rules are shown against.
    #[arg(long)]
    roster: PathBuf,
    /// The network's CA certificate, to verify the roster.
    #[arg(long)]
    ca_cert: PathBuf,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    file: PathBuf,
    #[command(flatten)]
    roster: RosterArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The member that opens the flow (its name in the roster).
    src: String,
    /// The member it goes to.
    dst: String,
    /// `tcp/5432`, `udp/53`, `icmp`.
    flow: String,
    #[command(flatten)]
    roster: RosterArgs,
    /// Explain this policy file instead of the roster's own policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(c: PolicyCommand) -> Result<()> {
    match c {
        PolicyCommand::Check(a) => {
            let p = load(&a.file)?;
            println!("{}: valid, {} rules", a.file.display(), p.rules.len());
            Ok(())
        }
        PolicyCommand::Build(a) => build(a),
        PolicyCommand::Explain(a) => explain(a),
    }
}

/// Reads and validates a policy source; errors name the file and the rule.
pub fn load(path: &Path) -> Result<Policy> {
    let text = files::read_text(path)?;
    Policy::from_toml(&text).with_context(|| format!("policy {}", path.display()))
}

fn members(a: &RosterArgs) -> Result<(Roster, Vec<PeerInfo>)> {
    let ca = super::load_ca_cert(&a.ca_cert)?;
    let roster = Roster::from_text(&files::read_text(&a.roster)?, &ca)
        .with_context(|| format!("{}", a.roster.display()))?;
    let members = roster
        .members()
        .iter()
        .map(|m| firewall::peer_info(&m.cert))
        .collect();
    Ok((roster, members))
}

fn name(p: &PeerInfo) -> String {
    text::sanitize(&p.name, text::NAME_MAX)
}

fn build(a: BuildArgs) -> Result<()> {
    let policy = load(&a.file)?;
    let (_, members) = members(&a.roster)?;
    let mut rules = Vec::new();
    for rule in &policy.rules {
        let pick = |s: &mesh_proto::firewall::policy::Selector| -> Vec<String> {
            members.iter().filter(|m| s.matches(m)).map(name).collect()
        };
        let (from, to) = (pick(&rule.from), pick(&rule.to));
        let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        rules.push(json!({
            "name": rule.name,
            "action": rule.action.to_string(),
            "proto": rule.proto.to_string(),
            "ports": ports,
            "from": from,
            "to": to,
            "selects_nobody": from.is_empty() || to.is_empty(),
        }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "rules": rules, "members": members.len() }))?
        );
        return Ok(());
    }
    println!(
        "{}: valid, {} rules, against {} members of {}",
        a.file.display(),
        policy.rules.len(),
        members.len(),
        a.roster.roster.display()
    );
    for r in &rules {
        let list = |v: &serde_json::Value| {
            let names: Vec<&str> = v
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            if names.is_empty() {
                "(nobody)".to_string()
            } else {
                names.join(", ")
            }
        };
        let ports = r["ports"]
            .as_array()
            .filter(|p| !p.is_empty())
            .map(|p| {
                let p: Vec<&str> = p.iter().filter_map(|x| x.as_str()).collect();
                format!(" port {}", p.join(","))
            })
            .unwrap_or_default();
        println!(
            "  {:<5} {:<24} {}{}: {} -> {}{}",
            r["action"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            r["proto"].as_str().unwrap_or(""),
            ports,
            list(&r["from"]),
            list(&r["to"]),
            if r["selects_nobody"] == true {
                "   WARNING: selects no member of this roster"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `tcp/5432` -> (6, 5432); `icmp` -> (1, 0).
fn parse_flow(flow: &str) -> Result<(u8, u16)> {
    let (proto, port) = match flow.split_once('/') {
        Some((p, port)) => (
            p,
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("`{flow}`: the port must be 1-65535"))?,
        ),
        None => (flow, 0),
    };
    Ok(match (proto, port) {
        ("tcp", p) if p != 0 => (PROTO_TCP, p),
        ("udp", p) if p != 0 => (PROTO_UDP, p),
        ("icmp", 0) => (PROTO_ICMP, 0),
        _ => bail!("`{flow}` is not a flow: tcp/PORT, udp/PORT or icmp"),
    })
}

fn explain(a: ExplainArgs) -> Result<()> {
    let (roster, members) = members(&a.roster)?;
    let policy = match &a.policy {
        Some(file) => load(file)?,
        None => match roster.policy() {
            Some(p) => p.clone(),
            None => {
                println!("the roster has no policy: every flow between members is allowed");
                return Ok(());
            }
        },
    };
    let find = |n: &str| {
        members
            .iter()
            .find(|m| m.name == n)
            .with_context(|| format!("no member named `{}` in the roster", text::sanitize(n, 64)))
    };
    let (src, dst) = (find(&a.src)?, find(&a.dst)?);
    let (proto, port) = parse_flow(&a.flow)?;
    let engine = Engine::new(&policy, src, std::slice::from_ref(dst));
    let decision = engine.decide(
        mesh_proto::firewall::engine::Direction::Outbound,
        0,
        proto,
        port,
    );
    let (allowed, rule) = match decision {
        Decision::Allow { rule } => (true, Some(engine.rule_name(rule).to_string())),
        Decision::Deny { rule } => (false, rule.map(|r| engine.rule_name(r).to_string())),
    };
    if a.json {
        println!(
            "{}",
            json!({"from": name(src), "to": name(dst), "flow": a.flow, "allowed": allowed, "rule": rule})
        );
        return Ok(());
    }
    let verdict = if allowed { "ALLOWED" } else { "DENIED" };
    match rule {
        Some(r) => println!(
            "{} -> {} {}: {verdict} by rule `{r}`",
            name(src),
            name(dst),
            a.flow
        ),
        None => println!(
            "{} -> {} {}: {verdict}: no rule allows it (default deny)",
            name(src),
            name(dst),
            a.flow
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_or_say_why() {
        assert_eq!(parse_flow("tcp/5432").unwrap(), (PROTO_TCP, 5432));
        assert_eq!(parse_flow("udp/53").unwrap(), (PROTO_UDP, 53));
        assert_eq!(parse_flow("icmp").unwrap(), (PROTO_ICMP, 0));
        for bad in ["tcp", "tcp/0", "tcp/x", "sctp/1", "icmp/3", ""] {
            assert!(parse_flow(bad).is_err(), "{bad}");
        }
    }
}
