//! `keyd join TOKEN`: enroll this machine with the network's authority.
//!
//! Keys are made here (or reused from an earlier attempt whose answer was
//! lost) and never leave the machine. On success the directory holds all
//! that `keyd run --config DIR/keyd.toml` needs, including where to
//! subscribe for roster updates.

use std::fs::Permissions;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
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
    /// Where this node's keyd listens (QUIC, and TLS over TCP for the edge
    /// ladder); its IP is also reported as the WireGuard endpoint's.
    /// 0.0.0.0: the authority fills in the address it sees. A port below
    /// 1024 (an edge node's 443) needs keyd's drop-in
    /// /usr/share/pqmesh/keyd-privileged-port.conf under systemd.
    #[arg(long, default_value = "0.0.0.0:51821")]
    quic_listen: SocketAddr,
    #[arg(long, default_value_t = 51820)]
    wg_port: u16,
    #[arg(long)]
    json: bool,
    /// Pin the network's CA (the fingerprint the token carries) in this
    /// root-owned file before anything else; `mesh-node up --ca-pin` then
    /// takes addresses only from a certificate that CA's network issued.
    /// Default: /etc/pqmesh/ca.pin when root joins into a directory that
    /// another user owns (the package's layout), else no pin.
    #[arg(long, value_name = "FILE")]
    ca_pin: Option<PathBuf>,
}

/// Where root pins the network's CA in the package's layout.
pub const DEFAULT_CA_PIN: &str = "/etc/pqmesh/ca.pin";

pub fn run(a: JoinArgs) -> Result<()> {
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
    // Still as the caller (root in the package's case): keyd's user must
    // not be able to change what the data plane trusts (docs/install.md).
    if let Some(pin) = a.ca_pin.clone().or_else(|| default_pin(&a.dir)) {
        write_pin(&pin, &token)?;
        eprintln!("keyd join: pinned the network's CA in {}", pin.display());
    }
    // Root joining into the package's /var/lib/pqmesh writes it as its owner.
    if let Acting::Owner { uid, gid } = owner::act_as_owner_of(&a.dir)? {
        eprintln!(
            "keyd join: acting as uid {uid} gid {gid}, the owner of {}",
            a.dir.display()
        );
    }
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

/// [`DEFAULT_CA_PIN`] where root joins into a directory another user owns
/// (the package's /var/lib/pqmesh, keyd's); elsewhere (a developer's or a
/// test's directory) no pin unless asked for.
fn default_pin(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let meta = std::fs::symlink_metadata(dir).ok()?;
    (root && meta.is_dir() && meta.uid() != 0).then(|| PathBuf::from(DEFAULT_CA_PIN))
}

/// Writes the token's CA fingerprint to `pin` (0644), in a directory that
/// must be root's and writable by no one else: a pin that keyd's user could
/// replace would pin nothing.
fn write_pin(pin: &Path, token: &JoinToken) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = pin
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        // Readable by the data plane's user whatever root's umask.
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, Permissions::from_mode(0o755)))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        bail!(
            "{} must belong to uid {me} and be writable by it alone to hold the CA pin",
            dir.display()
        );
    }
    // The data plane reads the pin as its own user.
    if meta.mode() & 0o001 == 0 {
        bail!(
            "{} must be searchable by all users (0755 or 0711): the data plane reads the CA pin in it",
            dir.display()
        );
    }
    let text = format!(
        "# The CA of network {}, pinned by `keyd join`; mesh-node --ca-pin.\n{}\n",
        token.network_id,
        token.ca_fingerprint.to_hex()
    );
    files::write_document(pin, &text)?;
    std::fs::set_permissions(pin, Permissions::from_mode(0o644))
        .with_context(|| format!("cannot make {} readable", pin.display()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::token::{TokenId, TokenSecret};
    use mesh_proto::identity::NoisePrivateKey;
    use mesh_proto::signed::Fingerprint;

    fn token() -> JoinToken {
        JoinToken {
            network_id: "net".into(),
            ca_fingerprint: Fingerprint([0xab; 32]),
            authority_key: NoisePrivateKey::generate().unwrap().public_key(),
            endpoints: vec![],
            id: TokenId([7; 8]),
            secret: TokenSecret([9; 32]),
        }
    }

    #[test]
    fn the_pin_names_the_tokens_ca_and_others_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("etc").join("ca.pin");
        write_pin(&pin, &token()).unwrap();
        let text = std::fs::read_to_string(&pin).unwrap();
        assert!(text.lines().any(|l| l == "ab".repeat(32)), "{text}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&pin), 0o644);
        assert_eq!(mode(pin.parent().unwrap()), 0o755);
    }

    /// A pin in a directory others may write pins nothing: they could
    /// replace it.
    #[test]
    fn a_pin_where_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o777)).unwrap();
        let pin = dir.path().join("ca.pin");
        let err = write_pin(&pin, &token()).unwrap_err();
        assert!(err.to_string().contains("writable by it alone"), "{err}");
        assert!(!pin.exists());
        // Nor one the data plane cannot read.
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o700)).unwrap();
        let err = write_pin(&pin, &token()).unwrap_err();
        assert!(err.to_string().contains("searchable"), "{err}");
        assert!(!pin.exists());
    }
}
