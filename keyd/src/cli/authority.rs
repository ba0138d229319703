//! `keyd authority ...`: set up and run a network's authority, and the
//! operator's commands against the running one (over its admin socket).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mesh_proto::cert::CaCert;
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey};
use mesh_proto::prefix::IpPrefix;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{load_ca, print_json};
use crate::authority::keys::{self, CA_CERT, NOISE_KEY, ROOT_KEY};
use crate::authority::server::{AdminOp, ServeConfig};
use crate::authority::service::{Authority, Params, SigningKey};
use crate::authority::store::RedbStore;
use crate::authority::{admin, server};
use crate::owner::{self, Acting};
use crate::{files, time};

pub const CONFIG_FILE: &str = "authority.toml";
pub const STORE_FILE: &str = "store.redb";

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Set up an authority in a new state directory: a new network, or one
    /// whose CA exists (`--ca-dir`).
    Init(InitArgs),
    /// Run the authority (enrollment and distribution over QUIC).
    Run(RunArgs),
    /// What the running authority holds and counts.
    Status(JsonDirArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Roll the signing key over to one certified now by the root key
    /// (which may live offline: `--root-key`).
    RotateKey(RotateArgs),
    /// The network's firewall policy, published to every node in the roster.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check a policy.toml and publish it (a signed roster update).
    Set(PolicySetArgs),
    /// The policy in force.
    Show(JsonDirArgs),
    /// Remove the policy: no firewall, everything passes.
    Clear(JsonDirArgs),
}

#[derive(Args, Debug)]
pub struct PolicySetArgs {
    #[command(flatten)]
    d: DirArgs,
    /// The policy source (TOML, `[[rule]]` tables).
    file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DirArgs {
    /// The authority's state directory.
    #[arg(long, default_value = "/var/lib/pqmesh-authority")]
    dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    dir: DirArgs,
    #[command(flatten)]
    log: crate::logging::LogArgs,
}

#[derive(Args, Debug)]
pub struct JsonDirArgs {
    #[command(flatten)]
    d: DirArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    d: DirArgs,
    /// A new network with this id (a new root CA is made).
    #[arg(long, conflicts_with = "ca_dir")]
    network: Option<String>,
    /// Use the existing CA in this directory (ca.key, ca.crt).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Where the authority listens (QUIC).
    #[arg(long, default_value = "0.0.0.0:51830")]
    listen: SocketAddr,
    /// Addresses written into join tokens (default: --listen, if specific).
    #[arg(long = "endpoint")]
    endpoints: Vec<SocketAddr>,
    #[arg(long, default_value = "10.77.0.0/16")]
    pool_v4: IpPrefix,
    /// IPv6 pool; `none` for IPv4 only.
    #[arg(long, default_value = "fd77::/64")]
    pool_v6: String,
    /// Keep the root key offline: write it here instead of the state
    /// directory. Key rollovers then need `rotate-key --root-key`.
    #[arg(long)]
    root_key_out: Option<PathBuf>,
    #[arg(long, default_value = "30days")]
    cert_lifetime: String,
    #[arg(long, default_value = "90days")]
    authority_lifetime: String,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token; prints it (the only copy of its secret).
    Create(TokenCreateArgs),
    List(JsonDirArgs),
    Revoke(IdArgs),
}

#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    d: DirArgs,
    /// How long the token can be used.
    #[arg(long, default_value = "1h")]
    expires: String,
    /// How many machines it can enroll.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    /// Groups granted to machines enrolled with it (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Attributes granted, as NAME=VALUE (repeatable).
    #[arg(long = "attr")]
    attributes: Vec<String>,
    /// Names allowed, with `*` as wildcard (e.g. `web-*`).
    #[arg(long)]
    name_pattern: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    d: DirArgs,
    id: String,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    List(JsonDirArgs),
    /// Revoke a node (by name or node id): every certificate it ever had.
    Revoke(IdArgs),
    Rename(RenameArgs),
}

