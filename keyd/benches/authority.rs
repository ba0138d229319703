//! The authority's cost per change at 1,000 and 10,000 synthetic members
//! (bench/authority/run and bench/authority/README.md give the figures).
//!
//! * `roster/next_{add,revoke}/N`: the authority signs one change (one
//!   member added, one node revoked) into the next roster and its delta.
//! * `roster/apply_{add,revoke}/N`: a node applies that delta and verifies
//!   the result; `roster/snapshot/N`: a node verifies a whole roster (what a
//!   node that missed deltas gets). Delta and snapshot sizes are printed.
//! * `authority/{enroll,revoke}/N` (printed, timed by hand): 30 calls of
//!   `Authority::enroll` and of `Authority::revoke_node` over a RedbStore in
//!   a temporary directory, store commit (fsync) included.
//!
//! Members are synthetic: real keys, certificates issued by the authority's
//! signing key, made in memory rather than by `keyd join`.
//!
//! Populate mode (used by bench/authority/run, no benchmark runs): with
//! PQMESH_POPULATE=DIR (a `keyd authority init` state directory),
//! PQMESH_MEMBERS=N and PQMESH_POPULATE_MODE=enroll|bulk, N synthetic members
//! named member-1 .. member-N are added to DIR's store. `enroll` calls
//! Authority::enroll N times (one commit each, as N joins would); `bulk`
//! writes the same node records, token and roster (serial + 1) in one store
//! batch, because N enrollments cost O(N^2) store writes.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, SamplingMode};
use keyd::authority::keys::{self, DirKeyFiles};
use keyd::authority::pool::address_at;
use keyd::authority::service::{Authority, Params, SigningKey, TokenSpec};
use keyd::authority::store::{Batch, Meta, NodeRecord, RedbStore, Store, TokenRecord};
use keyd::authority::token::{JoinToken, TokenSecret};
use keyd::authority::wire::{Endpoints, JoinRequest};
use mesh_proto::cert::{AuthorityCert, CaCert, NodeCertRequest};
use mesh_proto::delta::{RosterChange, RosterDelta};
use mesh_proto::identity::{CaSigningKey, NodeId, NoisePrivateKey, WgPrivateKey};
use mesh_proto::roster::{Member, RevokedNode, Roster, RosterContent, Signer};

const DAY: u64 = 86_400;
const SIZES: [usize; 2] = [1_000, 10_000];

fn now() -> u64 {
    keyd::time::unix_now()
}

/// One synthetic machine: real keys, a name, underlay endpoints.
struct Machine {
    i: usize,
    wg: WgPrivateKey,
    noise: NoisePrivateKey,
}

fn machine(i: usize) -> Machine {
    Machine {
        i,
        wg: WgPrivateKey::generate().unwrap(),
        noise: NoisePrivateKey::generate().unwrap(),
    }
}

impl Machine {
    fn name(&self) -> String {
        format!("member-{}", self.i)
    }

    /// 198.18.0.0/15 (benchmarking addresses), one per member.
    fn underlay(&self, port: u16) -> SocketAddr {
        let i = self.i as u32;
        SocketAddr::from(([198, 18 + (i >> 16) as u8, (i >> 8) as u8, i as u8], port))
    }
}

fn params(pool_v4: &str, pool_v6: Option<&str>) -> Params {
    Params {
        cert_lifetime: 30 * DAY,
        roster_lifetime: 7 * DAY,
        authority_lifetime: 90 * DAY,
        pool_v4: pool_v4.parse().unwrap(),
        pool_v6: pool_v6.map(|p| p.parse().unwrap()),
        keep_deltas: 4096,
        endpoints: vec!["127.0.0.1:51830".parse().unwrap()],
    }
}

// ---- roster level ----------------------------------------------------------

struct Net {
    ca: CaCert,
    auth: AuthorityCert,
    auth_key: CaSigningKey,
}

fn net() -> Net {
    let t = now();
    let root = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&root, "root", "bench", t - DAY, t + 3650 * DAY).unwrap();
    let auth_key = CaSigningKey::generate().unwrap();
    let auth = ca
        .certify_authority(
            &root,
            "auth",
            auth_key.verifying_key(),
            t - DAY,
            t + 90 * DAY,
        )
        .unwrap();
    Net { ca, auth, auth_key }
}

