//! `keyd cert issue`: the CA certifies a node's public keys.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_proto::cert::{NodeCertRequest, attribute_map, parse_attribute};
use mesh_proto::identity::{NoisePublicKey, WgPublicKey};
use mesh_proto::prefix::IpPrefix;

use super::key::{NOISE_PUB_FILE, WG_PUB_FILE};
use crate::{files, time};

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Issue a node certificate signed by the CA.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// CA directory (ca.key, ca.crt).
    #[arg(long)]
    ca_dir: PathBuf,
    /// Node name, unique in the network.
    #[arg(long)]
    name: String,
    /// Overlay address with prefix, e.g. 10.99.0.1/24 (repeat for IPv4 + IPv6).
    #[arg(long = "address", required = true)]
    addresses: Vec<String>,
    /// Group for policy (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Attribute for policy, KEY=VALUE, e.g. env=prod (repeatable).
    #[arg(long = "attribute")]
    attributes: Vec<String>,
    /// How long the certificate is valid.
    #[arg(long, default_value = "90d")]
    valid: String,
    /// Directory holding the node's wg.pub and noise.pub (from `keyd key generate`).
    #[arg(long, conflicts_with_all = ["wg_pub", "noise_pub"])]
    key_dir: Option<PathBuf>,
    /// The node's WireGuard public key (base64), instead of --key-dir.
    #[arg(long, requires = "noise_pub")]
    wg_pub: Option<String>,
    /// The node's Noise public key (base64), instead of --key-dir.
    #[arg(long, requires = "wg_pub")]
    noise_pub: Option<String>,
    /// Where to write the certificate.
    #[arg(long)]
    out: PathBuf,
}

fn public_keys(a: &IssueArgs) -> Result<(WgPublicKey, NoisePublicKey)> {
    let read = |dir: &Path, file: &str| -> Result<String> { files::read_text(&dir.join(file)) };
    let (wg, noise) = match (&a.key_dir, &a.wg_pub, &a.noise_pub) {
        (Some(dir), _, _) => (read(dir, WG_PUB_FILE)?, read(dir, NOISE_PUB_FILE)?),
        (None, Some(w), Some(n)) => (w.clone(), n.clone()),
        _ => bail!("give the node's public keys: --key-dir DIR, or --wg-pub and --noise-pub"),
    };
    let wg = WgPublicKey::from_base64(&wg).context("WireGuard public key (--wg-pub or wg.pub)")?;
    let noise = NoisePublicKey::from_base64(&noise)
        .context("Noise public key (--noise-pub or noise.pub)")?;
    Ok((wg, noise))
}

pub fn run(cmd: CertCommand) -> Result<()> {
    let CertCommand::Issue(a) = cmd;
    let (key, ca) = super::load_ca(&a.ca_dir)?;
    let (wg_public, noise_public) = public_keys(&a)?;
    let addresses = a
        .addresses
        .iter()
        .map(|s| {
            s.parse::<IpPrefix>()
                .map_err(|e| anyhow::anyhow!("--address: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let attributes = attribute_map(
        a.attributes
            .iter()
            .map(|kv| parse_attribute(kv))
            .collect::<Result<Vec<_>, _>>()
            .context("--attribute")?,
    )
    .context("--attribute")?;
    let now = time::unix_now();
    let valid = time::parse_duration("--valid", &a.valid)?;
    let not_after = (now + valid.as_secs()).min(ca.body().not_after);
    let cert = ca.issue(
        &key,
        NodeCertRequest {
            name: a.name.clone(),
            addresses,
            groups: a.groups.clone(),
            attributes,
            not_before: now.max(ca.body().not_before),
            not_after,
            wg_public,
            noise_public,
        },
    )?;
    files::write_document(&a.out, &cert.to_text())?;
    println!(
        "issued {} for `{}` ({}), valid until {}",
        a.out.display(),
        a.name,
        cert.body().node_id,
        time::rfc3339(not_after)
    );
    Ok(())
}