#[derive(Args, Debug)]
pub struct RenameArgs {
    #[command(flatten)]
    d: DirArgs,
    node: String,
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    d: DirArgs,
    /// The root CA key (default: root.key in the state directory).
    #[arg(long)]
    root_key: Option<PathBuf>,
    #[arg(long, default_value = "90days")]
    lifetime: String,
    #[arg(long)]
    json: bool,
}

/// authority.toml.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: SocketAddr,
    endpoints: Vec<SocketAddr>,
    pool_v4: String,
    pool_v6: Option<String>,
    #[serde(default = "default_cert_lifetime")]
    cert_lifetime: String,
    #[serde(default = "default_roster_lifetime")]
    roster_lifetime: String,
    #[serde(default = "default_authority_lifetime")]
    authority_lifetime: String,
    #[serde(default = "default_per_source")]
    max_connections_per_source: usize,
}

fn default_cert_lifetime() -> String {
    "30days".into()
}
fn default_roster_lifetime() -> String {
    "7days".into()
}
fn default_authority_lifetime() -> String {
    "90days".into()
}
fn default_per_source() -> usize {
    64
}

impl FileConfig {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = files::read_text(&path)?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
            .with_context(|| format!("{}", path.display()))
    }

    fn params(&self) -> Result<Params> {
        let secs = |field: &str, v: &str| time::parse_duration(field, v).map(|d| d.as_secs());
        let pool_v4: IpPrefix = self
            .pool_v4
            .parse()
            .map_err(|e| anyhow::anyhow!("`pool_v4`: {e}"))?;
        if !pool_v4.addr.is_ipv4() {
            bail!("`pool_v4`: {pool_v4} is not IPv4");
        }
        let pool_v6 = match &self.pool_v6 {
            None => None,
            Some(p) => {
                let p: IpPrefix = p.parse().map_err(|e| anyhow::anyhow!("`pool_v6`: {e}"))?;
                if p.addr.is_ipv4() {
                    bail!("`pool_v6`: {p} is not IPv6");
                }
                Some(p)
            }
        };
        Ok(Params {
            cert_lifetime: secs("cert_lifetime", &self.cert_lifetime)?,
            roster_lifetime: secs("roster_lifetime", &self.roster_lifetime)?,
            authority_lifetime: secs("authority_lifetime", &self.authority_lifetime)?,
            pool_v4,
            pool_v6,
            keep_deltas: 4096,
            endpoints: self.endpoints.clone(),
        })
    }
}

