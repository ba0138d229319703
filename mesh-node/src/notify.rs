//! systemd readiness (`Type=notify`): READY=1 once the interface exists, its
//! sockets answer and its addresses are set, so that units ordered after
//! mesh-node (keyd) start against a data plane that is really there.

use tracing::warn;

/// Tells the service manager that start-up is complete. Outside systemd
/// (no `NOTIFY_SOCKET`) it does nothing.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        // The service manager will time the start out and say so; the
        // daemon itself works.
        warn!("cannot notify the service manager of readiness: {e}");
    }
}
