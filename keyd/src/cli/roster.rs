//! `keyd roster build` and `keyd roster revoke`: the CA publishes who is in
//! the network. Every new roster gets a higher serial; nodes refuse older ones.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::roster::{Member, Roster};
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
    /// Where to write the roster.
    #[arg(long)]
    out: PathBuf,
}

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
    /// Where to write the new roster (default: replace --roster).
    #[arg(long)]
    out: Option<PathBuf>,
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

fn load_roster(path: &Path, ca: &CaCert) -> Result<Roster> {
    Roster::from_text(&files::read_text(path)?, ca).with_context(|| format!("{}", path.display()))
}

fn write(out: &Path, roster: &Roster) -> Result<()> {
    files::write_document(out, &roster.to_text())?;
    println!(
        "wrote {} (serial {}, {} members, {} revoked)",
        out.display(),
        roster.serial(),
        roster.members().len(),
        roster.revoked().count()
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
    let roster = Roster::build(&ca, &key, serial, time::unix_now(), members, revoked)?;
    if let Some(p) = &previous {
        Roster::check_update(Some(p), &roster)?;
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
    let roster = Roster::build(
        &ca,
        &key,
        current.serial() + 1,
        time::unix_now(),
        members,
        revoked,
    )?;
    write(a.out.as_deref().unwrap_or(&a.roster), &roster)
}