pub fn run(cmd: AuthorityCommand) -> Result<()> {
    match cmd {
        AuthorityCommand::Init(a) => init(a),
        AuthorityCommand::Run(a) => run_authority(&a.dir.dir, a.log.log_format),
        AuthorityCommand::Status(a) => {
            let v = admin::request(&a.d.dir, &AdminOp::Status)?;
            show(a.json, &v, |v| {
                println!(
                    "network {}  roster serial {}  members {}  subscribers {}  signer {}",
                    v["network"], v["serial"], v["members"], v["subscribers"], v["signer"]
                );
            })
        }
        AuthorityCommand::Token(TokenCommand::Create(a)) => {
            let lifetime = time::parse_duration("--expires", &a.expires)?.as_secs();
            let attributes = a
                .attributes
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--attr `{kv}` is not NAME=VALUE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let v = admin::request(
                &a.d.dir,
                &AdminOp::TokenCreate {
                    lifetime_secs: lifetime,
                    uses: a.uses,
                    groups: a.groups,
                    attributes,
                    name_pattern: a.name_pattern,
                },
            )?;
            show(a.json, &v, |v| {
                println!("{}", v["token"].as_str().unwrap_or(""))
            })
        }
        AuthorityCommand::Token(TokenCommand::List(a)) => {
            let v = admin::request(&a.d.dir, &AdminOp::TokenList)?;
            show(a.json, &v, |v| {
                println!(
                    "{:<17} {:<8} {:>5} {:>12}  groups",
                    "id", "state", "uses", "expires_at"
                );
                for t in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<17} {:<8} {:>2}/{:<2} {:>12}  {}",
                        t["id"].as_str().unwrap_or(""),
                        t["state"].as_str().unwrap_or(""),
                        t["uses"],
                        t["max_uses"],
                        t["expires_at"],
                        t["groups"]
                    );
                }
            })
        }
        AuthorityCommand::Token(TokenCommand::Revoke(a)) => {
            let v = admin::request(&a.d.dir, &AdminOp::TokenRevoke { id: a.id })?;
            show(a.json, &v, |v| {
                println!("token {} revoked", v["id"].as_str().unwrap_or(""))
            })
        }
        AuthorityCommand::Node(NodeCommand::List(a)) => {
            let v = admin::request(&a.d.dir, &AdminOp::NodeList)?;
            show(a.json, &v, |v| {
                println!("{:<20} {:<34} {:<8} addresses", "name", "node id", "state");
                for n in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<34} {:<8} {}",
                        n["name"].as_str().unwrap_or(""),
                        n["node_id"].as_str().unwrap_or(""),
                        if n["revoked_at"].is_null() {
                            "active"
                        } else {
                            "revoked"
                        },
                        n["addresses"]
                    );
                }
            })
        }
        AuthorityCommand::Node(NodeCommand::Revoke(a)) => {
            let v = admin::request(&a.d.dir, &AdminOp::NodeRevoke { node: a.id })?;
            show(a.json, &v, |v| {
                println!("node {} revoked", v["name"].as_str().unwrap_or(""))
            })
        }
        AuthorityCommand::Node(NodeCommand::Rename(a)) => {
            let v = admin::request(
                &a.d.dir,
                &AdminOp::NodeRename {
                    node: a.node,
                    name: a.name,
                },
            )?;
            show(a.json, &v, |v| {
                println!("node renamed to {}", v["name"].as_str().unwrap_or(""))
            })
        }
        AuthorityCommand::RotateKey(a) => rotate_key(a),
        AuthorityCommand::Policy(c) => policy(c),
    }
}

fn policy(cmd: PolicyCommand) -> Result<()> {
    use base64::Engine;
    let (dir, op, json) = match cmd {
        PolicyCommand::Set(a) => {
            // Checked here first, so the error names the file and the rule.
            let policy = super::roster::load_policy(&a.file)?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(policy.encode());
            (a.d.dir, AdminOp::PolicySet { policy: encoded }, a.json)
        }
        PolicyCommand::Show(a) => (a.d.dir, AdminOp::PolicyShow, a.json),
        PolicyCommand::Clear(a) => (a.d.dir, AdminOp::PolicyClear, a.json),
    };
    let v = admin::request(&dir, &op)?;
    show(json, &v, print_policy)
}

/// `serial N: K rules`, then one line per rule:
/// `name  allow  groups=web -> groups=db  tcp 5432,8000-8080`.
fn print_policy(v: &Value) {
    let rules = v["policy"]["rules"].as_array();
    match rules {
        None => println!(
            "roster serial {}: no firewall policy (everything passes)",
            v["serial"]
        ),
        Some(rules) => {
            println!("roster serial {}: {} rules", v["serial"], rules.len());
            for r in rules {
                println!(
                    "{:<24} {:<5}  {} -> {}  {}",
                    r["name"].as_str().unwrap_or(""),
                    r["action"].as_str().unwrap_or("").to_lowercase(),
                    selector_text(&r["from"]),
                    selector_text(&r["to"]),
                    proto_text(r),
                );
            }
        }
    }
}

