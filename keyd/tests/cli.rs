//! The CA tooling as an operator runs it: the real `keyd` binary, real files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run(Output);

impl Run {
    fn ok(self) -> String {
        assert!(
            self.0.status.success(),
            "keyd failed: {}",
            String::from_utf8_lossy(&self.0.stderr)
        );
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    /// Asserts failure and returns stderr.
    fn err(self) -> String {
        assert!(!self.0.status.success(), "keyd should have failed");
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}

fn keyd(args: &[&str]) -> Run {
    Run(Command::new(env!("CARGO_BIN_EXE_keyd"))
        .args(args)
        .output()
        .expect("run keyd"))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Net {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Net {
    fn new(network: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        keyd(&[
            "ca",
            "create",
            "--network",
            network,
            "--dir",
            p(&root.join("ca")),
        ])
        .ok();
        Net { _dir: dir, root }
    }
    fn ca(&self) -> PathBuf {
        self.root.join("ca")
    }
    fn node(&self, name: &str, addr: &str) -> PathBuf {
        let dir = self.root.join(name);
        keyd(&["key", "generate", "--dir", p(&dir)]).ok();
        let cert = dir.join("node.crt");
        keyd(&[
            "cert",
            "issue",
            "--ca-dir",
            p(&self.ca()),
            "--name",
            name,
            "--address",
            addr,
            "--key-dir",
            p(&dir),
            "--out",
            p(&cert),
        ])
        .ok();
        cert
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("valid JSON")
}

#[test]
fn ca_issue_roster_revoke_inspect() {
    let net = Net::new("demo");
    let c1 = net.node("n1", "10.99.0.1/24");
    let c2 = net.node("n2", "10.99.0.2/24");
    let ca_cert = net.ca().join("ca.crt");
    let roster = net.root.join("roster");
    let m1 = format!("{},wg=192.0.2.1:51820,keyd=192.0.2.1:51821", p(&c1));
    keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--member",
        &m1,
        "--member",
        p(&c2),
        "--out",
        p(&roster),
    ])
    .ok();

    let v = json(&keyd(&["inspect", p(&roster), "--ca-cert", p(&ca_cert), "--json"]).ok());
    assert_eq!(v["kind"], "roster");
    assert_eq!(v["serial"], 1);
    assert_eq!(v["signature"], "ok");
    assert_eq!(v["members"].as_array().unwrap().len(), 2);
    assert_eq!(v["members"][0]["wg_endpoint"], "192.0.2.1:51820");
    assert_eq!(v["members"][0]["keyd_endpoint"], "192.0.2.1:51821");

    let cert = json(&keyd(&["inspect", p(&c2), "--ca-cert", p(&ca_cert), "--json"]).ok());
    assert_eq!(cert["name"], "n2");
    assert_eq!(cert["network_id"], "demo");
    assert_eq!(cert["signature"], "ok");
    assert_eq!(cert["status"], "valid");
    let fp = cert["fingerprint"].as_str().unwrap().to_string();

    keyd(&[
        "roster",
        "revoke",
        "--ca-dir",
        p(&net.ca()),
        "--roster",
        p(&roster),
        "--cert",
        p(&c2),
    ])
    .ok();
    let v = json(&keyd(&["inspect", p(&roster), "--ca-cert", p(&ca_cert), "--json"]).ok());
    assert_eq!(v["serial"], 2);
    assert_eq!(v["members"].as_array().unwrap().len(), 1);
    assert_eq!(v["revoked"][0], fp.as_str());

    // A new roster built on the previous one keeps the revocation and refuses
    // to list the revoked certificate again.
    let next = net.root.join("roster3");
    let err = keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--previous",
        p(&roster),
        "--member",
        p(&c2),
        "--out",
        p(&next),
    ])
    .err();
    assert!(err.contains("revoked"), "{err}");
    keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--previous",
        p(&roster),
        "--member",
        p(&c1),
        "--out",
        p(&next),
    ])
    .ok();
    let v = json(&keyd(&["inspect", p(&next), "--ca-cert", p(&ca_cert), "--json"]).ok());
    assert_eq!(v["serial"], 3);
    assert_eq!(v["revoked"][0], fp.as_str());

    // Rollback: an explicit serial below the previous one is refused.
    let err = keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--previous",
        p(&next),
        "--serial",
        "2",
        "--member",
        p(&c1),
        "--out",
        p(&net.root.join("r4")),
    ])
    .err();
    assert!(err.contains("rollback"), "{err}");

    // Human-readable form leads with the kind.
    let text = keyd(&["inspect", p(&c1)]).ok();
    assert!(text.starts_with("kind"), "{text}");
    assert!(text.contains("not checked"), "{text}");
}

