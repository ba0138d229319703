//! Builds the WireGuard device: gotatun's `Device` on a TUN interface with
//! its UDP transport. Configuration arrives later through the UAPI.

use anyhow::{Context, Result};
use gotatun::device::{Device, DeviceBuilder};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::udp::socket::UdpSocketFactory;

pub type Transports = (UdpSocketFactory, TunDevice, TunDevice);
pub type WgDevice = Device<Transports>;

/// Creates the TUN interface `ifname` and the device around it. The device
/// opens its UDP socket once it has a private key (`wg set IF private-key`).
pub async fn build(ifname: &str) -> Result<WgDevice> {
    DeviceBuilder::new()
        .with_default_udp()
        .create_tun(ifname)
        .with_context(|| {
            format!("cannot create TUN interface {ifname} (need CAP_NET_ADMIN and /dev/net/tun)")
        })?
        .build()
        .await
        .with_context(|| format!("cannot start the WireGuard device on {ifname}"))
}
