//! keyd's side of the WireGuard userspace API: pushes the interface key,
//! peers and preshared keys into whatever data plane serves
//! `/var/run/wireguard/IFNAME.sock` (mesh-node, wireguard-go, ...).
//!
//! keyd never needs CAP_NET_ADMIN: this socket is its only lever on the
//! data plane. Calls are short and synchronous with timeouts, so a hung data
//! plane is an error, never a hung keyd.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_proto::identity::{WgPrivateKey, WgPublicKey};
use mesh_proto::prefix::IpPrefix;
use mesh_proto::schedule::Psk;
use mesh_proto::uapi::{self, DeviceInfo, Key, PeerSet, SetRequest};
use zeroize::Zeroizing;

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A `get` answer larger than this is refused (thousands of peers fit).
const MAX_RESPONSE: usize = 16 << 20;

/// One peer as keyd wants it in the data plane.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub public_key: WgPublicKey,
    pub preshared_key: Psk,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    pub persistent_keepalive: Option<u16>,
}

/// One change to one peer.
#[derive(Debug, Clone)]
pub enum PeerChange {
    Upsert(PeerConfig),
    Remove(WgPublicKey),
}

/// A WireGuard data plane reached through its userspace API socket.
#[derive(Debug, Clone)]
pub struct DataPlane {
    socket: PathBuf,
}

impl DataPlane {
    /// The data plane serving `ifname` with its sockets in `dir`.
    pub fn for_interface(dir: &Path, ifname: &str) -> Self {
        Self::at(dir.join(format!("{ifname}.sock")))
    }

    pub fn at(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// One request and its answer. The answer to `get` holds the interface's
    /// private key and every preshared key, so it lives in a buffer that is
    /// wiped when dropped.
    fn exchange(&self, request: &str) -> Result<Zeroizing<String>> {
        let mut stream = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the WireGuard data plane at {}",
                self.socket.display()
            )
        })?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream
            .write_all(request.as_bytes())
            .with_context(|| format!("writing to {}", self.socket.display()))?;
        // The answer ends with `errno=N` and an empty line.
        let mut reader = BufReader::new(stream);
        // Sized so that a typical answer never reallocates (a reallocation
        // would free an unwiped copy).
        let mut response = Zeroizing::new(String::with_capacity(64 << 10));
        loop {
            let before = response.len();
            let n = reader
                .read_line(&mut response)
                .with_context(|| format!("reading from {}", self.socket.display()))?;
            if n == 0 {
                bail!("{} closed the connection mid-answer", self.socket.display());
            }
            if response.len() > MAX_RESPONSE {
                bail!(
                    "{} answered more than {MAX_RESPONSE} bytes",
                    self.socket.display()
                );
            }
            if &response[before..] == "\n"
                && response[..before]
                    .lines()
                    .last()
                    .is_some_and(|l| l.starts_with("errno="))
            {
                return Ok(response);
            }
        }
    }

    /// The data plane's current configuration and per-peer counters.
    pub fn get(&self) -> Result<DeviceInfo> {
        let text = self.exchange("get=1\n\n")?;
        match uapi::parse_get_response(&text).context("malformed get answer")? {
            Ok(info) => Ok(info),
            Err(errno) => bail!("data plane refused get (errno {errno})"),
        }
    }

    /// Applies a `set=1` request.
    pub fn set(&self, request: &SetRequest) -> Result<()> {
        let request = Zeroizing::new(uapi::format_set_request(request));
        let text = self.exchange(&request)?;
        match uapi::parse_get_response(&text).context("malformed set answer")? {
            Ok(_) => Ok(()),
            Err(errno) => bail!(
                "data plane refused the configuration (errno {errno}: {})",
                std::io::Error::from_raw_os_error(errno)
            ),
        }
    }

    /// Sets the interface's private key and UDP port.
    pub fn configure_interface(&self, key: &WgPrivateKey, listen_port: u16) -> Result<()> {
        self.set(&SetRequest {
            private_key: Some(Key(*key.0.as_bytes())),
            listen_port: Some(listen_port),
            ..Default::default()
        })
    }

    /// Adds the peer or updates it in place (its session survives a new
    /// preshared key; the next handshake uses it). Allowed IPs are replaced.
    pub fn upsert_peer(&self, peer: &PeerConfig) -> Result<()> {
        self.change_peers(&[PeerChange::Upsert(peer.clone())])
    }

    /// Cuts a peer off the data plane (fail closed).
    pub fn remove_peer(&self, public_key: &WgPublicKey) -> Result<()> {
        self.change_peers(&[PeerChange::Remove(*public_key)])
    }

    /// Several peer changes in one `set` (one round trip, applied in order).
    pub fn change_peers(&self, changes: &[PeerChange]) -> Result<()> {
        let peers = changes
            .iter()
            .map(|c| match c {
                PeerChange::Upsert(peer) => {
                    let mut p = PeerSet::new(Key(peer.public_key.0));
                    p.preshared_key = Some(Key(*peer.preshared_key.as_bytes()));
                    p.endpoint = peer.endpoint;
                    p.persistent_keepalive_interval = Some(peer.persistent_keepalive.unwrap_or(0));
                    p.replace_allowed_ips = true;
                    p.allowed_ips = peer.allowed_ips.clone();
                    p
                }
                PeerChange::Remove(key) => {
                    let mut p = PeerSet::new(Key(key.0));
                    p.remove = true;
                    p
                }
            })
            .collect();
        self.set(&SetRequest {
            peers,
            ..Default::default()
        })
    }
}