impl Net {
    fn signer(&self) -> Signer<'_> {
        Signer::Authority(&self.auth, &self.auth_key)
    }

    fn member(&self, m: &Machine) -> Member {
        let t = now();
        let i = m.i as u32;
        let cert = self
            .auth
            .issue(
                &self.auth_key,
                NodeCertRequest {
                    name: m.name(),
                    addresses: vec![
                        format!("10.{}.{}.{}/10", 64 + (i >> 16), (i >> 8) & 255, i & 255)
                            .parse()
                            .unwrap(),
                    ],
                    groups: vec!["bench".into()],
                    attributes: Default::default(),
                    not_before: t - 60,
                    not_after: t + 30 * DAY,
                    wg_public: m.wg.public_key(),
                    noise_public: m.noise.public_key(),
                },
            )
            .unwrap();
        Member {
            cert,
            wg_endpoint: Some(m.underlay(51820)),
            keyd_endpoint: Some(m.underlay(51821)),
        }
    }

    fn roster(&self, n: usize) -> Roster {
        let t = now();
        let members = (1..=n).map(|i| self.member(&machine(i))).collect();
        let content = RosterContent {
            serial: 1,
            issued_at: t,
            not_after: t + 7 * DAY,
            authorities: vec![self.auth.clone()],
            members,
            ..RosterContent::default()
        };
        Roster::sign(&self.ca, &self.signer(), &content).unwrap()
    }

    fn next(&self, r: &Roster, change: &RosterChange) -> (Roster, RosterDelta) {
        let t = now();
        r.next(&self.ca, &self.signer(), change, t, t + 7 * DAY)
            .unwrap()
    }
}

fn revoke_change(r: &Roster, at: usize) -> RosterChange {
    let c = r.members()[at].cert.body();
    RosterChange {
        remove: vec![c.node_id],
        revoke_nodes: vec![RevokedNode {
            node_id: c.node_id,
            wg_public: c.wg_public,
            noise_public: c.noise_public,
        }],
        ..RosterChange::default()
    }
}

fn roster_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("roster");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for n in SIZES {
        let net = net();
        let r = net.roster(n);
        let add = RosterChange {
            upsert: vec![net.member(&machine(n + 1))],
            ..RosterChange::default()
        };
        let revoke = revoke_change(&r, n / 2);
        let (after_add, d_add) = net.next(&r, &add);
        let (after_revoke, d_revoke) = net.next(&r, &revoke);
        println!(
            "sizes N={n}: snapshot {} B before, {} B after the add; delta add {} B, delta revoke {} B",
            r.to_bytes().len(),
            after_add.to_bytes().len(),
            d_add.to_bytes().len(),
            d_revoke.to_bytes().len()
        );
        assert_eq!(
            r.apply(&d_add, &net.ca).unwrap().to_bytes(),
            after_add.to_bytes()
        );
        assert_eq!(
            r.apply(&d_revoke, &net.ca).unwrap().to_bytes(),
            after_revoke.to_bytes()
        );
        g.bench_function(format!("next_add/{n}"), |b| {
            b.iter(|| black_box(net.next(&r, &add)))
        });
        g.bench_function(format!("next_revoke/{n}"), |b| {
            b.iter(|| black_box(net.next(&r, &revoke)))
        });
        g.bench_function(format!("apply_add/{n}"), |b| {
            b.iter(|| black_box(r.apply(&d_add, &net.ca).unwrap()))
        });
        g.bench_function(format!("apply_revoke/{n}"), |b| {
            b.iter(|| black_box(r.apply(&d_revoke, &net.ca).unwrap()))
        });
        let snapshot = after_add.to_bytes();
        g.bench_function(format!("snapshot/{n}"), |b| {
            b.iter(|| black_box(Roster::from_bytes(&snapshot, &net.ca).unwrap()))
        });
    }
    g.finish();
}

// ---- authority over its store ---------------------------------------------

/// The signing key the stored roster names, from DIR's key files.
fn signing_key(dir: &Path, ca: &CaCert, roster: &Roster) -> SigningKey {
    keys::load_all(dir, ca)
        .unwrap()
        .into_iter()
        .find(|k| k.cert.fingerprint() == roster.signer())
        .unwrap()
}

fn open(dir: &Path, ca: &CaCert, p: &Params) -> Authority {
    let store = RedbStore::open(&dir.join("store.redb")).unwrap();
    let noise =
        NoisePrivateKey::from_text(&keyd::files::read_secret(&dir.join(keys::NOISE_KEY)).unwrap())
            .unwrap();
    Authority::open(
        Box::new(store),
        Box::new(DirKeyFiles {
            dir: dir.to_path_buf(),
        }),
        ca.clone(),
        None,
        keys::load_all(dir, ca).unwrap(),
        noise.public_key(),
        p.clone(),
        now(),
    )
    .unwrap()
}

