//! `keyd ca create`: a new network and its certificate authority.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mesh_proto::cert::CaCert;
use mesh_proto::identity::CaSigningKey;

use super::{CA_CERT_FILE, CA_KEY_FILE};
use crate::{files, time};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA key (ca.key, 0600) and self-signed certificate (ca.crt).
    Create(CreateArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Network id this CA certifies (letters, digits, '-', '_', '.').
    #[arg(long)]
    network: String,
    /// The CA's name.
    #[arg(long, default_value = "pqmesh-ca")]
    name: String,
    /// How long the CA is valid.
    #[arg(long, default_value = "10years")]
    valid: String,
    /// Directory for ca.key and ca.crt.
    #[arg(long)]
    dir: PathBuf,
}

pub fn run(cmd: CaCommand) -> Result<()> {
    let CaCommand::Create(a) = cmd;
    let valid = time::parse_duration("--valid", &a.valid)?;
    let now = time::unix_now();
    let key = CaSigningKey::generate()?;
    let cert = CaCert::create(&key, &a.name, &a.network, now, now + valid.as_secs())?;
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create directory {}", a.dir.display()))?;
    files::write_secret(&a.dir.join(CA_KEY_FILE), &key.to_text())?;
    files::write_public_key(&a.dir.join(CA_CERT_FILE), &cert.to_text())?;
    println!(
        "created CA `{}` for network `{}` in {} (fingerprint {})",
        a.name,
        a.network,
        a.dir.display(),
        cert.fingerprint()
    );
    Ok(())
}
