//! What a packaged mesh-node does for itself (packaging/): `--socket-group`
//! hands its sockets to keyd's group, `--address-from-cert` gives the
//! interface the certificate's overlay addresses and sets it up, and only
//! then does it tell systemd it is ready (`NOTIFY_SOCKET`). Needs root.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use mesh_proto::cert::{CaCert, NodeCertRequest};
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-node"))
}

/// A node certificate with `addresses`, as `keyd join` writes it.
fn cert_file(dir: &Path, addresses: &[&str]) -> std::path::PathBuf {
    let ca_key = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&ca_key, "ca", "net", 0, u64::MAX / 2).unwrap();
    issued_file(dir, &ca, &ca_key, addresses)
}

/// The same from `ca`, with `ca.crt` beside it (as `keyd join` writes).
fn issued_file(
    dir: &Path,
    ca: &CaCert,
    ca_key: &CaSigningKey,
    addresses: &[&str],
) -> std::path::PathBuf {
    std::fs::write(dir.join("ca.crt"), ca.to_text()).unwrap();
    let cert = ca
        .issue(
            ca_key,
            NodeCertRequest {
                name: "n1".into(),
                addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
                groups: vec![],
                attributes: Default::default(),
                not_before: 0,
                not_after: u64::MAX / 4,
                wg_public: WgPrivateKey::generate().unwrap().public_key(),
                noise_public: NoisePrivateKey::generate().unwrap().public_key(),
            },
        )
        .unwrap();
    let path = dir.join("node.crt");
    std::fs::write(&path, cert.to_text()).unwrap();
    path
}

fn nogroup_gid() -> u32 {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .find_map(|l| l.strip_prefix("nogroup:x:"))
        .and_then(|rest| rest.split(':').next())
        .expect("a nogroup group (Debian)")
        .parse()
        .unwrap()
}

#[test]
fn sockets_go_to_the_group_and_addresses_come_from_the_certificate_before_ready() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = cert_file(dir.path(), &["10.213.0.7/16", "fd21:3::7/64"]);
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // A bound on the wait so that a broken daemon fails the test instead of
    // hanging it; not a measurement.
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let ifname = unique("pqs");
    let log = dir.path().join("mesh-node.log");
    let mut child = ns
        .cmd(&[
            bin().to_str().unwrap(),
            "up",
            &ifname,
            "--foreground",
            "--log-file",
            log.to_str().unwrap(),
            "--socket-group",
            "nogroup",
            "--address-from-cert",
            cert.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf);
    // What must hold at READY=1 is checked before anything else can change it.
    let sockets = [
        format!("/var/run/wireguard/{ifname}.sock"),
        format!("/var/run/wireguard/{ifname}.firewall"),
    ]
    .map(|p| (p.clone(), std::fs::metadata(&p)));
    let addrs = ns.ok(&["ip", "-o", "addr", "show", "dev", &ifname]);
    let link = ns.ok(&["ip", "-o", "link", "show", "dev", &ifname]);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();

    let n = got.unwrap_or_else(|e| panic!("no readiness notification ({e}): {}", read(&log)));
    assert_eq!(&buf[..n], b"READY=1\n");
    let gid = nogroup_gid();
    for (path, meta) in sockets {
        let meta = meta.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(meta.file_type().is_socket(), "{path}");
        assert_eq!(meta.gid(), gid, "{path} belongs to nogroup");
        assert_eq!(meta.mode() & 0o777, 0o660, "{path} is 0660");
    }
    assert!(addrs.contains("inet 10.213.0.7/16"), "{addrs}");
    assert!(addrs.contains("inet6 fd21:3::7/64"), "{addrs}");
    // IPv6 usable at once: not tentative (duplicate detection skipped).
    assert!(!addrs.contains("tentative"), "{addrs}");
    assert!(link.contains(",UP"), "link up: {link}");
    assert!(status.success(), "clean stop: {}", read(&log));
}

