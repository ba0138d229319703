//! The authority's operator socket: `keyd authority token|node|status`
//! talk to the running authority here, one JSON request and one JSON answer
//! per connection. The socket is 0600 in the 0700 state directory: only its
//! owner (the authority's user) and root may use it. Requests are bounded in
//! size and time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::server::{AdminHandle, AdminOp};

pub const SOCKET: &str = "admin.sock";
/// A firewall policy of the largest size (64 KiB encoded) in base64, with room.
const MAX_REQUEST: u64 = 256 * 1024;
const DEADLINE: Duration = Duration::from_secs(10);

/// Why the operator socket could not be bound: the authority stops, since
/// without it nobody can create tokens or revoke nodes.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("operator socket {path}: exists and is not a socket; remove it")]
    NotASocket { path: PathBuf },
    #[error("operator socket {path}: cannot remove the old socket: {source}")]
    RemoveOld {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operator socket {path}: cannot bind: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operator socket {path}: cannot make it 0600: {source}")]
    Mode {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket (so that it answers once this returns), then serves it
/// on a task until the process ends.
pub fn listen(path: PathBuf, handle: AdminHandle) -> Result<(), BindError> {
    let listener = bind(&path)?;
    tokio::spawn(accept(listener, handle));
    Ok(())
}

async fn accept(listener: UnixListener, handle: AdminHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DEADLINE, serve(stream, handle)).await;
        });
    }
}

fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    // A socket left by a previous run is replaced; anything else is not.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(BindError::NotASocket { path: path.into() });
        }
        std::fs::remove_file(path).map_err(|source| BindError::RemoveOld {
            path: path.into(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        BindError::Mode {
            path: path.into(),
            source,
        }
    })?;
    Ok(listener)
}

async fn serve(stream: UnixStream, handle: AdminHandle) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<AdminOp>(&line) {
        Ok(op) => match handle(op).await {
            Ok(Ok(v)) => json!({"ok": true, "result": v}),
            Ok(Err(e)) => json!({"ok": false, "error": e}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Err(e) => json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    // A token-create answer holds the token's secret.
    let mut out = zeroize::Zeroizing::new(serde_json::to_vec(&answer)?);
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// The operator's side: sends `op` to the authority whose state directory
/// is `dir` and returns its result.
pub fn request(dir: &Path, op: &AdminOp) -> Result<Value> {
    use std::io::{BufRead, Read, Write};
    let path = dir.join(SOCKET);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the authority at {} (is `keyd authority run` running with this --dir?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut req = serde_json::to_vec(op)?;
    req.push(b'\n');
    stream.write_all(&req)?;
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::BufReader::new(stream.take(64 * 1024 * 1024)).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the authority's answer is not JSON")?;
    if v["ok"] == Value::Bool(true) {
        Ok(v["result"].clone())
    } else {
        Err(anyhow!(
            "{}",
            v["error"].as_str().unwrap_or("the authority refused")
        ))
    }
}
