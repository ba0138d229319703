//! Builds the WireGuard device: gotatun's `Device` on a TUN interface with
//! its UDP transport. Configuration arrives later through the UAPI.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gotatun::device::{Device, DeviceBuilder};
use gotatun::tun::tun_async_device::TunDevice;

use crate::firewall::Firewall;
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

/// Crypto threads when `mesh-node up` is not told (`--crypto-threads`):
/// none on 2 CPUs or fewer, where a second thread only competes with the
/// data path and the kernel for the same cores; else one per CPU beside the
/// data path's, at most 4. On a 16-vCPU host (docs/performance.md) one TCP
/// stream gained nothing past 2-4 threads and lost at 16: the data-path
/// thread, not the crypto, is the limit there, and idle workers spinning
/// for work only take CPU from it and the kernel.
pub fn default_crypto_threads(cpus: usize) -> usize {
    if cpus <= 2 { 0 } else { (cpus - 1).min(4) }
}

/// The CPUs this process may use (affinity and cgroup quota aware); 1 if
/// unknown.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The device on gotatun's default transports (the reference in benchmarks).
pub async fn build_default(
    ifname: &str,
    crypto_threads: usize,
) -> Result<Device<DefaultTransports>> {
    DeviceBuilder::new()
        .with_default_udp()
        .create_tun(ifname)
        .with_context(|| tun_context(ifname))?
        .crypto_threads(crypto_threads)
        .build()
        .await
        .with_context(|| format!("cannot start the WireGuard device on {ifname}"))
}

/// A thread per direction when `mesh-node up` is not told
/// (`--data-path-threads`): only above 4 CPUs. On 2 vCPUs one thread for
/// both was measured faster (docs/performance.md, "Threads").
pub fn default_split_directions(cpus: usize) -> bool {
    cpus > 4
}

/// UDP socket buffers for bursts of 64 KB super-packets: the kernel default
/// (~208 KB) overflows and drops (capped by net.core.{r,w}mem_max).
const UDP_BUFFER: usize = 4 << 20;

/// The device on our transports, its data path on a thread of its own that
/// busy-polls for `busy_poll` after a burst (zero: never), with
/// `crypto_threads` helping it seal and open large batches (zero: none),
/// its traffic filtered by `firewall`.
pub async fn build_offload(
    ifname: &str,
    firewall: Arc<Firewall>,
    busy_poll: Duration,
    crypto_threads: usize,
    split_directions: bool,
) -> Result<Device<OffloadTransports>> {
    let (tx, rx) = transports::tun::open(ifname, firewall).with_context(|| tun_context(ifname))?;
    DeviceBuilder::new()
        .with_udp(transports::udp::GsoUdpFactory {
            buffer_size: UDP_BUFFER,
        })
        .with_ip_pair(tx, rx)
        .data_path_thread(true)
        .busy_poll(busy_poll)
        .crypto_threads(crypto_threads)
        .split_directions(split_directions)
        .build()
        .await
        .with_context(|| format!("cannot start the WireGuard device on {ifname}"))
}

#[cfg(test)]
mod tests {
    use super::{default_crypto_threads, default_split_directions};

    #[test]
    fn a_thread_per_direction_only_above_four_cpus() {
        assert!(!default_split_directions(2));
        assert!(!default_split_directions(4));
        assert!(default_split_directions(8));
    }

    #[test]
    fn two_cpus_or_fewer_get_no_crypto_threads_and_more_get_one_per_other_cpu() {
        assert_eq!(default_crypto_threads(1), 0);
        assert_eq!(default_crypto_threads(2), 0, "the 2-core path stays inline");
        assert_eq!(default_crypto_threads(3), 2);
        assert_eq!(default_crypto_threads(16), 4);
        assert_eq!(default_crypto_threads(64), 4);
    }
}
