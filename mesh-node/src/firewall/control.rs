//! The firewall's control socket, `IFNAME.firewall` in the socket directory,
//! next to the UAPI socket: keyd writes one firewall document
//! ([`mesh_proto::firewall::document`], which defines the format for both
//! sides) and a newline per connection; we answer one line and close.
//! `mesh-node status` writes [`STATUS_REQUEST`] instead and gets the
//! firewall's [`FirewallStatus`] as one JSON line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_proto::firewall::document::{self, Answer, Document, MAX_DOCUMENT};
use mesh_proto::firewall::engine::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::{Firewall, FirewallStatus, InstallError, Ruleset};
pub use document::socket_path_in as socket_path;

/// How long the document may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the answer may take to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once (each holds up to [`MAX_DOCUMENT`] bytes);
/// more wait to be accepted.
const MAX_CONNECTIONS: usize = 4;

/// Binds the control socket, 0600: whoever writes to it decides what may
/// reach this node. A socket left by a crashed run is replaced.
pub fn bind(dir: &Path, ifname: &str) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = socket_path(dir, ifname);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "{} is in use: is mesh-node already running on {ifname}?",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    // As api::bind_private: bound in a fresh 0700 directory, set to 0600
    // there and renamed into place, so it is never reachable with the
    // umask's wider mode.
    let mut private = path.as_os_str().to_owned();
    private.push(format!(".{}.d", std::process::id()));
    let private = PathBuf::from(private);
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let bound = private.join("firewall");
    let result = (|| {
        let listener = UnixListener::bind(&bound)
            .with_context(|| format!("cannot bind {}", bound.display()))?;
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", bound.display()))?;
        std::fs::rename(&bound, &path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Accepts connections until the task is dropped, [`MAX_CONNECTIONS`] at a
/// time.
pub async fn serve(listener: UnixListener, firewall: Arc<Firewall>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let firewall = firewall.clone();
                tokio::spawn(async move {
                    handle(stream, &firewall).await;
                    drop(permit);
                });
            }
            Err(e) => warn!("firewall socket: accept failed: {e}"),
        }
    }
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum RefusalError {
    #[error("no document within {READ_TIMEOUT:?}")]
    Timeout,
    #[error("cannot read the document: {0}")]
    Read(std::io::Error),
    #[error("document longer than {MAX_DOCUMENT} bytes")]
    TooLarge,
    #[error("document not ended by a newline")]
    Unterminated,
    #[error(transparent)]
    Document(#[from] document::DocumentError),
    #[error(transparent)]
    Stale(#[from] InstallError),
    #[error("compiling the document failed")]
    Compile,
}

/// Parses and compiles a document (CPU-bound: run off the runtime).
pub fn compile(line: &[u8]) -> Result<Ruleset, document::DocumentError> {
    let doc = Document::parse(line)?;
    let engine = doc
        .policy
        .as_ref()
        .map(|policy| Engine::new(policy, &doc.local, &doc.peers));
    Ok(Ruleset {
        generation: doc.generation,
        engine,
        peers: doc.peers.len(),
    })
}

/// Reads the document: up to a newline, at most [`MAX_DOCUMENT`] bytes,
/// within [`READ_TIMEOUT`].
async fn read_document(stream: &mut UnixStream) -> Result<Vec<u8>, RefusalError> {
    let mut reader = BufReader::new(stream.take(MAX_DOCUMENT as u64 + 1));
    let mut buf = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut buf))
        .await
        .map_err(|_| RefusalError::Timeout)?
        .map_err(RefusalError::Read)?;
    if buf.len() > MAX_DOCUMENT {
        return Err(RefusalError::TooLarge);
    }
    if buf.pop() != Some(b'\n') {
        return Err(RefusalError::Unterminated);
    }
    Ok(buf)
}

/// The line that asks for the status instead of bringing a document (a
/// document is a JSON object, so the two cannot be confused).
pub const STATUS_REQUEST: &str = "status";

/// Serves one connection: one document, one answer (or the status).
async fn handle(mut stream: UnixStream, firewall: &Arc<Firewall>) {
    let read = read_document(&mut stream).await;
    if let Ok(line) = &read
        && line == STATUS_REQUEST.as_bytes()
    {
        let mut json = serde_json::to_string(&firewall.status()).unwrap_or_default();
        json.push('\n');
        let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(json.as_bytes())).await;
        return;
    }
    let result = match read {
        Ok(line) => apply(line, firewall).await,
        Err(e) => Err(e),
    };
    let answer = match result {
        Ok(answer) => answer,
        Err(e) => {
            firewall
                .documents_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The reason can quote the document (a field name, a rule
            // name): escaped and cut before it reaches the log.
            let why: String = e.to_string().chars().take(200).collect();
            warn!("firewall document refused: {}", why.escape_debug());
            match e {
                RefusalError::Stale(InstallError::Stale { in_force, .. }) => {
                    Answer::Stale { in_force }
                }
                e => Answer::Error(e.to_string()),
            }
        }
    };
    let line = answer.to_line();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

async fn apply(line: Vec<u8>, firewall: &Arc<Firewall>) -> Result<Answer, RefusalError> {
    // Compiling is CPU-bound (up to 1,000 rules over every peer): off the
    // runtime, which also serves the UAPI and WireGuard's timers.
    let ruleset = tokio::task::spawn_blocking(move || compile(&line))
        .await
        .map_err(|_| RefusalError::Compile)??;
    let (generation, rules, peers) = (ruleset.generation, ruleset.rules(), ruleset.peers);
    let filtering = ruleset.engine.is_some();
    firewall.install(ruleset)?;
    firewall
        .documents_applied
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if filtering {
        info!("firewall: generation {generation} in force, {rules} rules, {peers} peers");
    } else {
        info!("firewall: generation {generation} in force, no policy: nothing filtered");
    }
    Ok(Answer::Ok {
        generation,
        rules,
        peers,
    })
}

/// Why `mesh-node status` could not get the firewall's status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot connect to {path}: {source} (is mesh-node running on this interface, and may this user use its sockets?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot talk to {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} gave no status (an older mesh-node?): {answer}")]
    Unexpected { path: String, answer: String },
}

/// Asks the mesh-node serving `ifname` for its firewall's status.
pub fn query_status(dir: &Path, ifname: &str) -> Result<FirewallStatus, StatusError> {
    use std::io::{BufRead, Write};
    let path = socket_path(dir, ifname);
    let shown = path.display().to_string();
    let io = |source| StatusError::Io {
        path: shown.clone(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| StatusError::Connect {
            path: shown.clone(),
            source,
        })?;
    stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
    stream
        .write_all(format!("{STATUS_REQUEST}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(std::io::Read::take(&stream, 1 << 20))
        .read_line(&mut line)
        .map_err(io)?;
    serde_json::from_str(&line).map_err(|_| StatusError::Unexpected {
        path: shown.clone(),
        answer: line
            .trim_end()
            .chars()
            .take(200)
            .collect::<String>()
            .escape_debug()
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::firewall::engine::PeerInfo;
    use mesh_proto::firewall::policy::Policy;

    fn member(name: &str, addr: &str) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            addresses: vec![addr.parse().unwrap()],
            ..PeerInfo::default()
        }
    }

    #[test]
    fn a_document_compiles_with_or_without_a_policy() {
        let (local, peers) = (member("a", "10.77.0.1/32"), [member("b", "10.77.0.2/32")]);
        let line = Document::new(7, None, &local, &peers).to_line();
        let r = compile(line.trim_end().as_bytes()).unwrap();
        assert_eq!((r.generation, r.peers, r.rules()), (7, 1, 0));
        assert!(r.engine.is_none(), "no policy: nothing filtered");
        let line = Document::new(8, Some(&Policy::default()), &local, &peers).to_line();
        let r = compile(line.trim_end().as_bytes()).unwrap();
        assert!(
            r.engine.is_some(),
            "an empty policy filters (denies) everything"
        );
        assert!(compile(b"{\"generation\": 1}").is_err());
    }

    async fn read_from(bytes: &'static [u8]) -> Result<Vec<u8>, RefusalError> {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            let _ = theirs.write_all(bytes).await;
            // Keep our end open until the reader is done.
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink).await;
        });
        let result = read_document(&mut ours).await;
        drop(ours);
        let _ = writer.await;
        result
    }

    #[tokio::test]
    async fn reads_one_line_within_the_size_bound() {
        assert_eq!(read_from(b"{}\nmore").await.unwrap(), b"{}");
        let big: &'static [u8] = Box::leak(vec![b' '; MAX_DOCUMENT + 10].into_boxed_slice());
        assert!(matches!(read_from(big).await, Err(RefusalError::TooLarge)));
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(matches!(
            read_document(&mut ours).await,
            Err(RefusalError::Unterminated)
        ));
    }
}
