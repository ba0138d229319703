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
    let cert = ca
        .issue(
            &ca_key,
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
        let out = ns
            .cmd(&[
                bin().to_str().unwrap(),
                "up",
                &ifname,
                "--foreground",
                flag,
                value,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        let links = ns.ok(&["ip", "-o", "link"]);
        assert!(!links.contains(&ifname), "no interface left: {links}");
        assert!(!Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists());
    }
}