fn token_spec(uses: u32) -> TokenSpec {
    TokenSpec {
        lifetime: 30 * DAY,
        uses,
        groups: vec!["bench".into()],
        attributes: vec![],
        name_pattern: None,
    }
}

fn join_request(token: &JoinToken, m: &Machine) -> JoinRequest {
    JoinRequest {
        token_id: token.id,
        token_secret: token.secret.clone(),
        name: m.name(),
        wg_public: m.wg.public_key(),
        endpoints: Endpoints {
            wg: Some(m.underlay(51820)),
            keyd: Some(m.underlay(51821)),
        },
    }
}

/// Members `first ..= first + n - 1` through Authority::enroll, one commit each.
fn populate_enroll(a: &mut Authority, first: usize, n: usize) {
    let (token, _) = a.create_token(token_spec(n as u32), now()).unwrap();
    let started = Instant::now();
    let mut last = Instant::now();
    for i in first..first + n {
        let m = machine(i);
        a.enroll(
            &join_request(&token, &m),
            m.noise.public_key(),
            m.underlay(40000),
            now(),
        )
        .unwrap();
        if i % 1000 == 0 || i == first + n - 1 {
            eprintln!(
                "populate: {i} members, {:.1} s, last enroll {:.1} ms",
                started.elapsed().as_secs_f64(),
                last.elapsed().as_secs_f64() * 1e3
            );
        }
        last = Instant::now();
    }
}

/// Members `1 ..= n` written in one batch: the records, token and roster
/// that n enrollments would leave (the roster's serial goes up by one).
fn populate_bulk(dir: &Path, ca: &CaCert, p: &Params, n: usize) {
    let t = now();
    let mut store = RedbStore::open(&dir.join("store.redb")).unwrap();
    let meta = store.load().unwrap().meta.unwrap();
    let roster = Roster::from_bytes(&meta.roster, ca).unwrap();
    let signer = signing_key(dir, ca, &roster);
    let secret = TokenSecret::generate().unwrap();
    let token = TokenRecord {
        id: "b0b0b0b0b0b0b0b0".into(),
        secret_hash: secret.hash(),
        created_at: t,
        expires_at: t + DAY,
        max_uses: n as u32,
        uses: n as u32,
        groups: vec!["bench".into()],
        attributes: vec![],
        name_pattern: None,
        revoked_at: None,
    };
    let mut records = Vec::with_capacity(n);
    let mut members = Vec::with_capacity(n);
    for i in 1..=n {
        let m = machine(i);
        let k = (i - 1) as u64;
        let mut addresses = vec![address_at(&p.pool_v4, meta.next_v4 + k).unwrap()];
        if let Some(v6) = &p.pool_v6 {
            addresses.push(address_at(v6, meta.next_v6 + k).unwrap());
        }
        let cert = signer
            .cert
            .issue(
                &signer.key,
                NodeCertRequest {
                    name: m.name(),
                    addresses: addresses.clone(),
                    groups: token.groups.clone(),
                    attributes: Default::default(),
                    not_before: t - 60,
                    not_after: (t + p.cert_lifetime).min(signer.cert.body().not_after),
                    wg_public: m.wg.public_key(),
                    noise_public: m.noise.public_key(),
                },
            )
            .unwrap();
        let id = NodeId::derive(&m.wg.public_key(), &m.noise.public_key());
        records.push(NodeRecord {
            node_id: id.0,
            name: m.name(),
            wg_public: m.wg.public_key().0,
            noise_public: m.noise.public_key().0,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            groups: token.groups.clone(),
            attributes: vec![],
            wg_endpoint: Some(m.underlay(51820)),
            keyd_endpoint: Some(m.underlay(51821)),
            observed_addr: Some(m.underlay(40000)),
            enrolled_at: t,
            token_id: token.id.clone(),
            cert: cert.to_bytes(),
            revoked_at: None,
        });
        members.push(Member {
            cert,
            wg_endpoint: Some(m.underlay(51820)),
            keyd_endpoint: Some(m.underlay(51821)),
        });
    }
    let change = RosterChange {
        upsert: members,
        ..RosterChange::default()
    };
    let s = Signer::Authority(&signer.cert, &signer.key);
    let (next, delta) = roster
        .next(ca, &s, &change, t, t + p.roster_lifetime)
        .unwrap();
    store
        .commit(&Batch {
            expect_serial: Some(meta.serial),
            meta: Meta {
                network_id: meta.network_id.clone(),
                serial: next.serial(),
                roster: next.to_bytes(),
                next_v4: meta.next_v4 + n as u64,
                next_v6: meta.next_v6 + p.pool_v6.map_or(0, |_| n as u64),
            },
            put_tokens: vec![token],
            put_nodes: records,
            deltas: vec![(next.serial(), delta.to_bytes())],
            keep_deltas: p.keep_deltas,
        })
        .unwrap();
}

