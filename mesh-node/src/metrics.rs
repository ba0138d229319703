//! Prometheus text on `--metrics-listen ADDR`, and a watcher that logs drops.
//!
//! A dropped packet is counted, never logged one by one (a peer could flood
//! the log); the watcher logs the increase every few seconds instead.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use gotatun::device::DeviceCounters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::counters::{Counters, PROBES};
use crate::firewall::Firewall;

pub fn render(counters: &Counters, device: &DeviceCounters, firewall: Option<&Firewall>) -> String {
    let mut s = counters.render();
    if let Some(firewall) = firewall {
        firewall.render_into(&mut s);
    }
    PROBES.render_into(&mut s);
    let name = "mesh_node_rx_dropped_source_not_allowed_total";
    let _ = writeln!(
        s,
        "# HELP {name} Decrypted packets dropped: inner source not in the peer's allowed IPs\n# TYPE {name} counter\n{name} {}",
        device.rx_source_not_allowed.load(Ordering::Relaxed)
    );
    s
}

/// Serves `GET /metrics` (any path) until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    counters: Arc<Counters>,
    device: Arc<DeviceCounters>,
    firewall: Option<Arc<Firewall>>,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let body = render(&counters, &device, firewall.as_deref());
            tokio::spawn(async move {
                // Read the request head (bounded); the answer does not depend on it.
                let mut buf = [0u8; 2048];
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = stream.write_all(response.as_bytes()).await {
                    debug!("metrics: write failed: {e}");
                }
            });
        }
    });
    Ok(())
}

/// Logs, at most every `period`, how many packets were dropped since the
/// last line, and how many path probes went unanswered over the rate limit.
pub async fn watch_drops(device: Arc<DeviceCounters>, period: Duration) {
    let mut last = 0;
    let mut last_limited = 0;
    loop {
        tokio::time::sleep(period).await;
        let limited = PROBES.rate_limited.load(Ordering::Relaxed);
        if limited > last_limited {
            warn!(
                "left {} path probes unanswered over the answer rate limit ({limited} in total)",
                limited - last_limited
            );
            last_limited = limited;
        }
        let now = device.rx_source_not_allowed.load(Ordering::Relaxed);
        if now > last {
            warn!(
                "dropped {} decrypted packets whose inner source is not in the sending peer's allowed IPs ({now} in total)",
                now - last
            );
            last = now;
        }
    }
}
