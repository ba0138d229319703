//! The WireGuard userspace API on `/var/run/wireguard/IFNAME.sock`.
//!
//! gotatun ships a UAPI handler, but it replaces a peer (and so its live
//! session) whenever a `set` touches it. The kernel and wireguard-go update a
//! peer in place: a new preshared key is used from the next handshake on, and
//! the session in flight keeps carrying traffic. keyd rotates keys every two
//! minutes and must not cost a packet, so this module serves the protocol
//! itself, with `mesh_proto::uapi` for the text and gotatun's public
//! `Device::write`/`modify_peer` (which calls `Tunn::set_preshared_key`) for
//! the changes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use gotatun::device::Peer;
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnetwork::IpNetwork;
use mesh_proto::prefix::IpPrefix;
use mesh_proto::uapi::{self, DeviceInfo, Key, PeerInfo, PeerSet, Request, SetRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, error, info, warn};

use crate::counters::Counters;
use gotatun::device::{Device, DeviceTransports};

pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// A request larger than this is refused: no real configuration comes close.
const MAX_REQUEST_BYTES: usize = 1 << 20;

pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// Binds the UAPI socket (0600: it hands out and takes private keys).
pub fn bind(ifname: &str) -> Result<UnixListener> {
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("cannot create {SOCKET_DIR}"))?;
    let path = socket_path(ifname);
    if path.exists() {
        // A live daemon would answer; a stale socket from a crash would not.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "{} is in use: is mesh-node already running on {ifname}?",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    bind_private(&path)
}

/// Binds a listener at `path` that is never reachable with a mode wider than
/// 0600. `bind` creates the socket with the umask's mode, so it is bound
/// inside a fresh 0700 directory beside `path` (where no other user can
/// reach it), set to 0600 there, and renamed into place, which moves the
/// same socket. Unlike setting the umask around `bind`, this changes
/// nothing for the other threads of the process.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut private = path.as_os_str().to_owned();
    private.push(format!(".{}.d", std::process::id()));
    let private = PathBuf::from(private);
    // Left over by a crashed run with the same pid; only root writes here.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let bound = private.join(name);
    let result = (|| {
        let listener = UnixListener::bind(&bound)
            .with_context(|| format!("cannot bind {}", bound.display()))?;
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", bound.display()))?;
        std::fs::rename(&bound, path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Accepts connections until the task is dropped.
pub async fn serve<T: DeviceTransports>(
    listener: UnixListener,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (device, counters) = (device.clone(), counters.clone());
                tokio::spawn(async move { handle_connection(stream, device, counters).await });
            }
            Err(e) => warn!("uapi: accept failed: {e}"),
        }
    }
}

/// One client connection: any number of requests, each ended by an empty line.
async fn handle_connection<T: DeviceTransports>(
    stream: UnixStream,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut request = String::new();
    loop {
        let before = request.len();
        match reader.read_line(&mut request).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!("uapi: read failed: {e}");
                return;
            }
        }
        if request.len() > MAX_REQUEST_BYTES {
            Counters::inc(&counters.uapi_malformed);
            warn!("uapi: request larger than {MAX_REQUEST_BYTES} bytes refused");
            let _ = w
                .write_all(uapi::format_errno(uapi::EPROTO).as_bytes())
                .await;
            return;
        }
        // A request ends with an empty line.
        if &request[before..] != "\n" {
            continue;
        }
        if request.trim().is_empty() {
            request.clear();
            continue;
        }
        Counters::inc(&counters.uapi_requests);
        let text = std::mem::take(&mut request);
        let work = respond(text, device.clone(), counters.clone());
        let response = guarded(work, &counters).await;
        if w.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Runs one request in a task of its own, so that a panic while serving it
