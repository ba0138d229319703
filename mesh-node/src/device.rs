//! Builds the WireGuard device: gotatun's `Device` on a TUN interface with
//! its UDP transport. Configuration arrives later through the UAPI.

use std::time::Duration;

use anyhow::{Context, Result};
use gotatun::device::{Device, DeviceBuilder};
use gotatun::tun::tun_async_device::TunDevice;

use crate::transports;

/// gotatun's own transports: plain TUN reads and writes, one packet each.
pub type DefaultTransports = (gotatun::udp::socket::UdpSocketFactory, TunDevice, TunDevice);
/// Ours: TUN with TSO/GRO and UDP with GSO.
pub type OffloadTransports = (
    transports::udp::GsoUdpFactory,
    transports::tun::TunSend,
    transports::tun::TunRecv,
);

fn tun_context(ifname: &str) -> String {
    format!("cannot create TUN interface {ifname} (need CAP_NET_ADMIN and /dev/net/tun)")
}

/// The device on gotatun's default transports (the reference in benchmarks).
pub async fn build_default(ifname: &str) -> Result<Device<DefaultTransports>> {
    DeviceBuilder::new()
        .with_default_udp()
        .create_tun(ifname)
        .with_context(|| tun_context(ifname))?
        .build()
        .await
        .with_context(|| format!("cannot start the WireGuard device on {ifname}"))
}

/// UDP socket buffers for bursts of 64 KB super-packets: the kernel default
/// (~208 KB) overflows and drops (capped by net.core.{r,w}mem_max).
const UDP_BUFFER: usize = 4 << 20;

/// The device on our transports, its data path on a thread of its own that
/// busy-polls for `busy_poll` after a burst (zero: never).
pub async fn build_offload(ifname: &str, busy_poll: Duration) -> Result<Device<OffloadTransports>> {
    let (tx, rx) = transports::tun::open(ifname).with_context(|| tun_context(ifname))?;
    DeviceBuilder::new()
        .with_udp(transports::udp::GsoUdpFactory {
            buffer_size: UDP_BUFFER,
        })
        .with_ip_pair(tx, rx)
        .data_path_thread(true)
        .busy_poll(busy_poll)
        .build()
        .await
        .with_context(|| format!("cannot start the WireGuard device on {ifname}"))
}
