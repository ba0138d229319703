//! `keyd` commands. Each submodule is one command group.

mod authority;
mod ca;
mod cert;
mod inspect;
mod join;
mod key;
mod policy;
mod roster;
mod run;

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_proto::cert::CaCert;
use mesh_proto::identity::CaSigningKey;

use crate::files;

#[derive(Parser, Debug)]
#[command(name = "keyd", version, about = "pqmesh key daemon and CA tooling")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Node key pairs (WireGuard and Noise).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// The network's certificate authority.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Node certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// The signed roster: members, endpoints, revocations.
    #[command(subcommand)]
    Roster(roster::RosterCommand),
    /// Show a certificate or roster in readable text or JSON.
    Inspect(inspect::InspectArgs),
    /// Run the key daemon.
    Run(run::RunArgs),
    /// Show the running daemon's peers, key epochs and refusals.
    Status(run::StatusArgs),
    /// The network's authority: enrollment and distribution.
    #[command(subcommand)]
    Authority(authority::AuthorityCommand),
    /// Enroll this machine with a join token.
    Join(join::JoinArgs),
    /// The firewall policy: check it, show whom it lets reach whom, explain
    /// a decision.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Key(c) => key::run(c),
        Command::Ca(c) => ca::run(c),
        Command::Cert(c) => cert::run(c),
        Command::Roster(c) => roster::run(c),
        Command::Inspect(a) => inspect::run(a),
        Command::Run(a) => run::run(a),
        Command::Status(a) => run::status(a),
        Command::Authority(c) => authority::run(c),
        Command::Join(a) => join::run(a),
        Command::Policy(c) => policy::run(c),
    }
}

/// File names inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.crt";

/// Loads `ca.key` and `ca.crt` from a CA directory and checks they belong together.
pub fn load_ca(dir: &Path) -> Result<(CaSigningKey, CaCert)> {
    let cert = load_ca_cert(&dir.join(CA_CERT_FILE))?;
    let key_path = dir.join(CA_KEY_FILE);
    let key = CaSigningKey::from_text(&files::read_secret(&key_path)?)
        .with_context(|| format!("{}", key_path.display()))?;
    anyhow::ensure!(
        key.verifying_key() == cert.body().public_key,
        "{} does not belong to {}",
        key_path.display(),
        dir.join(CA_CERT_FILE).display()
    );
    Ok((key, cert))
}

pub fn load_ca_cert(path: &Path) -> Result<CaCert> {
    CaCert::from_text(&files::read_text(path)?).with_context(|| format!("{}", path.display()))
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