/// (a bug here or in gotatun, whatever the input) is answered with EIO,
/// logged and counted like any failed request, and the daemon serves on.
/// Without this the connection closes unanswered: `wg` says "Protocol error".
async fn guarded(
    work: impl Future<Output = String> + Send + 'static,
    counters: &Counters,
) -> String {
    match tokio::spawn(work).await {
        Ok(response) => response,
        Err(e) => {
            Counters::inc(&counters.uapi_failed);
            let why = if e.is_panic() {
                let payload = e.into_panic();
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string())
            } else {
                "cancelled".to_string()
            };
            error!("uapi: request failed: {why}");
            uapi::format_errno(uapi::EIO)
        }
    }
}

/// A `set` that this data plane refuses although the protocol allows it.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// In the kernel and wireguard-go an all-zero private key removes the
    /// key. gotatun cannot unset one, and setting the zero key (clamped)
    /// would give the interface a private key everyone knows.
    #[error("an all-zero private key (remove the key) is not supported")]
    ZeroPrivateKey,
}

impl Refused {
    fn errno(&self) -> i32 {
        match self {
            Refused::ZeroPrivateKey => uapi::EINVAL,
        }
    }
}

async fn respond<T: DeviceTransports>(
    text: String,
    device: Arc<Device<T>>,
    counters: Arc<Counters>,
) -> String {
    match uapi::parse_request(&text) {
        Ok(Request::Get) => uapi::format_get_response(&get(&device).await),
        Ok(Request::Set(set)) => match apply(set, &device).await {
            Ok(()) => uapi::format_errno(0),
            Err(e) => {
                Counters::inc(&counters.uapi_failed);
                warn!("uapi: set failed: {e:#}");
                uapi::format_errno(errno_of(&e))
            }
        },
        Err(e) => {
            Counters::inc(&counters.uapi_malformed);
            warn!("uapi: refused request: {e}");
            uapi::format_errno(e.errno())
        }
    }
}

/// The errno wireguard-go would answer with for this failure.
fn errno_of(e: &anyhow::Error) -> i32 {
    if let Some(refused) = e.downcast_ref::<Refused>() {
        return refused.errno();
    }
    let in_use = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
            || c.to_string().contains("Address already in use")
    });
    if in_use { uapi::EADDRINUSE } else { uapi::EIO }
}

fn to_network(p: &IpPrefix) -> Option<IpNetwork> {
    IpNetwork::new(p.addr, p.len).ok()
}

fn to_prefix(n: &IpNetwork) -> IpPrefix {
    let (addr, len): (IpAddr, u8) = (n.ip(), n.prefix());
    IpPrefix { addr, len }
}

/// Applies a `set=1` the way the kernel does: existing peers are modified in
/// place, so their sessions survive a new preshared key or endpoint, and a
/// value equal to the current one changes nothing. (In gotatun, setting the
/// key, port or mark rebinds the UDP socket; `wg setconf` resends all three.)
async fn apply<T: DeviceTransports>(set: SetRequest, device: &Device<T>) -> Result<()> {
    let SetRequest {
        private_key,
        listen_port,
        fwmark,
        replace_peers,
        peers,
    } = set;
    if private_key.as_ref().is_some_and(Key::is_zero) {
        return Err(Refused::ZeroPrivateKey.into());
    }
    device
        .write(async |d| -> Result<()> {
            let current_key = d.private_key().map(|k| Key(k.to_bytes()));
            if let Some(key) = private_key.filter(|k| Some(k) != current_key.as_ref()) {
                d.set_private_key(StaticSecret::from(key.0)).await;
            }
            if let Some(port) = listen_port.filter(|p| *p != d.listen_port()) {
                d.set_listen_port(port);
            }
            if let Some(mark) = fwmark.filter(|m| *m != d.fwmark().unwrap_or(0)) {
                d.set_fwmark(mark).context("fwmark")?;
            }
            if replace_peers {
                // Not `clear_peers`: in gotatun that rebinds the UDP socket.
                // Unlisted peers go; listed ones are reset to exactly what
                // the request says, in place, keeping their sessions.
                for existing in d.peers().await {
                    let key = existing.peer.public_key;
                    if !peers.iter().any(|p| p.public_key.0 == *key.as_bytes()) {
                        d.remove_peer(&key).await;
                    }
                }
            }
            for p in peers {
                apply_peer(d, p, replace_peers).await;
            }
            Ok(())
        })
        .await
        .context("reconfiguring the device")?
}