fn selector_text(s: &Value) -> String {
    if s["any"] == Value::Bool(true) {
        return "any".into();
    }
    let list = |key: &str| -> Vec<String> {
        s[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect()
    };
    let mut parts = Vec::new();
    for key in ["groups", "names", "cidrs"] {
        let items = list(key);
        if !items.is_empty() {
            parts.push(format!("{key}={}", items.join("+")));
        }
    }
    for (k, val) in s["attributes"].as_object().into_iter().flatten() {
        parts.push(format!("{k}={}", val.as_str().unwrap_or("")));
    }
    parts.join(",")
}

fn proto_text(r: &Value) -> String {
    let proto = r["proto"].as_str().unwrap_or("").to_lowercase();
    let ports: Vec<String> = r["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            if p["first"] == p["last"] {
                p["first"].to_string()
            } else {
                format!("{}-{}", p["first"], p["last"])
            }
        })
        .collect();
    if ports.is_empty() {
        proto
    } else {
        format!("{proto} {}", ports.join(","))
    }
}

fn show(json: bool, v: &Value, text: impl FnOnce(&Value)) -> Result<()> {
    if json {
        print_json(v)
    } else {
        text(v);
        Ok(())
    }
}

fn init(a: InitArgs) -> Result<()> {
    let dir = &a.d.dir;
    if dir.join(CONFIG_FILE).exists() || dir.join(STORE_FILE).exists() {
        bail!("{} already holds an authority", dir.display());
    }
    let now = time::unix_now();
    let (root_key, ca) = match (&a.network, &a.ca_dir) {
        (Some(network), None) => {
            let key = CaSigningKey::generate()?;
            let ca = CaCert::create(
                &key,
                &format!("{network}-root"),
                network,
                now - 60,
                now + 10 * 365 * 86_400,
            )?;
            (key, ca)
        }
        (None, Some(ca_dir)) => load_ca(ca_dir)?,
        _ => bail!("give --network (a new network) or --ca-dir (an existing CA)"),
    };
    // The offline copy is the caller's; the directory, when it exists and
    // belongs to the authority's user, is written as that user.
    if let Some(p) = &a.root_key_out {
        files::write_secret(p, &root_key.to_text())?;
    }
    act_as_owner(dir)?;
    create_private_dir(dir)?;
    files::write_document(&dir.join(CA_CERT), &ca.to_text())?;
    if a.root_key_out.is_none() {
        files::write_secret(&dir.join(ROOT_KEY), &root_key.to_text())?;
    }
    let lifetime = time::parse_duration("--authority-lifetime", &a.authority_lifetime)?.as_secs();
    let signing = certify(&ca, &root_key, now, lifetime)?;
    keys::save(dir, &signing)?;
    let noise = NoisePrivateKey::generate()?;
    files::write_secret(&dir.join(NOISE_KEY), &noise.to_text())?;
    let endpoints = if a.endpoints.is_empty() {
        if a.listen.ip().is_unspecified() {
            bail!(
                "--listen {} is not an address nodes can reach: give --endpoint",
                a.listen
            );
        }
        vec![a.listen]
    } else {
        a.endpoints
    };
    let pool_v6 = (a.pool_v6 != "none").then(|| a.pool_v6.clone());
    let config = FileConfig {
        listen: a.listen,
        endpoints: endpoints.clone(),
        pool_v4: a.pool_v4.to_string(),
        pool_v6,
        cert_lifetime: a.cert_lifetime,
        roster_lifetime: default_roster_lifetime(),
        authority_lifetime: a.authority_lifetime,
        max_connections_per_source: default_per_source(),
    };
    let params = config.params()?;
    files::write_document(&dir.join(CONFIG_FILE), &toml::to_string(&config)?)?;
    let authority = open(dir, &ca, Some(root_key), params, now)?;
    let v = json!({
        "dir": dir,
        "network": ca.body().network_id,
        "ca_fingerprint": ca.fingerprint().to_hex(),
        "authority_key": noise.public_key().to_base64(),
        "signing_key": authority.signer().fingerprint().to_hex(),
        "endpoints": endpoints,
        "root_key": a.root_key_out.unwrap_or_else(|| dir.join(ROOT_KEY)),
    });
    show(a.json, &v, |v| {
        println!(
            "authority for network {} set up in {} (CA {}); start it with `keyd authority run --dir {}`",
            v["network"].as_str().unwrap_or(""),
            dir.display(),
            v["ca_fingerprint"].as_str().unwrap_or(""),
            dir.display()
        );
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))
}

