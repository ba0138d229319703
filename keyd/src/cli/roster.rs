//! `keyd roster build` and `keyd roster revoke`: the CA publishes who is in
//! the network. Every new roster gets a higher serial; nodes refuse older ones.
//! Every roster also expires (`--valid`, default 7 days): a node that stops
//! getting new rosters stops trusting its peers instead of trusting revoked
//! ones forever, so the CA must publish a fresh roster before then.
//!
//! A roster may carry the network's firewall policy (`--policy FILE`, the
//! TOML source format of `mesh_proto::firewall::policy`). A new roster keeps
//! the policy of the one it replaces unless told otherwise: dropping it by
//! omission would open every port of every member.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_proto::RosterError;
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::firewall::policy::Policy;
use mesh_proto::roster::{Member, Roster, RosterContent, Signer};
use mesh_proto::signed::Fingerprint;

use crate::{files, time};

#[derive(Subcommand, Debug)]
pub enum RosterCommand {
    /// Build and sign a roster from node certificates and their endpoints.
    Build(BuildArgs),
    /// Revoke certificates: a new roster (serial + 1) without them.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// CA directory (ca.key, ca.crt).
    #[arg(long)]
    ca_dir: PathBuf,
    /// CERT_FILE[,wg=IP:PORT][,keyd=IP:PORT] (repeatable).
    #[arg(long = "member")]
    members: Vec<String>,
    /// Roster serial. Default: the --previous roster's serial + 1, else 1.
    #[arg(long)]
    serial: Option<u64>,
    /// The roster this one replaces: its revocations carry over.
    #[arg(long)]
    previous: Option<PathBuf>,
    /// How long nodes accept this roster (humantime: 7d, 12h, ...).
    #[arg(long, default_value = DEFAULT_VALID)]
    valid: String,
    /// Firewall policy (policy.toml) the roster carries. Default: the
    /// --previous roster's, else none (no firewall).
    #[arg(long, conflicts_with = "no_policy")]
    policy: Option<PathBuf>,
    /// Carry no firewall policy, even if --previous has one.
    #[arg(long)]
    no_policy: bool,
    /// Where to write the roster.
    #[arg(long)]
    out: PathBuf,
}

/// A week: long enough to ride out an outage of the CA, short enough that a
/// node cut off from updates does not trust a revoked peer for long.
const DEFAULT_VALID: &str = "7d";

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// CA directory (ca.key, ca.crt).
    #[arg(long)]
    ca_dir: PathBuf,
    /// The roster in force.
    #[arg(long)]
    roster: PathBuf,
    /// Certificate file to revoke (repeatable).
    #[arg(long = "cert")]
    certs: Vec<PathBuf>,
    /// Fingerprint to revoke, 64 hex digits (repeatable).
    #[arg(long = "fingerprint")]
    fingerprints: Vec<String>,
    /// How long nodes accept the new roster (humantime: 7d, 12h, ...).
    #[arg(long, default_value = DEFAULT_VALID)]
    valid: String,
    /// Where to write the new roster (default: replace --roster).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Issue time now, expiry `--valid` later. The roster refuses an expiry that
/// is not after its issue time (`--valid 0s`).
fn validity(valid: &str) -> Result<(u64, u64)> {
    let valid = time::parse_duration("--valid", valid)?;
    let now = time::unix_now();
    Ok((now, now.saturating_add(valid.as_secs())))
}

/// Parses `CERT_FILE[,wg=IP:PORT][,keyd=IP:PORT]`.
fn parse_member(spec: &str) -> Result<Member> {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default();
    let text = files::read_text(path.as_ref())?;
    let cert = NodeCert::from_text(&text).with_context(|| format!("--member {path}"))?;
    let mut member = Member {
        cert,
        wg_endpoint: None,
        keyd_endpoint: None,
    };
    for part in parts {
        let (key, value) = part.split_once('=').with_context(|| {
            format!("--member {spec}: `{part}` is not wg=IP:PORT or keyd=IP:PORT")
        })?;
        let addr: SocketAddr = value.parse().with_context(|| {
            format!("--member {spec}: `{value}` is not IP:PORT (host names are not accepted)")
        })?;
        match key {
            "wg" => member.wg_endpoint = Some(addr),
            "keyd" => member.keyd_endpoint = Some(addr),
            other => bail!("--member {spec}: unknown endpoint `{other}` (use wg= or keyd=)"),
        }
    }
    Ok(member)
}

