//! `keyd run --config FILE`: the daemon's configuration, TOML, validated on
//! load. Every error names the field (or the file) at fault. Reference:
//! docs/keyd-config.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_proto::trust::MAX_CLOCK_SKEW_LIMIT;
use serde::Deserialize;

use crate::edge::ladder::{LadderConfig, Rung};

/// The file as written: durations are text such as `120s` or `2m`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default = "default_wg_port")]
    wg_listen_port: u16,
    quic_listen: SocketAddr,
    ca_cert: PathBuf,
    cert: PathBuf,
    wg_key: PathBuf,
    noise_key: PathBuf,
    roster: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_socket_dir")]
    socket_dir: PathBuf,
    #[serde(default = "default_rotation")]
    rotation_interval: String,
    #[serde(default = "default_hard_lifetime")]
    hard_lifetime: String,
    #[serde(default = "default_skew")]
    max_clock_skew: String,
    persistent_keepalive: Option<u16>,
    #[serde(default)]
    accept_unlisted_sources: bool,
    /// Written by `keyd join`: where the roster comes from.
    authority: Option<RawAuthority>,
    #[serde(default)]
    edge: RawEdge,
    metrics: Option<RawMetrics>,
}

/// `[metrics]`: keyd's Prometheus endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// `IP:PORT` of `GET /metrics` (plain HTTP, unauthenticated).
    listen: SocketAddr,
}

/// `[edge]`: the fallback ladder (docs/edge.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    /// The rungs this node may use, best first.
    rungs: Option<Vec<Rung>>,
    /// Use only this rung.
    pin: Option<Rung>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthority {
    endpoints: Vec<SocketAddr>,
    public_key: String,
}

/// The authority this node subscribes to for roster updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityLink {
    pub endpoints: Vec<SocketAddr>,
    /// Its Noise static key: the channel is pinned to it.
    pub public_key: mesh_proto::identity::NoisePublicKey,
}

fn default_wg_port() -> u16 {
    51820
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/pqmesh")
}
fn default_socket_dir() -> PathBuf {
    PathBuf::from(mesh_proto::firewall::document::DEFAULT_SOCKET_DIR)
}
fn default_rotation() -> String {
    "120s".into()
}
fn default_hard_lifetime() -> String {
    "180s".into()
}
fn default_skew() -> String {
    "300s".into()
}

fn authority(raw: RawAuthority) -> Result<AuthorityLink> {
    if raw.endpoints.is_empty() {
        bail!("`authority.endpoints`: name at least one address");
    }
    let public_key = mesh_proto::identity::NoisePublicKey::from_base64(&raw.public_key)
        .map_err(|e| anyhow::anyhow!("`authority.public_key`: {e}"))?;
    Ok(AuthorityLink {
        endpoints: raw.endpoints,
        public_key,
    })
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The WireGuard interface whose userspace API keyd drives.
    pub interface: String,
    /// UDP port of the local WireGuard data plane.
    pub wg_listen_port: u16,
    /// Where keyd accepts QUIC connections from peer keyds.
    pub quic_listen: SocketAddr,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub wg_key: PathBuf,
    pub noise_key: PathBuf,
    pub roster: PathBuf,
    /// Highest roster serial and key epochs survive restarts here.
    pub state_dir: PathBuf,
    /// Where the data plane's sockets are: `<interface>.sock` (the
    /// userspace API) and `<interface>.firewall` (mesh-node's `--socket-dir`).
    pub socket_dir: PathBuf,
    /// A fresh hybrid exchange with every peer this often (jittered).
    pub rotation_interval: Duration,
    /// How long a key stays usable after its successor was due, when no
    /// fresh key can be agreed; then the peer is cut off (fail closed).
    pub hard_lifetime: Duration,
    pub max_clock_skew: Duration,
    pub persistent_keepalive: Option<u16>,
    /// Accept QUIC connections from addresses that are no member's keyd
    /// endpoint (members behind NAT). Off: such sources get no answer.
    pub accept_unlisted_sources: bool,
    /// Set by `keyd join`: keyd subscribes here for roster updates and
    /// writes each verified one to `roster`.
    pub authority: Option<AuthorityLink>,
    /// The fallback ladder: which rungs, or one pinned.
    pub edge: LadderConfig,
    /// Where `GET /metrics` is served (`[metrics] listen`); none: not served.
    pub metrics_listen: Option<SocketAddr>,
}

fn duration(field: &str, text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text)
        .with_context(|| format!("`{field}`: `{text}` is not a duration (try 120s, 2m or 1h)"))?;
    if d.is_zero() {
        bail!("`{field}` must be longer than zero");
    }
    Ok(d)
}