fn read_root_key(path: &Path) -> Result<CaSigningKey> {
    CaSigningKey::from_text(&files::read_secret(path)?)
        .with_context(|| format!("{}", path.display()))
}

/// Root writing into a state directory that belongs to the authority's user
/// (the package's, handed over by StateDirectory=) writes as that user:
/// systemd re-owns the directory's contents only when the directory itself
/// changed hands, so a root-owned key there would stop the authority for
/// good (`files::read_secret` refuses a key that is not its own).
fn act_as_owner(dir: &Path) -> Result<()> {
    if let Acting::Owner { uid, gid } = owner::act_as_owner_of(dir)? {
        eprintln!(
            "keyd authority: acting as uid {uid} gid {gid}, the owner of {}",
            dir.display()
        );
    }
    Ok(())
}

fn certify(ca: &CaCert, root: &CaSigningKey, now: u64, lifetime: u64) -> Result<SigningKey> {
    Ok(keys::certify(ca, root, now, lifetime)?)
}

fn open(
    dir: &Path,
    ca: &CaCert,
    root: Option<CaSigningKey>,
    params: Params,
    now: u64,
) -> Result<Authority> {
    let store = RedbStore::open(&dir.join(STORE_FILE))?;
    let signing = keys::load_all(dir, ca)?;
    let noise = NoisePrivateKey::from_text(&files::read_secret(&dir.join(NOISE_KEY))?)?;
    Ok(Authority::open(
        Box::new(store),
        Box::new(keys::DirKeyFiles {
            dir: dir.to_path_buf(),
        }),
        ca.clone(),
        root,
        signing,
        noise.public_key(),
        params,
        now,
    )?)
}

fn run_authority(dir: &Path, log_format: crate::logging::LogFormat) -> Result<()> {
    let config = FileConfig::load(dir)?;
    let params = config.params()?;
    let ca = super::load_ca_cert(&dir.join(CA_CERT))?;
    let root_path = dir.join(ROOT_KEY);
    let root = if root_path.exists() {
        let key = CaSigningKey::from_text(&files::read_secret(&root_path)?)
            .with_context(|| format!("{}", root_path.display()))?;
        anyhow::ensure!(
            key.verifying_key() == ca.body().public_key,
            "{} is not the key of {}",
            root_path.display(),
            dir.join(CA_CERT).display()
        );
        Some(key)
    } else {
        None
    };
    crate::logging::init(log_format);
    let authority = open(dir, &ca, root, params, time::unix_now())?;
    let noise = NoisePrivateKey::from_text(&files::read_secret(&dir.join(NOISE_KEY))?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            r = server::serve(authority, noise, ServeConfig {
                listen: config.listen,
                admin_socket: dir.join(admin::SOCKET),
                state_dir: dir.to_path_buf(),
                max_connections_per_source: config.max_connections_per_source,
            }) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

fn rotate_key(a: RotateArgs) -> Result<()> {
    let dir = &a.d.dir;
    // An offline root key is the caller's own file: read it as the caller.
    let offline = a.root_key.as_deref().map(read_root_key).transpose()?;
    act_as_owner(dir)?;
    let ca = super::load_ca_cert(&dir.join(CA_CERT))?;
    let root = match offline {
        Some(key) => key,
        None => read_root_key(&dir.join(ROOT_KEY))?,
    };
    let lifetime = time::parse_duration("--lifetime", &a.lifetime)?.as_secs();
    let signing = certify(&ca, &root, time::unix_now(), lifetime)?;
    keys::save(dir, &signing)?;
    let v = admin::request(
        dir,
        &AdminOp::AdoptKey {
            fingerprint: signing.cert.fingerprint().to_hex(),
        },
    )?;
    show(a.json, &v, |v| {
        println!(
            "signing key rolled over to {} (roster serial {})",
            v["signer"].as_str().unwrap_or(""),
            v["serial"]
        )
    })
}
