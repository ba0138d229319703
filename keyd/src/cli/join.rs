//! `keyd join TOKEN`: enroll this machine with the network's authority.
//!
//! Keys are made here (or reused from an earlier attempt whose answer was
//! lost) and never leave the machine. On success the directory holds all
//! that `keyd run --config DIR/keyd.toml` needs, including where to
//! subscribe for roster updates.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_proto::identity::{NoisePrivateKey, WgPrivateKey};
use serde_json::json;
use zeroize::Zeroizing;

use super::key::{NOISE_KEY_FILE, WG_KEY_FILE};
use super::print_json;
use crate::authority::client;
use crate::authority::token::JoinToken;
use crate::authority::wire::Endpoints;
use crate::files;
use crate::owner::{self, Acting};

pub const CONFIG_FILE: &str = "keyd.toml";

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The join token, or `-` to read it from standard input (keeps it out
    /// of the process list and shell history).
    token: String,
    /// Directory for keys, certificate, roster, state and keyd.toml (the
    /// package's units read /var/lib/pqmesh).
    #[arg(long, default_value = "/var/lib/pqmesh")]
    dir: PathBuf,
    /// The name to ask for (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// The WireGuard interface keyd will drive.
    #[arg(long, default_value = "pqmesh0")]
    interface: String,
    /// Where this node's keyd listens (QUIC); its IP is also reported as the
    /// WireGuard endpoint's. 0.0.0.0: the authority fills in the address it
    /// sees.
    #[arg(long, default_value = "0.0.0.0:51821")]
    quic_listen: SocketAddr,
    #[arg(long, default_value_t = 51820)]
    wg_port: u16,
    #[arg(long)]
    json: bool,
}

pub fn run(a: JoinArgs) -> Result<()> {
    // Root joining into the package's /var/lib/pqmesh writes it as its owner.
    if let Acting::Owner { uid, gid } = owner::act_as_owner_of(&a.dir)? {
        eprintln!(
            "keyd join: acting as uid {uid} gid {gid}, the owner of {}",
            a.dir.display()
        );
    }
    let text = if a.token == "-" {
        let mut t = Zeroizing::new(String::new());
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut t)
            .context("reading the token from standard input")?;
        t
    } else {
        Zeroizing::new(a.token.clone())
    };
    let token = JoinToken::parse(&text)?;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => hostname()?,
    };
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let (wg, noise) = keys(&a.dir)?;
    let endpoints = Endpoints {
        wg: Some(SocketAddr::new(a.quic_listen.ip(), a.wg_port)),
        keyd: Some(a.quic_listen),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let enrolled = runtime.block_on(client::join(
        &token,
        &name,
        wg.public_key(),
        &noise,
        endpoints,
    ))?;
    let cert = &enrolled.cert;
    files::write_document(&a.dir.join("ca.crt"), &enrolled.ca.to_text())?;
    files::write_document(&a.dir.join("node.crt"), &cert.to_text())?;
    files::write_document(&a.dir.join("roster"), &enrolled.roster.to_text())?;
    let endpoints_toml = token
        .endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "# Written by `keyd join`; see docs/keyd-config.md.\n\
         interface = \"{}\"\n\
         wg_listen_port = {}\n\
         quic_listen = \"{}\"\n\
         ca_cert = \"ca.crt\"\n\
         cert = \"node.crt\"\n\
         wg_key = \"{WG_KEY_FILE}\"\n\
         noise_key = \"{NOISE_KEY_FILE}\"\n\
         roster = \"roster\"\n\
         state_dir = \"state\"\n\
         persistent_keepalive = 25\n\
         \n\
         [authority]\n\
         endpoints = [{endpoints_toml}]\n\
         public_key = \"{}\"\n",
        a.interface,
        a.wg_port,
        a.quic_listen,
        token.authority_key.to_base64(),
    );
    files::write_document(&a.dir.join(CONFIG_FILE), &config)?;
    let b = cert.body();
    let v = json!({
        "name": b.name,
        "node_id": b.node_id.to_string(),
        "addresses": b.addresses.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "groups": b.groups,
        "not_after": b.not_after,
        "network": b.network_id,
        "roster_serial": enrolled.roster.serial(),
        "config": a.dir.join(CONFIG_FILE),
    });
    if a.json {
        print_json(&v)
    } else {
        println!(
            "joined network {} as {} ({}); start with `keyd run --config {}`",
            b.network_id,
            b.name,
            v["addresses"],
            a.dir.join(CONFIG_FILE).display()
        );
        Ok(())
    }
}

/// The machine's keys: those of an earlier attempt, or new ones.
fn keys(dir: &Path) -> Result<(WgPrivateKey, NoisePrivateKey)> {
    let (wg_path, noise_path) = (dir.join(WG_KEY_FILE), dir.join(NOISE_KEY_FILE));
    match (wg_path.exists(), noise_path.exists()) {
        (true, true) => Ok((
            WgPrivateKey::from_text(&files::read_secret(&wg_path)?)?,
            NoisePrivateKey::from_text(&files::read_secret(&noise_path)?)?,
        )),
        (false, false) => {
            let wg = WgPrivateKey::generate()?;
            let noise = NoisePrivateKey::generate()?;
            files::write_secret(&wg_path, &wg.to_text())?;
            files::write_secret(&noise_path, &noise.to_text())?;
            Ok((wg, noise))
        }
        _ => bail!(
            "{} holds only one of {WG_KEY_FILE} and {NOISE_KEY_FILE}: remove it or restore the other",
            dir.display()
        ),
    }
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name: give --name")?;
    Ok(name.trim().to_string())
}