#[test]
fn a_bad_certificate_or_group_stops_it_before_an_interface_exists() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate").unwrap();
    let ifname = unique("pqs");
    for (flag, value, says) in [
        (
            "--address-from-cert",
            junk.to_str().unwrap(),
            "junk.crt is not a node certificate",
        ),
        (
            "--address-from-cert",
            "/nonexistent/node.crt",
            "cannot read /nonexistent/node.crt",
        ),
        (
            "--socket-group",
            "pqmesh-no-such-group",
            "no group `pqmesh-no-such-group`",
        ),
    ] {
        refused_before_an_interface(&ns, &ifname, &[flag, value], says);
    }
}

/// mesh-node `up IFNAME --foreground` with `options` in `ns` fails, says
/// `says`, and leaves neither an interface nor a socket behind.
fn refused_before_an_interface(ns: &Netns, ifname: &str, options: &[&str], says: &str) {
    let mut argv = vec![bin().to_str().unwrap(), "up", ifname, "--foreground"];
    argv.extend_from_slice(options);
    let out = ns.cmd(&argv).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{options:?} was taken");
    assert!(err.contains(says), "{options:?}: {err}");
    let links = ns.ok(&["ip", "-o", "link"]);
    assert!(!links.contains(ifname), "no interface left: {links}");
    assert!(!Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists());
}

/// `--ca-pin`: a certificate that keyd's user could write (here: another
/// CA's, with that CA beside it) gives the interface no address; it stops
/// before an interface exists. The pinned network's certificate is taken.
#[test]
fn with_a_ca_pin_only_the_pinned_network_s_certificate_gives_addresses() {
    let ns = Netns::new();
    let ifname = unique("pqs");
    let ca_key = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&ca_key, "ca", "net", 0, u64::MAX / 2).unwrap();
    let pin_dir = tempfile::tempdir().unwrap();
    let pin = pin_dir.path().join("ca.pin");
    std::fs::write(&pin, format!("{}\n", ca.fingerprint().to_hex())).unwrap();

    let forged_dir = tempfile::tempdir().unwrap();
    let evil_key = CaSigningKey::generate().unwrap();
    let evil = CaCert::create(&evil_key, "ca", "net", 0, u64::MAX / 2).unwrap();
    // A prefix covering the host's networks (metadata address included).
    let forged = issued_file(forged_dir.path(), &evil, &evil_key, &["169.254.0.1/1"]);
    refused_before_an_interface(
        &ns,
        &ifname,
        &[
            "--address-from-cert",
            forged.to_str().unwrap(),
            "--ca-pin",
            pin.to_str().unwrap(),
        ],
        "not the pinned",
    );

    let dir = tempfile::tempdir().unwrap();
    let cert = issued_file(dir.path(), &ca, &ca_key, &["10.213.0.9/16"]);
    let (child, log) = up_ready(
        &ns,
        dir.path(),
        &ifname,
        &[
            "--address-from-cert",
            cert.to_str().unwrap(),
            "--ca-pin",
            pin.to_str().unwrap(),
        ],
    );
    let addrs = ns.ok(&["ip", "-o", "addr", "show", "dev", &ifname]);
    assert!(addrs.contains("10.213.0.9/16"), "{addrs}");
    assert!(stop(child), "{}", read(&log));
}

/// mesh-node `up` in the foreground in `ns` with `extra` options; waits for
/// READY=1 (a bound, not a measurement) and returns the child and its log.
fn up_ready(
    ns: &Netns,
    dir: &Path,
    ifname: &str,
    extra: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let notify_path = dir.join(format!("notify-{ifname}"));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log = dir.join(format!("{ifname}.log"));
    let mut argv = vec![
        bin().to_str().unwrap(),
        "up",
        ifname,
        "--foreground",
        "--log-file",
        log.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    let mut child = ns
        .cmd(&argv)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Bounded so that a hung daemon fails the test; not a measurement.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) if &buf[..n] == b"READY=1\n" => return (child, log),
            Ok(n) => panic!("not READY=1: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
        let exited = child.try_wait().unwrap();
        if exited.is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no READY=1 (exited: {exited:?}): {}", read(&log));
        }
    }
}