#[test]
fn key_files_are_private_and_wg_compatible() {
    let net = Net::new("demo");
    net.node("n1", "10.99.0.1/24");
    let dir = net.root.join("n1");
    for (file, mode) in [("wg.key", 0o600), ("noise.key", 0o600), ("wg.pub", 0o644)] {
        let m = fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{file}");
    }
    assert_eq!(
        fs::metadata(net.ca().join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // `wg pubkey` reads our private key file and agrees with our wg.pub.
    let key = fs::read(dir.join("wg.key")).unwrap();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the `wg` tool (apt-get install wireguard-tools) is needed for this test");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&key).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        fs::read_to_string(dir.join("wg.pub")).unwrap()
    );
    // Regenerating into the same directory never overwrites a key.
    let err = keyd(&["key", "generate", "--dir", p(&dir)]).err();
    assert!(err.contains("refusing to overwrite"), "{err}");
}

#[test]
fn bad_inputs_get_specific_errors() {
    let net = Net::new("demo");
    let c1 = net.node("n1", "10.99.0.1/24");
    let ca_key = net.ca().join("ca.key");

    // A CA key readable by others is refused, with the fix.
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--member",
        p(&c1),
        "--out",
        p(&net.root.join("r")),
    ])
    .err();
    assert!(err.contains("chmod 600") && err.contains("ca.key"), "{err}");
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o600)).unwrap();

    // A certificate of another CA cannot enter this CA's roster.
    let other = Net::new("demo");
    let foreign = other.node("x", "10.99.0.9/24");
    let err = keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--member",
        p(&foreign),
        "--out",
        p(&net.root.join("r")),
    ])
    .err();
    assert!(
        err.contains("not signed by the CA or a listed authority"),
        "{err}"
    );
    let v = json(
        &keyd(&[
            "inspect",
            p(&foreign),
            "--ca-cert",
            p(&net.ca().join("ca.crt")),
            "--json",
        ])
        .ok(),
    );
    assert!(
        v["signature"]
            .as_str()
            .is_some_and(|s| s.starts_with("NOT SIGNED BY THIS CA")),
        "{v}"
    );

    // Garbage and missing files name the file.
    let garbage = net.root.join("garbage.crt");
    fs::write(
        &garbage,
        "-----BEGIN PQMESH CERTIFICATE-----\nAAAA\n-----END PQMESH CERTIFICATE-----\n",
    )
    .unwrap();
    let err = keyd(&["inspect", p(&garbage)]).err();
    assert!(err.contains("garbage.crt"), "{err}");
    let err = keyd(&["inspect", "/nonexistent/node.crt"]).err();
    assert!(err.contains("/nonexistent/node.crt"), "{err}");

    // Bad field values name the field.
    let dir = net.root.join("n1");
    let ca_dir = net.ca();
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "cert",
            "issue",
            "--ca-dir",
            p(&ca_dir),
            "--key-dir",
            p(&dir),
            "--out",
            "/dev/null",
        ];
        args.extend_from_slice(extra);
        keyd(&args).err()
    };
    assert!(issue(&["--name", "n1", "--address", "10.0.0.1"]).contains("--address"));
    assert!(issue(&["--name", "bad name", "--address", "10.0.0.1/24"]).contains("`name`"));
    assert!(
        issue(&["--name", "n", "--address", "10.0.0.1/24", "--valid", "soon"]).contains("--valid")
    );
    let err = keyd(&[
        "roster",
        "build",
        "--ca-dir",
        p(&net.ca()),
        "--member",
        &format!("{},wg=myhost:51820", p(&c1)),
        "--out",
        "/dev/null",
    ])
    .err();
    assert!(err.contains("host names are not accepted"), "{err}");
}

/// Seconds between a roster's issue time and its expiry, as `inspect` shows them.
fn roster_lifetime(v: &serde_json::Value) -> u64 {
    let t = |k: &str| humantime::parse_rfc3339(v[k].as_str().unwrap()).unwrap();
    t("not_after")
        .duration_since(t("issued_at"))
        .unwrap()
        .as_secs()
}

#[test]
fn rosters_expire_when_the_ca_says() {
    let net = Net::new("demo");
    let c1 = net.node("n1", "10.99.0.1/24");
    let ca_dir = net.ca();
    let ca_cert = ca_dir.join("ca.crt");
    let roster = net.root.join("roster");
    let build = |extra: &[&str]| {
        let mut args = vec![
            "roster",
            "build",
            "--ca-dir",
            p(&ca_dir),
            "--member",
            p(&c1),
            "--serial",
            "1",
            "--out",
            p(&roster),
        ];
        args.extend_from_slice(extra);
        keyd(&args)
    };
    let inspect = || json(&keyd(&["inspect", p(&roster), "--ca-cert", p(&ca_cert), "--json"]).ok());

    // Default: a week.
    let out = build(&[]).ok();
    assert!(out.contains("valid until"), "{out}");
    let v = inspect();
    assert_eq!(roster_lifetime(&v), 7 * 86_400);
    assert_eq!(v["status"], "valid");

    // Chosen by the CA.
    build(&["--valid", "2d"]).ok();
    assert_eq!(roster_lifetime(&inspect()), 2 * 86_400);

    // A roster that would never be valid, or a duration that is not one.
    let err = build(&["--valid", "0s"]).err();
    assert!(
        err.contains("--valid") && err.contains("not after"),
        "{err}"
    );
    let err = build(&["--valid", "soon"]).err();
    assert!(err.contains("--valid"), "{err}");

    // A revocation publishes a new roster with its own expiry.
    keyd(&[
        "roster",
        "revoke",
        "--ca-dir",
        p(&ca_dir),
        "--roster",
        p(&roster),
        "--cert",
        p(&c1),
        "--valid",
        "1h",
    ])
    .ok();
    let v = inspect();
    assert_eq!(v["serial"], 2);
    assert_eq!(roster_lifetime(&v), 3600);

    // The human-readable form shows the expiry too.
    let text = keyd(&["inspect", p(&roster)]).ok();
    assert!(text.contains("not_after"), "{text}");
}

