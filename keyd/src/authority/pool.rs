//! Overlay address pools: the n-th address handed out in a prefix.
//!
//! Offsets only grow (the store refuses a batch that lowers them), so an
//! address is never handed out twice, not even after its node is revoked:
//! a firewall rule or a peer's cache that still names it can never come to
//! mean another machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mesh_proto::prefix::IpPrefix;

/// The address at `offset` in `pool`, skipping the network address (and, in
/// IPv4, leaving out the broadcast address); `None` once the pool is used up.
pub fn address_at(pool: &IpPrefix, offset: u64) -> Option<IpPrefix> {
    let index = offset.checked_add(1)?;
    let addr = match pool.addr {
        IpAddr::V4(base) => {
            let host_bits = 32 - u32::from(pool.len);
            let size = 1u64 << host_bits;
            // The last address is the broadcast address.
            if host_bits < 2 || index >= size - 1 {
                return None;
            }
            let network = u32::from(base) & !((size - 1) as u32);
            IpAddr::V4(Ipv4Addr::from(network + index as u32))
        }
        IpAddr::V6(base) => {
            let host_bits = 128 - u32::from(pool.len);
            let size = if host_bits >= 64 {
                u64::MAX
            } else {
                1u64 << host_bits
            };
            if host_bits < 2 || index >= size {
                return None;
            }
            let mask = if host_bits >= 128 {
                0
            } else {
                !((1u128 << host_bits) - 1)
            };
            let network = u128::from(base) & mask;
            IpAddr::V6(Ipv6Addr::from(network + u128::from(index)))
        }
    };
    IpPrefix::new(addr, pool.len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn hands_out_hosts_in_order_and_stops_at_the_end() {
        let pool = p("10.77.0.0/24");
        assert_eq!(address_at(&pool, 0), Some(p("10.77.0.1/24")));
        assert_eq!(address_at(&pool, 253), Some(p("10.77.0.254/24")));
        assert_eq!(address_at(&pool, 254), None, "broadcast");
        assert_eq!(address_at(&pool, u64::MAX), None);
        // A pool written with host bits set starts at its network address.
        assert_eq!(address_at(&p("10.77.0.9/30"), 0), Some(p("10.77.0.9/30")));
        assert_eq!(address_at(&p("10.77.0.8/30"), 0), Some(p("10.77.0.9/30")));
        assert_eq!(address_at(&p("10.77.0.8/30"), 1), Some(p("10.77.0.10/30")));
        assert_eq!(address_at(&p("10.77.0.8/30"), 2), None);
        assert_eq!(address_at(&p("10.77.0.8/31"), 0), None);
    }

    #[test]
    fn ipv6_pools() {
        let pool = p("fd77::/64");
        assert_eq!(address_at(&pool, 0), Some(p("fd77::1/64")));
        assert_eq!(address_at(&pool, 0xffff), Some(p("fd77::1:0/64")));
        assert_eq!(address_at(&p("fd77::/126"), 2), Some(p("fd77::3/126")));
        assert_eq!(address_at(&p("fd77::/126"), 3), None);
    }
}
