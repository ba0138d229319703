//! The authority's operator socket: `keyd authority token|node|status`
//! talk to the running authority here, one JSON request and one JSON answer
//! per connection. The socket is 0600 in the 0700 state directory: only its
//! owner (root) may use it. Requests are bounded in size and time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use super::server::{AdminHandle, AdminOp};

pub const SOCKET: &str = "admin.sock";
/// A firewall policy of the largest size (64 KiB encoded) in base64, with room.
const MAX_REQUEST: u64 = 256 * 1024;
const DEADLINE: Duration = Duration::from_secs(10);

/// Binds the socket (so that it answers once this returns), then serves it
/// on a task until the process ends.
pub fn listen(path: PathBuf, handle: AdminHandle) {
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!("admin socket {}: {e:#}", path.display());
            return;
        }
    };
    tokio::spawn(accept(listener, handle));
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

fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // A socket left by a previous run is replaced; anything else is not.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            bail!("exists and is not a socket");
        }
        std::fs::remove_file(path).context("removing the old socket")?;
    }
    let listener = UnixListener::bind(path).context("binding")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context("setting mode 0600")?;
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