/// Stops `child` with SIGTERM and says whether it exited cleanly.
fn stop(mut child: std::process::Child) -> bool {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap().success()
}

/// A path removed on drop (a link made in a shared directory).
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `--socket-dir`: both sockets in a directory of the unit's own (the
/// package's /run/pqmesh), none in the shared /var/run/wireguard; `mesh-node
/// status` finds them with the same option, and `wg` through a link named
/// as it expects in /var/run/wireguard (what the package's tmpfiles.d makes).
#[test]
fn sockets_go_to_the_socket_dir_and_wg_follows_a_link_to_them() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("run");
    let ifname = unique("pqd");
    let (child, log) = up_ready(
        &ns,
        dir.path(),
        &ifname,
        &["--socket-dir", sockets.to_str().unwrap()],
    );
    for name in [format!("{ifname}.sock"), format!("{ifname}.firewall")] {
        let here = sockets.join(&name);
        let meta = std::fs::metadata(&here).unwrap_or_else(|e| panic!("{}: {e}", here.display()));
        assert!(meta.file_type().is_socket(), "{}", here.display());
        assert!(
            !Path::new("/var/run/wireguard").join(&name).exists(),
            "{name} also in /var/run/wireguard"
        );
    }
    let status = ns.run(&[
        bin().to_str().unwrap(),
        "status",
        &ifname,
        "--socket-dir",
        sockets.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let elsewhere = ns.run(&[bin().to_str().unwrap(), "status", &ifname]);
    assert!(
        !elsewhere.status.success(),
        "no socket in the default place"
    );

    std::fs::create_dir_all("/var/run/wireguard").unwrap();
    let link = Removed(Path::new("/var/run/wireguard").join(format!("{ifname}.sock")));
    std::os::unix::fs::symlink(sockets.join(format!("{ifname}.sock")), &link.0).unwrap();
    let key = ns.ok(&["wg", "show", &ifname, "listen-port"]);
    assert!(
        key.trim().parse::<u16>().is_ok(),
        "wg show through the link: {key}"
    );
    let all = ns.ok(&["wg", "show", "interfaces"]);
    assert!(
        all.split_whitespace().any(|i| i == ifname),
        "wg lists it: {all}"
    );
    drop(link);
    assert!(stop(child), "clean stop: {}", read(&log));
    assert!(
        !sockets.join(format!("{ifname}.sock")).exists(),
        "its sockets go with it"
    );
}

/// A host with IPv6 turned off (disable_ipv6=1, common in cloud images)
/// still gets the certificate's IPv4 address and a data plane: the IPv6
/// address is left out with one warning instead of a failed start.
#[test]
fn where_ipv6_is_disabled_the_ipv4_address_is_set_and_it_says_so() {
    let ns = Netns::new();
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        ns.ok(&["sysctl", "-q", "-w", key]);
    }
    let dir = tempfile::tempdir().unwrap();
    let cert = cert_file(dir.path(), &["10.214.0.7/16", "fd21:4::7/64"]);
    let ifname = unique("pq6");
    let (child, log) = up_ready(
        &ns,
        dir.path(),
        &ifname,
        &["--address-from-cert", cert.to_str().unwrap()],
    );
    let addrs = ns.ok(&["ip", "-o", "addr", "show", "dev", &ifname]);
    let link = ns.ok(&["ip", "-o", "link", "show", "dev", &ifname]);
    assert!(stop(child), "clean stop: {}", read(&log));
    assert!(addrs.contains("inet 10.214.0.7/16"), "{addrs}");
    assert!(!addrs.contains("inet6"), "{addrs}");
    assert!(link.contains(",UP"), "link up: {link}");
    let text = read(&log);
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("fd21:4::7/64"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning naming the address: {text}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("IPv6 is disabled"),
        "{}",
        warnings[0]
    );
}
