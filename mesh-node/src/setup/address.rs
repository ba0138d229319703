//! `--address-from-cert FILE`: the interface gets the overlay addresses
//! that the node's certificate carries (the authority assigned them at
//! `keyd join`) and is set up, before mesh-node reports itself ready. The
//! certificate is read before the interface exists, so a missing or broken
//! one stops mesh-node without leaving an interface behind.
//!
//! With `--ca-pin PIN` the certificate must come from the network whose CA
//! root pinned at `keyd join` (PIN, root's): signed by that CA (`ca.crt`
//! beside the certificate, whose fingerprint must be the pinned one), or
//! vouched for by the roster beside it (`roster`, signed by the CA or an
//! authority valid now): its entry for this node (taken when newer, as
//! keyd does at start), or issued by an authority it lists that is valid
//! now (`vouched`). keyd's user writes that directory; without the pin a
//! compromised keyd could give the interface any address at the next start
//! (a prefix covering the host's networks, say) and draw host traffic into
//! the tunnel. With it, a forged certificate is refused; a stolen one of
//! another member only moves this node inside the overlay. The node
//! certificate's own validity times are not checked: an expired
//! certificate's addresses are still the ones the authority assigned, and
//! keyd renews it; refusing here would keep keyd, which needs the data
//! plane up, from starting to do so.

use std::path::{Path, PathBuf};

use mesh_proto::CertError;
use mesh_proto::cert::{CaCert, NodeCert};
use mesh_proto::prefix::IpPrefix;
use mesh_proto::roster::Roster;
use mesh_proto::signed::Fingerprint;

use tracing::warn;

use super::netlink::Netlink;

/// The largest certificate or pin file read (they are about 1 KB).
const MAX_CERT_BYTES: u64 = 64 * 1024;
/// The largest roster read (about 1 KB per member).
const MAX_ROSTER_BYTES: u64 = 64 * 1024 * 1024;
/// Clock skew allowed on an authority's validity: the most keyd may be
/// configured with, so that keyd, which can repair things, is the one to
/// refuse, never the data plane it needs to start.
const MAX_CLOCK_SKEW: u64 = mesh_proto::trust::MAX_CLOCK_SKEW_LIMIT;
/// What `keyd join` writes beside the node certificate.
const CA_FILE: &str = "ca.crt";
const ROSTER_FILE: &str = "roster";

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("--address-from-cert: {path} is not a node certificate: {source}")]
    NotACert { path: PathBuf, source: CertError },
    #[error("--address-from-cert: the certificate in {path} carries no address")]
    NoAddress { path: PathBuf },
    #[error("--ca-pin: cannot read {path}: {source} (`keyd join`, run as root, writes it)")]
    PinUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--ca-pin: {path} holds no CA fingerprint (64 hex digits; `keyd join` writes it as root)"
    )]
    NoPin { path: PathBuf },
    #[error("--ca-pin: {path} is not a CA certificate: {source}")]
    NotACa { path: PathBuf, source: CertError },
    #[error("--ca-pin: {path} is CA {found}, not the pinned {pinned}")]
    CaNotPinned {
        path: PathBuf,
        found: Fingerprint,
        pinned: Fingerprint,
    },
    #[error(
        "--ca-pin: {path} was not issued by the pinned CA or an authority its roster lists (issuer {issuer}){roster}"
    )]
    NotIssued {
        path: PathBuf,
        issuer: Fingerprint,
        /// Why the roster could not vouch for it, if it could not be read.
        roster: String,
    },
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

