//! The authority served for real on loopback: enrollment through the QUIC
//! channel, the admin socket, and what a host without the authority's key
//! can make it do (nothing but one MAC check).

use std::time::Duration;

use mesh_proto::cert::CaCert;
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};

use super::*;
use crate::authority::client;
use crate::authority::keys::{self, DirKeyFiles};
use crate::authority::service::{Params, SigningKey};
use crate::authority::store::RedbStore;
use crate::authority::token::JoinToken;
use crate::authority::wire::Endpoints;

struct Running {
    dir: tempfile::TempDir,
}

/// Starts an authority on 127.0.0.1 in this test's runtime.
async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let now = unix_now();
    let root = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&root, "root", "net-s", now - 60, now + 86_400).unwrap();
    let key = CaSigningKey::generate().unwrap();
    let cert = ca
        .certify_authority(&root, "a1", key.verifying_key(), now - 60, now + 86_400)
        .unwrap();
    keys::save(dir.path(), &SigningKey { cert, key }).unwrap();
    // A free port: bind, read it, let it go.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let noise = NoisePrivateKey::generate().unwrap();
    let authority = Authority::open(
        Box::new(RedbStore::open(&dir.path().join("store.redb")).unwrap()),
        Box::new(DirKeyFiles {
            dir: dir.path().to_path_buf(),
        }),
        ca.clone(),
        None,
        keys::load_all(dir.path(), &ca).unwrap(),
        noise.public_key(),
        Params {
            cert_lifetime: 3600,
            roster_lifetime: 86_400,
            authority_lifetime: 86_400,
            pool_v4: "10.66.0.0/24".parse().unwrap(),
            pool_v6: None,
            keep_deltas: 16,
            endpoints: vec![listen],
        },
        now,
    )
    .unwrap();
    let cfg = ServeConfig {
        listen,
        admin_socket: dir.path().join(super::super::admin::SOCKET),
        state_dir: dir.path().to_path_buf(),
        max_connections_per_source: 64,
    };
    tokio::spawn(serve(authority, noise, cfg));
    let sock = dir.path().join(super::super::admin::SOCKET);
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { dir }
}

impl Running {
    /// The admin socket, from a blocking thread as the CLI uses it.
    async fn admin(&self, op: AdminOp) -> Result<Value> {
        let dir = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || super::super::admin::request(&dir, &op))
            .await
            .unwrap()
    }

    async fn token(&self) -> JoinToken {
        let v = self
            .admin(AdminOp::TokenCreate {
                lifetime_secs: 600,
                uses: 1,
                groups: vec!["g".into()],
                attributes: vec![],
                name_pattern: None,
            })
            .await
            .unwrap();
        JoinToken::parse(v["token"].as_str().unwrap()).unwrap()
    }

    async fn counter(&self, label: &str) -> u64 {
        let v = self.admin(AdminOp::Status).await.unwrap();
        v["counters"][label].as_u64().unwrap_or(0)
    }
}

async fn join(token: &JoinToken, name: &str) -> Result<client::Enrollment> {
    let wg = WgPrivateKey::generate().unwrap();
    let noise = NoisePrivateKey::generate().unwrap();
    client::join(token, name, wg.public_key(), &noise, Endpoints::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_enrolls_over_the_channel_and_a_used_token_is_refused() {
    let a = start().await;
    let token = a.token().await;
    let e = join(&token, "m1").await.unwrap();
    assert_eq!(e.cert.body().name, "m1");
    assert_eq!(e.cert.body().addresses[0], "10.66.0.1/24".parse().unwrap());
    assert!(e.roster.member(&e.cert.body().node_id).is_some());
    let refused = join(&token, "m2").await.unwrap_err();
    assert_eq!(
        refused.downcast_ref::<client::Refused>().map(|r| r.0),
        Some(Refusal::TokenUsed),
        "{refused:#}"
    );
    assert_eq!(a.counter("enrolled").await, 1);
    assert_eq!(a.counter("token_used").await, 1);
    let nodes = a.admin(AdminOp::NodeList).await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_authoritys_key_gets_no_public_key_work() {
    let a = start().await;
    let mut token = a.token().await;
    // The right address and token, the wrong authority key: its msg1's mac1
    // is wrong, and the authority stops there.
    token.authority_key = NoisePrivateKey::generate().unwrap().public_key();
    let e = join(&token, "m1").await.unwrap_err();
    assert!(format!("{e:#}").contains("did not answer"), "{e:#}");
    assert_eq!(a.counter("bad_mac1").await, 1);
    let v = a.admin(AdminOp::Status).await.unwrap();
    assert_eq!(v["nodes"], 0);
    assert!(
        v["counters"].get("decrypt").is_none(),
        "no Noise message was read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_refuses_malformed_requests_and_reports_errors() {
    let a = start().await;
    let e = a
        .admin(AdminOp::NodeRevoke {
            node: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert!(format!("{e}").contains("no node named"), "{e}");
    // Raw garbage on the socket: a clear answer, not a hang or a crash.
    let path = a.dir.path().join(super::super::admin::SOCKET);
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.write_all(b"{\"op\":\"launch-missiles\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(answer.contains("malformed request"), "{answer}");
    // Still serving.
    assert!(a.admin(AdminOp::Status).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_set_shown_and_cleared_over_the_admin_socket() {
    use base64::Engine;
    use mesh_proto::firewall::policy::Policy;
    let a = start().await;
    let v = a.admin(AdminOp::PolicyShow).await.unwrap();
    assert!(v["policy"].is_null(), "{v}");
    let serial = v["serial"].as_u64().unwrap();
    let policy = Policy::from_toml(
        "[[rule]]\nname = \"web-to-db\"\naction = \"allow\"\nfrom = { groups = [\"web\"] }\n\
         to = { groups = [\"db\"] }\nproto = \"tcp\"\nports = [\"5432\"]\n",
    )
    .unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(policy.encode());
    let v = a
        .admin(AdminOp::PolicySet { policy: encoded })
        .await
        .unwrap();
    assert_eq!(v["serial"].as_u64(), Some(serial + 1), "{v}");
    assert_eq!(v["rules"], 1);
    assert_eq!(v["policy"]["rules"][0]["name"], "web-to-db");
    let back: Policy = serde_json::from_value(v["policy"].clone()).unwrap();
    assert_eq!(back, policy);
    let status = a.admin(AdminOp::Status).await.unwrap();
    assert_eq!(status["policy_rules"], 1);
    // Refused with the reason; nothing published.
    for bad in ["not base64!", "//8="] {
        let e = a
            .admin(AdminOp::PolicySet { policy: bad.into() })
            .await
            .unwrap_err();
        assert!(format!("{e}").contains("policy"), "{e}");
    }
    let v = a.admin(AdminOp::PolicyShow).await.unwrap();
    assert_eq!(v["serial"].as_u64(), Some(serial + 1));
    let v = a.admin(AdminOp::PolicyClear).await.unwrap();
    assert!(v["policy"].is_null(), "{v}");
    assert_eq!(v["serial"].as_u64(), Some(serial + 2));
}