/// `reset`: the request replaces all peers, so every attribute it does not
/// name returns to its default (no preshared key, no keepalive, no allowed IPs).
async fn apply_peer<T: DeviceTransports>(
    d: &mut gotatun::device::configure::DeviceWrite<'_, T>,
    p: PeerSet,
    reset: bool,
) {
    let public_key = PublicKey::from(p.public_key.0);
    if p.remove {
        d.remove_peer(&public_key).await;
        return;
    }
    let mut psk = p
        .preshared_key
        .as_ref()
        .map(|k| (!k.is_zero()).then_some(k.0));
    let mut keepalive = p
        .persistent_keepalive_interval
        .map(|k| (k != 0).then_some(k));
    if reset {
        psk = Some(psk.flatten());
        keepalive = Some(keepalive.flatten());
    }
    let allowed: Vec<IpNetwork> = p.allowed_ips.iter().filter_map(to_network).collect();
    let existed = d
        .modify_peer(&public_key, |m| {
            if let Some(psk) = psk {
                m.set_preshared_key(psk);
            }
            if let Some(e) = p.endpoint {
                m.set_endpoint(Some(e));
            }
            if let Some(k) = keepalive {
                m.set_keepalive(k);
            }
            if p.replace_allowed_ips || reset {
                m.clear_allowed_ips();
            }
            m.add_allowed_ips(allowed.clone());
        })
        .await;
    if existed || p.update_only {
        return;
    }
    let mut peer = Peer::new(public_key).with_allowed_ips(allowed);
    peer.endpoint = p.endpoint;
    peer.preshared_key = psk.flatten();
    peer.keepalive = keepalive.flatten();
    d.add_peer(peer);
    info!(
        "uapi: added peer {}",
        mesh_proto::armor::to_base64(&p.public_key.0)
    );
}

async fn get<T: DeviceTransports>(device: &Device<T>) -> DeviceInfo {
    device
        .read(async |d| {
            let now = SystemTime::now();
            let peers = d
                .peers()
                .await
                .into_iter()
                .map(|ps| PeerInfo {
                    public_key: Key(*ps.peer.public_key.as_bytes()),
                    preshared_key: ps.peer.preshared_key.map(Key),
                    endpoint: ps.peer.endpoint,
                    persistent_keepalive_interval: ps.peer.keepalive.unwrap_or(0),
                    allowed_ips: ps.peer.allowed_ips.iter().map(to_prefix).collect(),
                    rx_bytes: ps.stats.rx_bytes as u64,
                    tx_bytes: ps.stats.tx_bytes as u64,
                    last_handshake: ps.stats.last_handshake.and_then(|ago| {
                        let t = now
                            .checked_sub(ago)?
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .ok()?;
                        Some((t.as_secs(), t.subsec_nanos()))
                    }),
                })
                .collect();
            DeviceInfo {
                private_key: d.private_key().map(|k| Key(k.to_bytes())),
                listen_port: d.listen_port(),
                fwmark: d.fwmark(),
                peers,
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_socket_is_0600_and_answers_where_it_belongs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgtest.sock");
        let listener = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o600, "mode {mode:o}");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["wgtest.sock"], "the private folder is gone");
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop((client, server));
    }

    #[tokio::test]
    async fn a_request_that_panics_is_answered_eio_and_counted() {
        let counters = Counters::default();
        let response = guarded(async { panic!("a bug") }, &counters).await;
        assert_eq!(response, uapi::format_errno(uapi::EIO));
        assert_eq!(
            counters
                .uapi_failed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let fine = guarded(async { uapi::format_errno(0) }, &counters).await;
        assert_eq!(fine, uapi::format_errno(0));
    }

    #[test]
    fn a_zero_private_key_is_refused_with_einval() {
        let e = anyhow::Error::from(Refused::ZeroPrivateKey).context("applying");
        assert_eq!(errno_of(&e), uapi::EINVAL);
    }
}
