//! An IP address with a prefix length, as in `10.99.0.1/24` or `fd99::1/64`:
//! a node's overlay address and the subnet it lives in.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is longer than {max}"));
        }
        Ok(Self { addr, len })
    }

    /// The single-host route for this address (`/32` or `/128`): what a peer's
    /// allowed IPs should be, so that it can only speak for its own address.
    pub fn host(&self) -> Self {
        let len = if self.addr.is_ipv4() { 32 } else { 128 };
        Self {
            addr: self.addr,
            len,
        }
    }

    /// Checks a decoded value (serde bypasses [`IpPrefix::new`]).
    pub fn validate(&self) -> Result<(), String> {
        Self::new(self.addr, self.len).map(|_| ())
    }
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDRESS/PREFIX (for example 10.99.0.1/24)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("`{len}` is not a prefix length"))?;
        Self::new(addr, len)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let p: IpPrefix = "10.99.0.1/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.99.0.1/24");
        assert_eq!(p.host().to_string(), "10.99.0.1/32");
        let p: IpPrefix = "fd99::1/64".parse().unwrap();
        assert_eq!(p.host().to_string(), "fd99::1/128");
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd::1/129",
            "x/1",
            "10.0.0.1/a",
            "",
        ] {
            assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
        }
    }
}
