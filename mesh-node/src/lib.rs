//! mesh-node: pqmesh's data plane. gotatun's WireGuard `Device` on a TUN
//! interface and a UDP socket, configured through the WireGuard userspace API
//! that this crate serves (so `wg` and keyd drive it like any WireGuard).

pub mod api;
pub mod counters;
pub mod device;
pub mod firewall;
pub mod metrics;
pub mod notify;
pub mod setup;
pub mod transports;