/// Names the option behind a refused validity; other errors speak for
/// themselves.
fn valid_context(e: RosterError) -> anyhow::Error {
    match e {
        RosterError::Validity { .. } => anyhow::Error::new(e).context("--valid"),
        other => other.into(),
    }
}

/// Reads, parses and validates a policy source file; errors name the file
/// (and, from the parser, the rule).
pub fn load_policy(path: &Path) -> Result<Policy> {
    let text = files::read_text(path)?;
    let policy = Policy::from_toml(&text).with_context(|| format!("{}", path.display()))?;
    policy
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(policy)
}

fn load_roster(path: &Path, ca: &CaCert) -> Result<Roster> {
    Roster::from_text(&files::read_text(path)?, ca).with_context(|| format!("{}", path.display()))
}

fn write(out: &Path, roster: &Roster) -> Result<()> {
    files::write_document(out, &roster.to_text())?;
    let policy = match roster.policy() {
        Some(p) => format!("{} firewall rules", p.rules.len()),
        None => "no firewall".into(),
    };
    println!(
        "wrote {} (serial {}, {} members, {} revoked, {policy}, valid until {})",
        out.display(),
        roster.serial(),
        roster.members().len(),
        roster.revoked().count(),
        time::rfc3339(roster.not_after())
    );
    Ok(())
}

pub fn run(cmd: RosterCommand) -> Result<()> {
    match cmd {
        RosterCommand::Build(a) => build(a),
        RosterCommand::Revoke(a) => revoke(a),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let (key, ca) = super::load_ca(&a.ca_dir)?;
    let previous = a
        .previous
        .as_ref()
        .map(|p| load_roster(p, &ca))
        .transpose()?;
    let serial = match (a.serial, &previous) {
        (Some(s), _) => s,
        (None, Some(p)) => p.serial() + 1,
        (None, None) => 1,
    };
    let revoked: Vec<Fingerprint> = previous.iter().flat_map(|p| p.revoked().copied()).collect();
    let members = a
        .members
        .iter()
        .map(|m| parse_member(m))
        .collect::<Result<Vec<_>>>()?;
    for m in &members {
        if revoked.contains(&m.cert.fingerprint()) {
            bail!("member `{}` has a revoked certificate", m.cert.body().name);
        }
    }
    let policy = match (&a.policy, a.no_policy) {
        (Some(path), _) => Some(load_policy(path)?.encode()),
        (None, true) => None,
        (None, false) => previous
            .as_ref()
            .and_then(|p| p.policy_bytes().map(<[u8]>::to_vec)),
    };
    let (issued_at, not_after) = validity(&a.valid)?;
    let content = RosterContent {
        serial,
        issued_at,
        not_after,
        members,
        revoked,
        policy,
        ..RosterContent::default()
    };
    let roster = Roster::sign(&ca, &Signer::Root(&key), &content).map_err(valid_context)?;
    if let Some(p) = &previous {
        // Root-signed: the signer rule passes whatever the time.
        Roster::check_update(Some(p), &roster, issued_at, 0)?;
    }
    write(&a.out, &roster)
}

fn revoke(a: RevokeArgs) -> Result<()> {
    let (key, ca) = super::load_ca(&a.ca_dir)?;
    let current = load_roster(&a.roster, &ca)?;
    let mut targets: HashSet<Fingerprint> = HashSet::new();
    for path in &a.certs {
        let cert = NodeCert::from_text(&files::read_text(path)?)
            .with_context(|| format!("--cert {}", path.display()))?;
        targets.insert(cert.fingerprint());
    }
    for fp in &a.fingerprints {
        targets.insert(Fingerprint::from_hex(fp).context("--fingerprint")?);
    }
    if targets.is_empty() {
        bail!("nothing to revoke: give --cert FILE or --fingerprint HEX");
    }
    let members: Vec<Member> = current
        .members()
        .iter()
        .filter(|m| !targets.contains(&m.cert.fingerprint()))
        .cloned()
        .collect();
    let mut revoked: Vec<Fingerprint> = current.revoked().copied().collect();
    for fp in targets {
        if !revoked.contains(&fp) {
            revoked.push(fp);
        }
    }
    let (issued_at, not_after) = validity(&a.valid)?;
    // Everything but the members and revocations stays: the policy above
    // all (a revocation must not open the firewall).
    let content = RosterContent {
        serial: current.serial() + 1,
        issued_at,
        not_after,
        members,
        revoked,
        ..current.content()
    };
    let roster = Roster::sign(&ca, &Signer::Root(&key), &content).map_err(valid_context)?;
    write(a.out.as_deref().unwrap_or(&a.roster), &roster)
}