/// A fresh authority state in a temporary directory with `n` members.
fn authority_with(n: usize) -> (tempfile::TempDir, Authority) {
    let dir = tempfile::tempdir().unwrap();
    let t = now();
    let root = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&root, "root", "bench", t - DAY, t + 3650 * DAY).unwrap();
    let key = CaSigningKey::generate().unwrap();
    let cert = ca
        .certify_authority(&root, "auth", key.verifying_key(), t - DAY, t + 90 * DAY)
        .unwrap();
    keys::save(dir.path(), &SigningKey { cert, key }).unwrap();
    keyd::files::write_secret(
        &dir.path().join(keys::NOISE_KEY),
        &NoisePrivateKey::generate().unwrap().to_text(),
    )
    .unwrap();
    let p = params("10.64.0.0/10", Some("fd64::/64"));
    drop(open(dir.path(), &ca, &p)); // the first roster (serial 1)
    populate_bulk(dir.path(), &ca, &p, n);
    let a = open(dir.path(), &ca, &p);
    (dir, a)
}

/// Median and max of `samples` (ms).
fn spread(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    format!(
        "median {median:.2} ms, max {max:.2} ms (n={})",
        samples.len()
    )
}

/// Timed by hand rather than by criterion: each call changes the state
/// (one more member, one more revocation), so a fixed, small number of
/// calls keeps the membership at N (+ OPS) instead of drifting with
/// criterion's iteration count. Each kind starts on a fresh store.
fn authority_benches() {
    const OPS: usize = 30;
    for n in SIZES {
        let (_dir, mut a) = authority_with(n);
        let (token, _) = a.create_token(token_spec(OPS as u32), now()).unwrap();
        let mut times = Vec::with_capacity(OPS);
        let mut delta = 0;
        for i in 0..OPS {
            let m = machine(n + 1 + i);
            let req = join_request(&token, &m);
            let t = Instant::now();
            let e = a
                .enroll(&req, m.noise.public_key(), m.underlay(40000), now())
                .unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            delta = e.published.map_or(0, |p| p.delta.len());
        }
        println!(
            "authority/enroll/{n}: {} over a RedbStore, commit included; delta {delta} B, snapshot {} B",
            spread(times),
            a.roster().to_bytes().len()
        );
        drop(a);
        let (_dir, mut a) = authority_with(n);
        let ids: Vec<NodeId> = a
            .roster()
            .members()
            .iter()
            .take(OPS)
            .map(|m| m.cert.body().node_id)
            .collect();
        let mut times = Vec::with_capacity(OPS);
        for id in &ids {
            let t = Instant::now();
            let p = a.revoke_node(id, now()).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            delta = p.map_or(0, |p| p.delta.len());
        }
        println!(
            "authority/revoke/{n}: {} over a RedbStore, commit included; delta {delta} B, snapshot {} B",
            spread(times),
            a.roster().to_bytes().len()
        );
    }
}

/// bench/authority/run's populate mode (see the module comment).
fn populate(dir: &Path) {
    let n: usize = std::env::var("PQMESH_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mode = std::env::var("PQMESH_POPULATE_MODE").unwrap_or_else(|_| "enroll".into());
    let ca = keyd::cli::load_ca_cert(&dir.join(keys::CA_CERT)).unwrap();
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("authority.toml")).unwrap()).unwrap();
    let p = params(
        config["pool_v4"].as_str().unwrap(),
        config.get("pool_v6").and_then(|v| v.as_str()),
    );
    match mode.as_str() {
        "bulk" => populate_bulk(dir, &ca, &p, n),
        _ => populate_enroll(&mut open(dir, &ca, &p), 1, n),
    }
}

fn main() {
    if let Some(dir) = std::env::var_os("PQMESH_POPULATE") {
        populate(Path::new(&dir));
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    roster_benches(&mut c);
    c.final_summary();
    authority_benches();
}