#[test]
fn attributes_and_the_firewall_policy_through_the_ca_tooling() {
    let net = Net::new("demo");
    let ca_dir = net.ca();
    let dir = net.root.join("web-1");
    keyd(&["key", "generate", "--dir", p(&dir)]).ok();
    let cert = dir.join("node.crt");
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "cert",
            "issue",
            "--ca-dir",
            p(&ca_dir),
            "--name",
            "web-1",
            "--address",
            "10.99.0.1/24",
            "--key-dir",
            p(&dir),
            "--out",
            p(&cert),
        ];
        args.extend_from_slice(extra);
        keyd(&args)
    };
    let err = issue(&["--attribute", "env"]).err();
    assert!(
        err.contains("--attribute") && err.contains("KEY=VALUE"),
        "{err}"
    );
    let err = issue(&["--attribute", "env=a,b"]).err();
    assert!(err.contains("--attribute") && err.contains("env"), "{err}");
    issue(&["--attribute", "env=prod", "--attribute", "tier=front"]).ok();
    let v = json(&keyd(&["inspect", p(&cert), "--json"]).ok());
    assert_eq!(v["attributes"]["env"], "prod");
    assert_eq!(v["attributes"]["tier"], "front");
    let text = keyd(&["inspect", p(&cert)]).ok();
    assert!(text.contains("env=prod, tier=front"), "{text}");

    let policy = net.root.join("policy.toml");
    fs::write(
        &policy,
        r#"
[[rule]]
name = "web-to-db"
action = "allow"
from = { attributes = { tier = "front" } }
to = { groups = ["db"] }
proto = "tcp"
ports = ["5432"]
"#,
    )
    .unwrap();
    let roster = net.root.join("roster");
    let ca_cert = net.ca().join("ca.crt");
    let build = |extra: &[&str]| {
        let mut args = vec![
            "roster",
            "build",
            "--ca-dir",
            p(&ca_dir),
            "--member",
            p(&cert),
        ];
        args.extend_from_slice(extra);
        keyd(&args)
    };
    build(&["--policy", p(&policy), "--out", p(&roster)]).ok();
    let inspect =
        |r: &Path| json(&keyd(&["inspect", p(r), "--ca-cert", p(&ca_cert), "--json"]).ok());
    let v = inspect(&roster);
    assert_eq!(v["policy_rules"][0], "web-to-db");
    assert_eq!(v["members"][0]["attributes"]["tier"], "front");
    // A revocation keeps the policy; so does a roster built on this one.
    let c2 = net.node("n2", "10.99.0.2/24");
    let r2 = net.root.join("r2");
    build(&[
        "--member",
        p(&c2),
        "--previous",
        p(&roster),
        "--out",
        p(&r2),
    ])
    .ok();
    assert_eq!(inspect(&r2)["policy_rules"][0], "web-to-db");
    keyd(&[
        "roster",
        "revoke",
        "--ca-dir",
        p(&ca_dir),
        "--roster",
        p(&r2),
        "--cert",
        p(&c2),
    ])
    .ok();
    let v = inspect(&r2);
    assert_eq!(
        (v["serial"].as_u64(), &v["policy_rules"][0]),
        (Some(3), &serde_json::json!("web-to-db"))
    );
    // Only --no-policy removes it.
    let r4 = net.root.join("r4");
    build(&["--previous", p(&r2), "--no-policy", "--out", p(&r4)]).ok();
    assert!(inspect(&r4)["policy_rules"].is_null());
    // A bad policy: the error names the file and the rule; nothing written.
    fs::write(
        &policy,
        "[[rule]]\nname = \"dup\"\naction = \"allow\"\nfrom = { any = true }\nto = { any = true }\n\
         [[rule]]\nname = \"dup\"\naction = \"allow\"\nfrom = { any = true }\nto = { any = true }\n",
    )
    .unwrap();
    let bad = net.root.join("bad");
    let err = build(&["--policy", p(&policy), "--out", p(&bad)]).err();
    assert!(err.contains("policy.toml") && err.contains("dup"), "{err}");
    assert!(!bad.exists());
}