/// `max_clock_skew`, at most [`MAX_CLOCK_SKEW_LIMIT`]: the data plane's
/// certificate check allows no more (mesh-node `--ca-pin`).
fn clock_skew(text: &str) -> Result<Duration> {
    let d = duration("max_clock_skew", text)?;
    if d.as_secs() > MAX_CLOCK_SKEW_LIMIT {
        bail!(
            "`max_clock_skew` must be at most {}s (the data plane checks certificates with no more)",
            MAX_CLOCK_SKEW_LIMIT
        );
    }
    Ok(d)
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("config file {}", path.display()))
    }

    /// Parses TOML; relative paths are taken from `base` (the file's folder).
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if raw.interface.is_empty()
            || raw.interface.len() > 15
            || !raw.interface.chars().all(ok_char)
        {
            bail!(
                "`interface`: `{}` is not an interface name (1-15 of letters, digits, '-', '_', '.')",
                raw.interface
            );
        }
        if raw.persistent_keepalive == Some(0) {
            bail!("`persistent_keepalive` must be 1-65535 seconds, or left out to disable it");
        }
        // Another process's directory: never relative to this file.
        if !raw.socket_dir.is_absolute() {
            bail!(
                "`socket_dir`: `{}` is not an absolute path",
                raw.socket_dir.display()
            );
        }
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let config = Config {
            interface: raw.interface,
            wg_listen_port: raw.wg_listen_port,
            quic_listen: raw.quic_listen,
            ca_cert: resolve(raw.ca_cert),
            cert: resolve(raw.cert),
            wg_key: resolve(raw.wg_key),
            noise_key: resolve(raw.noise_key),
            roster: resolve(raw.roster),
            state_dir: resolve(raw.state_dir),
            socket_dir: raw.socket_dir,
            rotation_interval: duration("rotation_interval", &raw.rotation_interval)?,
            hard_lifetime: duration("hard_lifetime", &raw.hard_lifetime)?,
            max_clock_skew: clock_skew(&raw.max_clock_skew)?,
            persistent_keepalive: raw.persistent_keepalive,
            accept_unlisted_sources: raw.accept_unlisted_sources,
            authority: raw.authority.map(authority).transpose()?,
            edge: {
                let mut edge = LadderConfig::default();
                if let Some(rungs) = raw.edge.rungs {
                    edge.allowed = rungs;
                }
                edge.pin = raw.edge.pin;
                edge.validate()?;
                edge
            },
            metrics_listen: raw.metrics.map(|m| m.listen),
        };
        for (field, path) in [
            ("ca_cert", &config.ca_cert),
            ("cert", &config.cert),
            ("wg_key", &config.wg_key),
            ("noise_key", &config.noise_key),
            ("roster", &config.roster),
        ] {
            if !path.is_file() {
                bail!(
                    "`{field}`: {} does not exist or is not a file",
                    path.display()
                );
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.crt", "node.crt", "wg.key", "noise.key", "roster"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        dir
    }

    const MINIMAL: &str = r#"
interface = "pq0"
quic_listen = "192.0.2.1:51821"
ca_cert = "ca.crt"
cert = "node.crt"
wg_key = "wg.key"
noise_key = "noise.key"
roster = "roster"
"#;

    /// The data plane's certificate check allows no more skew than this
    /// (mesh-node --ca-pin): a keyd allowed more would take rosters at
    /// start that the data plane it needs refuses.
    #[test]
    fn a_clock_skew_above_an_hour_is_refused() {
        let dir = dir_with_files();
        let c = Config::parse(&format!("{MINIMAL}max_clock_skew = \"1h\"\n"), dir.path()).unwrap();
        assert_eq!(c.max_clock_skew, Duration::from_secs(3600));
        let err =
            Config::parse(&format!("{MINIMAL}max_clock_skew = \"61m\"\n"), dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("at most 3600s"), "{err:#}");
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let dir = dir_with_files();
        let c = Config::parse(MINIMAL, dir.path()).unwrap();
        assert_eq!(c.rotation_interval, Duration::from_secs(120));
        assert_eq!(c.hard_lifetime, Duration::from_secs(180));
        assert_eq!(c.max_clock_skew, Duration::from_secs(300));
        assert_eq!(c.wg_listen_port, 51820);
        assert_eq!(c.persistent_keepalive, None);
        assert_eq!(c.edge.allowed, Rung::ALL.to_vec());
        assert_eq!(c.edge.pin, None);
        assert_eq!(c.metrics_listen, None, "no metrics unless asked");
        assert_eq!(c.socket_dir, Path::new("/var/run/wireguard"));
        assert_eq!(
            c.cert,
            dir.path().join("node.crt"),
            "relative to the file's folder"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let dir = dir_with_files();
        let err = |text: String| format!("{:#}", Config::parse(&text, dir.path()).unwrap_err());
        let e = err(format!("{MINIMAL}rotation_interval = \"soon\"\n"));
        assert!(e.contains("rotation_interval") && e.contains("soon"), "{e}");
        let e = err(format!("{MINIMAL}hard_lifetime = \"0s\"\n"));
        assert!(e.contains("hard_lifetime"), "{e}");
        let e = err(format!("{MINIMAL}colour = \"blue\"\n"));
        assert!(e.contains("colour"), "{e}");
        let e = err(MINIMAL.replace("192.0.2.1:51821", "not-an-address"));
        assert!(e.contains("quic_listen"), "{e}");
        let e = err(MINIMAL.replace("\"pq0\"", "\"way-too-long-interface\""));
        assert!(e.contains("interface"), "{e}");
        let e = err(format!("{MINIMAL}persistent_keepalive = 0\n"));
        assert!(e.contains("persistent_keepalive"), "{e}");
        let e = err(MINIMAL.replace("roster = \"roster\"", "roster = \"missing\""));
        assert!(e.contains("`roster`") && e.contains("missing"), "{e}");
        let e = err(MINIMAL.replace("interface = \"pq0\"\n", ""));
        assert!(e.contains("interface"), "{e}");
        let e = err(format!(
            "{MINIMAL}[authority]\nendpoints = [\"192.0.2.9:51830\"]\npublic_key = \"nope\"\n"
        ));
        assert!(e.contains("authority.public_key"), "{e}");
        let e = err(format!(
            "{MINIMAL}[authority]\nendpoints = []\npublic_key = \"{}\"\n",
            mesh_proto::identity::NoisePublicKey([1; 32]).to_base64()
        ));
        assert!(e.contains("authority.endpoints"), "{e}");
        let e = err("this is not toml [".into());
        assert!(!e.is_empty());
        let e = err(format!(
            "{MINIMAL}[edge]\nrungs = [\"direct\", \"carrier-pigeon\"]\n"
        ));
        assert!(e.contains("carrier-pigeon"), "{e}");
        let e = err(format!(
            "{MINIMAL}[edge]\nrungs = [\"direct\", \"quic\"]\npin = \"tcp\"\n"
        ));
        assert!(e.contains("edge.pin"), "{e}");
        let e = err(format!("{MINIMAL}[edge]\nrungs = []\n"));
        assert!(e.contains("edge.rungs"), "{e}");
    }

    #[test]
    fn socket_dir() {
        let dir = dir_with_files();
        let c = Config::parse(
            &MINIMAL.replace("\nca_cert", "\nsocket_dir = \"/run/pqmesh\"\nca_cert"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.socket_dir, Path::new("/run/pqmesh"));
        let e = format!(
            "{:#}",
            Config::parse(
                &MINIMAL.replace("\nca_cert", "\nsocket_dir = \"run\"\nca_cert"),
                dir.path()
            )
            .unwrap_err()
        );
        assert!(e.contains("socket_dir") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn metrics_listen() {
        let dir = dir_with_files();
        let c = Config::parse(
            &format!("{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9587\"\n"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9587".parse().unwrap()));
        let err = |text: String| format!("{:#}", Config::parse(&text, dir.path()).unwrap_err());
        let e = err(format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n"));
        assert!(e.contains("metrics.listen") || e.contains("listen"), "{e}");
        let e = err(format!("{MINIMAL}[metrics]\n"));
        assert!(e.contains("listen"), "{e}");
        let e = err(format!(
            "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9587\"\npath = \"/x\"\n"
        ));
        assert!(e.contains("path"), "{e}");
    }

    #[test]
    fn edge_rungs_and_pin() {
        let dir = dir_with_files();
        let c = Config::parse(
            &format!("{MINIMAL}[edge]\nrungs = [\"direct\", \"tcp\"]\npin = \"tcp\"\n"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.edge.allowed, vec![Rung::Direct, Rung::Tcp]);
        assert_eq!(c.edge.pin, Some(Rung::Tcp));
    }

    #[test]
    fn missing_config_file_names_it() {
        let e = format!(
            "{:#}",
            Config::load(Path::new("/nonexistent/keyd.toml")).unwrap_err()
        );
        assert!(e.contains("/nonexistent/keyd.toml"), "{e}");
    }
}