/// Reads at most `max` bytes of text from `path`.
fn read_bounded(path: &Path, max: u64) -> Result<String, AddressError> {
    use std::io::Read;
    let read = |source| AddressError::Read {
        path: path.into(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(max + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > max {
        return Err(AddressError::TooLarge {
            path: path.into(),
            max,
        });
    }
    Ok(text)
}

/// The overlay addresses in the node certificate at `path`; with `pin`,
/// only from a certificate the pinned CA's network vouches for, which may
/// be a newer one the roster lists for this node (module comment).
pub fn from_cert(path: &Path, pin: Option<&Path>) -> Result<Vec<IpPrefix>, AddressError> {
    let text = read_bounded(path, MAX_CERT_BYTES)?;
    let mut cert = NodeCert::from_text(&text).map_err(|source| AddressError::NotACert {
        path: path.into(),
        source,
    })?;
    if let Some(pin) = pin {
        cert = vouched(path, cert, pin)?;
    }
    let addresses = cert.body().addresses.clone();
    if addresses.is_empty() {
        return Err(AddressError::NoAddress { path: path.into() });
    }
    Ok(addresses)
}

/// The pinned fingerprint: the first line of `pin` that is not a comment.
fn read_pin(pin: &Path) -> Result<Fingerprint, AddressError> {
    let text = read_bounded(pin, MAX_CERT_BYTES).map_err(|e| match e {
        AddressError::Read { path, source } => AddressError::PinUnreadable { path, source },
        e => e,
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| Fingerprint::from_hex(l).ok())
        .ok_or_else(|| AddressError::NoPin { path: pin.into() })
}

/// The certificate whose addresses the interface gets, `cert` (read from
/// `path`) or a newer one for the same node that the roster lists (as keyd
/// takes it at start: after an authority key rollover the roster may list
/// only the new key while `node.crt` still holds the old key's
/// certificate), if the network that `pin` names vouches for it:
/// * signed by the pinned CA (`ca.crt` beside `path`), or
/// * the roster's own entry for this node, the roster (`roster` beside
///   `path`) signed by the CA or by an authority valid now, or
/// * issued by an authority that roster lists and that is valid now (a
///   key that expired, or was retired and still listed by the roster
///   that rolled it over, vouches for nothing new);
///
/// and in any case not revoked by that roster.
fn vouched(path: &Path, cert: NodeCert, pin: &Path) -> Result<NodeCert, AddressError> {
    let pinned = read_pin(pin)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let ca_path = dir.join(CA_FILE);
    let ca = CaCert::from_text(&read_bounded(&ca_path, MAX_CERT_BYTES)?).map_err(|source| {
        AddressError::NotACa {
            path: ca_path.clone(),
            source,
        }
    })?;
    if ca.fingerprint() != pinned {
        return Err(AddressError::CaNotPinned {
            path: ca_path,
            found: ca.fingerprint(),
            pinned,
        });
    }
    let roster_path = dir.join(ROSTER_FILE);
    let now = unix_now();
    let roster = load_roster(&roster_path, &ca, now).map_err(|why| AddressError::NotIssued {
        path: path.into(),
        issuer: cert.body().issuer,
        roster: format!("; roster {}: {why}", roster_path.display()),
    });
    let roster = match roster {
        Ok(r) => r,
        // Without a roster only the CA's own signature vouches.
        Err(_) if ca.signed(&cert) => return Ok(cert),
        Err(e) => return Err(e),
    };
    let listed = roster
        .member(&cert.body().node_id)
        .map(|m| &m.cert)
        .filter(|m| m.body().not_before > cert.body().not_before);
    let cert = listed.cloned().unwrap_or(cert);
    let not_issued = |why: &str| AddressError::NotIssued {
        path: path.into(),
        issuer: cert.body().issuer,
        roster: why.into(),
    };
    if roster.revokes(&cert) {
        return Err(not_issued("; the roster revokes it"));
    }
    let is_roster_entry = roster
        .member(&cert.body().node_id)
        .is_some_and(|m| m.cert.fingerprint() == cert.fingerprint());
    let issuer_valid_now = roster
        .authority(&cert.body().issuer)
        .is_some_and(|a| a.signed(&cert) && a.is_valid_at(now, MAX_CLOCK_SKEW));
    if ca.signed(&cert) || (is_roster_entry && roster.issued(&ca, &cert)) || issuer_valid_now {
        Ok(cert)
    } else {
        Err(not_issued(""))
    }
}

/// The roster at `path`, verified under `ca` and signed by the CA or an
/// authority valid now (as keyd takes one at start).
fn load_roster(path: &Path, ca: &CaCert, now: u64) -> Result<Roster, String> {
    let text = read_bounded(path, MAX_ROSTER_BYTES).map_err(|e| e.to_string())?;
    let roster = Roster::from_text(&text, ca).map_err(|e| e.to_string())?;
    roster
        .check_signer(None, now, MAX_CLOCK_SKEW)
        .map_err(|e| e.to_string())?;
    Ok(roster)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            from_cert(&missing, None),
            Err(AddressError::Read { .. })
        ));
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = from_cert(&junk, None).unwrap_err();
        assert!(matches!(err, AddressError::NotACert { .. }));
        assert!(err.to_string().contains("junk.crt"), "{err}");
        let big = dir.path().join("big.crt");
        std::fs::write(&big, vec![b'a'; MAX_CERT_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            from_cert(&big, None),
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
        assert_eq!(from_cert(&path, None).unwrap(), addresses);
    }

    mod pinned {
        use super::*;
        use mesh_proto::cert::{AuthorityCert, NodeCertRequest};
        use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
        use mesh_proto::roster::{RosterContent, Signer};

        const END: u64 = u64::MAX / 4;

        fn request() -> NodeCertRequest {
            NodeCertRequest {
                name: "web-1".into(),
                addresses: vec!["10.77.0.5/16".parse().unwrap()],
                groups: vec![],
                attributes: Default::default(),
                not_before: 0,
                not_after: END,
                wg_public: WgPrivateKey::generate().unwrap().public_key(),
                noise_public: NoisePrivateKey::generate().unwrap().public_key(),
            }
        }

        /// A network: its CA and an authority the CA certified.
        struct Network {
            ca_key: CaSigningKey,
            ca: CaCert,
            authority_key: CaSigningKey,
            authority: AuthorityCert,
        }

        fn network(name: &str) -> Network {
            let ca_key = CaSigningKey::generate().unwrap();
            let ca = CaCert::create(&ca_key, "ca", name, 0, u64::MAX / 2).unwrap();
            let authority_key = CaSigningKey::generate().unwrap();
            let authority = ca
                .certify_authority(&ca_key, "authority", authority_key.verifying_key(), 0, END)
                .unwrap();
            Network {
                ca_key,
                ca,
                authority_key,
                authority,
            }
        }

        /// An authority of `net` whose certificate expires at 50 (long
        /// past), and its key.
        fn expired_authority(net: &Network) -> (AuthorityCert, CaSigningKey) {
            let key = CaSigningKey::generate().unwrap();
            let cert = net
                .ca
                .certify_authority(&net.ca_key, "old", key.verifying_key(), 0, 50)
                .unwrap();
            (cert, key)
        }

        /// `cert` as a roster member (no endpoints).
        fn entry(cert: &NodeCert) -> mesh_proto::roster::Member {
            mesh_proto::roster::Member {
                cert: cert.clone(),
                wg_endpoint: None,
                keyd_endpoint: None,
            }
        }

        /// A roster of `net` listing its authority and no member, signed
        /// by its CA.
        fn plain_roster(net: &Network) -> Roster {
            let content = RosterContent {
                serial: 1,
                issued_at: 1,
                not_after: END,
                authorities: vec![net.authority.clone()],
                ..RosterContent::default()
            };
            Roster::sign(&net.ca, &Signer::Root(&net.ca_key), &content).unwrap()
        }

        /// `keyd join`'s files: node.crt, ca.crt and `roster` (if any) in a
        /// new directory; the pin of `pinned`'s CA beside them.
        fn files(
            net: &Network,
            cert: &NodeCert,
            roster: Option<&Roster>,
            pinned: &CaCert,
        ) -> (tempfile::TempDir, PathBuf, PathBuf) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.crt"), net.ca.to_text()).unwrap();
            if let Some(roster) = roster {
                std::fs::write(dir.path().join("roster"), roster.to_text()).unwrap();
            }
            let path = dir.path().join("node.crt");
            std::fs::write(&path, cert.to_text()).unwrap();
            let pin = dir.path().join("ca.pin");
            let text = format!("# pinned\n{}\n", pinned.fingerprint().to_hex());
            std::fs::write(&pin, text).unwrap();
            (dir, path, pin)
        }

        #[test]
        fn certificates_of_the_pinned_network_are_taken() {
            let net = network("net");
            let by_ca = net.ca.issue(&net.ca_key, request()).unwrap();
            let (_d, path, pin) = files(&net, &by_ca, None, &net.ca);
            assert_eq!(from_cert(&path, Some(&pin)).unwrap().len(), 1);
            let by_authority = net.authority.issue(&net.authority_key, request()).unwrap();
            let (_d, path, pin) = files(&net, &by_authority, Some(&plain_roster(&net)), &net.ca);
            assert_eq!(from_cert(&path, Some(&pin)).unwrap().len(), 1);
        }

        /// What a compromised keyd could write in its directory.
        #[test]
        fn a_certificate_of_another_network_is_refused() {
            let net = network("net");
            let evil = network("net");
            let forged = evil.ca.issue(&evil.ca_key, request()).unwrap();
            // Its own CA beside it: not the pinned one.
            let (_d, path, pin) = files(&evil, &forged, Some(&plain_roster(&evil)), &net.ca);
            let err = from_cert(&path, Some(&pin)).unwrap_err();
            assert!(matches!(err, AddressError::CaNotPinned { .. }), "{err}");
            assert!(err.to_string().contains("not the pinned"), "{err}");
            // The pinned CA beside it: it did not sign it, nor its authority.
            let (_d, path, pin) = files(&net, &forged, Some(&plain_roster(&net)), &net.ca);
            let err = from_cert(&path, Some(&pin)).unwrap_err();
            assert!(matches!(err, AddressError::NotIssued { .. }), "{err}");
            // Another network's authority, listed in no roster of ours.
            let by_evil_authority = evil
                .authority
                .issue(&evil.authority_key, request())
                .unwrap();
            let (_d, path, pin) =
                files(&net, &by_evil_authority, Some(&plain_roster(&net)), &net.ca);
            assert!(matches!(
                from_cert(&path, Some(&pin)),
                Err(AddressError::NotIssued { .. })
            ));
            // Without the pin the same file is taken (the flag is the fix).
            assert!(from_cert(&path, None).is_ok());
        }

        /// A roster signed by an authority key that is no longer valid (a
        /// retired key in the wrong hands, its issue time back-dated into
        /// the key's window) vouches for nothing; nor does a roster for a
        /// certificate it revokes.
        #[test]
        fn an_expired_authority_s_roster_or_a_revoked_certificate_is_refused() {
            let net = network("net");
            let (retired, retired_key) = expired_authority(&net);
            let mut req = request();
            req.addresses = vec!["0.0.0.0/1".parse().unwrap()];
            req.not_after = 50;
            let forged = retired.issue(&retired_key, req).unwrap();
            // The roster lists the forged certificate as this node's
            // entry: only the signer's validity (check_signer) refuses it.
            let content = RosterContent {
                serial: 9,
                issued_at: 1,
                not_after: 2,
                authorities: vec![retired.clone()],
                members: vec![entry(&forged)],
                ..RosterContent::default()
            };
            let signer = Signer::Authority(&retired, &retired_key);
            let roster = Roster::sign(&net.ca, &signer, &content).unwrap();
            let (_dir, path, pin) = files(&net, &forged, Some(&roster), &net.ca);
            let err = from_cert(&path, Some(&pin)).unwrap_err();
            assert!(matches!(err, AddressError::NotIssued { .. }), "{err}");

            let cert = net.authority.issue(&net.authority_key, request()).unwrap();
            let content = RosterContent {
                serial: 1,
                issued_at: 1,
                not_after: END,
                authorities: vec![net.authority.clone()],
                revoked: vec![cert.fingerprint()],
                ..RosterContent::default()
            };
            let roster = Roster::sign(&net.ca, &Signer::Root(&net.ca_key), &content).unwrap();
            let (_dir, path, pin) = files(&net, &cert, Some(&roster), &net.ca);
            let err = from_cert(&path, Some(&pin)).unwrap_err();
            assert!(err.to_string().contains("revokes"), "{err}");
        }

        /// After an authority key rollover the roster (signed by the new
        /// key) lists only the new key and this node's reissued
        /// certificate, while node.crt may still hold the old key's (its
        /// write came later and was lost). keyd takes the roster's newer
        /// certificate at start; so does mesh-node, else it would refuse
        /// and keyd, which needs it, could never start to repair it.
        #[test]
        fn after_a_rollover_the_roster_s_newer_certificate_is_taken() {
            let net = network("net");
            let (old, old_key) = expired_authority(&net);
            let mut req = request();
            req.not_after = 50;
            let stale = old.issue(&old_key, req.clone()).unwrap();
            req.not_before = 10;
            req.not_after = END;
            req.addresses = vec!["10.77.0.9/16".parse().unwrap()];
            let reissued = net.authority.issue(&net.authority_key, req).unwrap();
            let content = RosterContent {
                serial: 3,
                issued_at: 20,
                not_after: END,
                authorities: vec![net.authority.clone()],
                members: vec![entry(&reissued)],
                ..RosterContent::default()
            };
            let signer = Signer::Authority(&net.authority, &net.authority_key);
            let roster = Roster::sign(&net.ca, &signer, &content).unwrap();
            let (_dir, path, pin) = files(&net, &stale, Some(&roster), &net.ca);
            let got = from_cert(&path, Some(&pin)).unwrap();
            assert_eq!(got, vec!["10.77.0.9/16".parse::<IpPrefix>().unwrap()]);
        }

        /// The roster's own entry for this node is taken even where its
        /// issuer is no longer valid: a current roster (here the CA's)
        /// vouches for the members it lists, as keyd takes them.
        #[test]
        fn the_roster_s_entry_is_taken_though_its_issuer_expired() {
            let net = network("net");
            let (old, old_key) = expired_authority(&net);
            let mut req = request();
            req.not_after = 50;
            let cert = old.issue(&old_key, req).unwrap();
            let content = RosterContent {
                serial: 4,
                issued_at: 20,
                not_after: END,
                authorities: vec![old.clone()],
                members: vec![entry(&cert)],
                ..RosterContent::default()
            };
            let roster = Roster::sign(&net.ca, &Signer::Root(&net.ca_key), &content).unwrap();
            let (_dir, path, pin) = files(&net, &cert, Some(&roster), &net.ca);
            assert_eq!(from_cert(&path, Some(&pin)).unwrap().len(), 1);
        }

        /// A rollover's middle roster is signed by the new key and still
        /// lists the old one: a certificate made with the old key once it
        /// expired is refused, for a node the roster lists or not.
        #[test]
        fn an_expired_key_still_listed_vouches_for_nothing_new() {
            let net = network("net");
            let (old, old_key) = expired_authority(&net);
            let mut req = request();
            req.not_before = 5;
            let member = net
                .authority
                .issue(&net.authority_key, req.clone())
                .unwrap();
            let content = RosterContent {
                serial: 2,
                issued_at: 20,
                not_after: END,
                authorities: vec![old.clone(), net.authority.clone()],
                members: vec![entry(&member)],
                ..RosterContent::default()
            };
            let signer = Signer::Authority(&net.authority, &net.authority_key);
            let roster = Roster::sign(&net.ca, &signer, &content).unwrap();
            // The same node, a newer (forged) certificate; and a stranger.
            req.not_before = 6;
            req.not_after = 50;
            req.addresses = vec!["0.0.0.0/1".parse().unwrap()];
            let mut stranger = request();
            stranger.addresses = req.addresses.clone();
            stranger.not_after = 50;
            for forged in [
                old.issue(&old_key, req).unwrap(),
                old.issue(&old_key, stranger).unwrap(),
            ] {
                let (_dir, path, pin) = files(&net, &forged, Some(&roster), &net.ca);
                let err = from_cert(&path, Some(&pin)).unwrap_err();
                assert!(matches!(err, AddressError::NotIssued { .. }), "{err}");
            }
        }

        #[test]
        fn an_authority_s_certificate_needs_the_roster_and_a_pin_is_needed() {
            let net = network("net");
            let cert = net.authority.issue(&net.authority_key, request()).unwrap();
            let (dir, path, pin) = files(&net, &cert, None, &net.ca);
            let err = from_cert(&path, Some(&pin)).unwrap_err();
            assert!(
                matches!(err, AddressError::NotIssued { .. }) && err.to_string().contains("roster"),
                "{err}"
            );
            std::fs::write(&pin, "# nothing pinned\n").unwrap();
            assert!(matches!(
                from_cert(&path, Some(&pin)),
                Err(AddressError::NoPin { .. })
            ));
            let missing = dir.path().join("no.pin");
            let err = from_cert(&path, Some(&missing)).unwrap_err();
            assert!(matches!(err, AddressError::PinUnreadable { .. }), "{err}");
            assert!(err.to_string().contains("keyd join"), "{err}");
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        let err = apply("pqm-nonexist0", &[]).unwrap_err();
        assert!(err.to_string().contains("pqm-nonexist0"), "{err}");
    }
}
