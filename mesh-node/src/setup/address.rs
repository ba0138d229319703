//! `--address-from-cert FILE`: the interface gets the overlay addresses
//! that the node's certificate carries (the authority assigned them at
//! `keyd join`) and is set up, before mesh-node reports itself ready. The
//! certificate is read before the interface exists, so a missing or broken
//! one stops mesh-node without leaving an interface behind.
//!
//! The signature is not checked here: the file is the one keyd verified
//! and writes, in a directory only root and keyd's user can write, and an
//! address only decides what this host routes into its own interface.

use std::path::{Path, PathBuf};

use mesh_proto::CertError;
use mesh_proto::cert::NodeCert;
use mesh_proto::prefix::IpPrefix;

use tracing::warn;

use super::netlink::Netlink;

/// The largest certificate file read (they are about 1 KB).
const MAX_CERT_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("--address-from-cert: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--address-from-cert: {path} is larger than {MAX_CERT_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("--address-from-cert: {path} is not a node certificate: {source}")]
    NotACert { path: PathBuf, source: CertError },
    #[error("--address-from-cert: the certificate in {path} carries no address")]
    NoAddress { path: PathBuf },
    #[error("interface {ifname} not found: {source}")]
    NoInterface {
        ifname: String,
        source: std::io::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Netlink(std::io::Error),
    #[error("cannot add {prefix} to {ifname}: {source}")]
    Add {
        prefix: IpPrefix,
        ifname: String,
        source: std::io::Error,
    },
    #[error("cannot set {ifname} up: {source}")]
    Up {
        ifname: String,
        source: std::io::Error,
    },
}

/// The overlay addresses in the node certificate at `path`.
pub fn from_cert(path: &Path) -> Result<Vec<IpPrefix>, AddressError> {
    use std::io::Read;
    let read = |source| AddressError::Read {
        path: path.into(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_CERT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CERT_BYTES {
        return Err(AddressError::TooLarge { path: path.into() });
    }
    let cert = NodeCert::from_text(&text).map_err(|source| AddressError::NotACert {
        path: path.into(),
        source,
    })?;
    let addresses = cert.body().addresses.clone();
    if addresses.is_empty() {
        return Err(AddressError::NoAddress { path: path.into() });
    }
    Ok(addresses)
}

/// Adds `addresses` to `ifname` and sets it up. Where IPv6 is turned off
/// (the interface's disable_ipv6, common in cloud images, or a kernel
/// without IPv6) the IPv6 addresses are left out with one warning: the
/// node still works over IPv4, where a failed start would restart in a
/// loop and carry nothing.
pub fn apply(ifname: &str, addresses: &[IpPrefix]) -> Result<(), AddressError> {
    let index = interface_index(ifname)?;
    let mut nl = Netlink::open().map_err(AddressError::Netlink)?;
    let mut left_out = Vec::new();
    for prefix in addresses {
        match nl.add_address(index, prefix) {
            Ok(()) => {}
            Err(e) if prefix.addr.is_ipv6() && ipv6_disabled(ifname, &e) => left_out.push(*prefix),
            Err(source) => {
                return Err(AddressError::Add {
                    prefix: *prefix,
                    ifname: ifname.into(),
                    source,
                });
            }
        }
    }
    if !left_out.is_empty() {
        let list: Vec<String> = left_out.iter().map(ToString::to_string).collect();
        warn!(
            "IPv6 is disabled on {ifname} (net.ipv6.conf.{ifname}.disable_ipv6 or the kernel): \
             its certificate's {} left out, only IPv4 is carried; enable IPv6 and restart \
             mesh-node to use it",
            list.join(", ")
        );
    }
    nl.set_up(index).map_err(|source| AddressError::Up {
        ifname: ifname.into(),
        source,
    })
}

/// Whether a failed IPv6 address is IPv6 being off rather than a fault:
/// the kernel answers EACCES where the interface's disable_ipv6 is set and
/// EAFNOSUPPORT where it has no IPv6 at all.
fn ipv6_disabled(ifname: &str, e: &std::io::Error) -> bool {
    let sysctl =
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")).ok();
    disabled_by(e.raw_os_error(), sysctl.as_deref())
}

/// The decision of [`ipv6_disabled`]: `sysctl` is the interface's
/// disable_ipv6 where /proc/sys can be read. The packaged unit's
/// `ProcSubset=pid` hides /proc/sys; there EACCES alone decides (we hold
/// CAP_NET_ADMIN on an interface we just created: an IPv6 address is
/// refused with EACCES only because IPv6 is disabled on it).
fn disabled_by(errno: Option<i32>, sysctl: Option<&str>) -> bool {
    match errno {
        Some(libc::EAFNOSUPPORT) => true,
        Some(libc::EACCES) => sysctl.is_none_or(|v| v.trim() == "1"),
        _ => false,
    }
}

fn interface_index(ifname: &str) -> Result<u32, AddressError> {
    let missing = |source| AddressError::NoInterface {
        ifname: ifname.into(),
        source,
    };
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| missing(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: name is a valid C string for the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(missing(std::io::Error::last_os_error())),
        index => Ok(index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The review's finding: under the unit's ProcSubset=pid /proc/sys is
    /// not there, and EACCES was taken for a fault (the node restarted in a
    /// loop where IPv6 is disabled).
    #[test]
    fn ipv6_is_off_on_eacces_also_where_proc_sys_is_hidden() {
        assert!(disabled_by(Some(libc::EACCES), None));
        assert!(disabled_by(Some(libc::EACCES), Some("1\n")));
        assert!(!disabled_by(Some(libc::EACCES), Some("0\n")));
        assert!(disabled_by(Some(libc::EAFNOSUPPORT), Some("0\n")));
        assert!(!disabled_by(Some(libc::EPERM), None));
        assert!(!disabled_by(None, None));
    }

    #[test]
    fn refusals_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("node.crt");
        assert!(matches!(
            from_cert(&missing),
            Err(AddressError::Read { .. })
        ));
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = from_cert(&junk).unwrap_err();
        assert!(matches!(err, AddressError::NotACert { .. }));
        assert!(err.to_string().contains("junk.crt"), "{err}");
        let big = dir.path().join("big.crt");
        std::fs::write(&big, vec![b'a'; MAX_CERT_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            from_cert(&big),
            Err(AddressError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_certificate_s_addresses_are_read() {
        use mesh_proto::cert::{CaCert, NodeCertRequest};
        use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
        let ca_key = CaSigningKey::generate().unwrap();
        let ca = CaCert::create(&ca_key, "ca", "net", 0, u64::MAX / 2).unwrap();
        let addresses: Vec<IpPrefix> = vec![
            "10.77.0.5/16".parse().unwrap(),
            "fd77::5/64".parse().unwrap(),
        ];
        let cert = ca
            .issue(
                &ca_key,
                NodeCertRequest {
                    name: "web-1".into(),
                    addresses: addresses.clone(),
                    groups: vec![],
                    attributes: Default::default(),
                    not_before: 0,
                    not_after: u64::MAX / 4,
                    wg_public: WgPrivateKey::generate().unwrap().public_key(),
                    noise_public: NoisePrivateKey::generate().unwrap().public_key(),
                },
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.crt");
        std::fs::write(&path, cert.to_text()).unwrap();
        assert_eq!(from_cert(&path).unwrap(), addresses);
    }

    #[test]
    fn a_missing_interface_is_named() {
        let err = apply("pqm-nonexist0", &[]).unwrap_err();
        assert!(err.to_string().contains("pqm-nonexist0"), "{err}");
    }
}
