//! systemd readiness (`Type=notify`): READY=1 once the daemon really serves
//! (keyd: the data plane holds this node's key; the authority: its QUIC
//! endpoint and operator socket are bound).

use tracing::warn;

/// Tells the service manager that start-up is complete. Outside systemd
/// (no `NOTIFY_SOCKET`) it does nothing.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        // The service manager will time the start out and say so.
        warn!("cannot notify the service manager of readiness: {e}");
    }
}
