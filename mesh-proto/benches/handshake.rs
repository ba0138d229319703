//! Handshake cost, measured side by side in one run (see bench/handshake.sh
//! for the ratios and docs/performance.md for recorded figures):
//!
//! * `handshake/classic_xx`: Noise_XX_25519_ChaChaPoly_BLAKE2s, both sides.
//! * `handshake/hybrid_xxhfs_mlkem1024`: the same with hfs and libcrux ML-KEM-1024.
//! * `handshake/hybrid_xxhfs_pqcrypto_kyber`: hfs with snow's stock
//!   (unmaintained) pqcrypto-kyber, as a reference only.
//! * `handshake/pqmesh_exchange`: pqmesh's whole exchange: the hybrid
//!   handshake plus certificates, every zero-trust check, PSK derivation and
//!   the key confirmation message.
//! * `kem/*`: ML-KEM-1024 keygen + encapsulate + decapsulate: pqmesh's KEM as
//!   snow calls it (libcrux, unpacked key pair, key validation, OS randomness),
//!   libcrux's packed API, RustCrypto's ml-kem, and pqcrypto-kyber (reference).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_proto::cert::{CaCert, NodeCertRequest};
use mesh_proto::exchange::{
    DEFAULT_TIMEOUT, Event, Exchange, ExchangeParams, LocalIdentity, NOISE_PARAMS, PeerEpochs,
    prologue,
};
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
use mesh_proto::kem;
use mesh_proto::roster::{Member, Roster};
use mesh_proto::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver};

const NOW: u64 = 1_800_000_000;

/// One full handshake, both sides, on this thread.
fn snow_handshake(params: &str, resolver: fn() -> BoxedCryptoResolver, ki: &[u8], kr: &[u8]) {
    let p: snow::params::NoiseParams = params.parse().unwrap();
    let pro = prologue("bench");
    let mut i = snow::Builder::with_resolver(p.clone(), resolver())
        .local_private_key(ki)
        .unwrap()
        .prologue(&pro)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::with_resolver(p, resolver())
        .local_private_key(kr)
        .unwrap()
        .prologue(&pro)
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut buf, mut out) = ([0u8; 4096], [0u8; 4096]);
    let n = i.write_message(&[], &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    let n = r.write_message(&[], &mut buf).unwrap();
    i.read_message(&buf[..n], &mut out).unwrap();
    let n = i.write_message(&[], &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    black_box((i.dangerously_get_raw_split(), r.dangerously_get_raw_split()));
}

fn stock() -> BoxedCryptoResolver {
    Box::new(DefaultResolver)
}

struct Pair {
    a: ExchangeParams,
    b: ExchangeParams,
}

fn pair() -> Pair {
    let key = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&key, "ca", "bench", NOW - 10, NOW + 1_000_000).unwrap();
    let ident = |name: &str, addr: &str| {
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let cert = ca
            .issue(
                &key,
                NodeCertRequest {
                    name: name.into(),
                    addresses: vec![addr.parse().unwrap()],
                    groups: vec!["web".into()],
                    attributes: Default::default(),
                    not_before: NOW - 10,
                    not_after: NOW + 1000,
                    wg_public: wg.public_key(),
                    noise_public: noise.public_key(),
                },
            )
            .unwrap();
        Arc::new(LocalIdentity {
            cert,
            noise_key: noise,
        })
    };
    let (ia, ib) = (ident("a", "10.0.0.1/24"), ident("b", "10.0.0.2/24"));
    let members = [&ia, &ib]
        .iter()
        .map(|i| Member {
            cert: i.cert.clone(),
            wg_endpoint: None,
            keyd_endpoint: None,
        })
        .collect();
    let roster = Arc::new(Roster::build(&ca, &key, 1, NOW, NOW + 86_400, members, vec![]).unwrap());
    let ca = Arc::new(ca);
    let params = |me: &Arc<LocalIdentity>, peer: Option<&Arc<LocalIdentity>>| ExchangeParams {
        identity: me.clone(),
        trust: Trust {
            ca: ca.clone(),
            roster: roster.clone(),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: me.node_id(),
        },
        timeout: DEFAULT_TIMEOUT,
        last_epoch: 0,
        peer_epochs: PeerEpochs::default(),
        expected_peer: peer.map(|p| p.node_id()),
        channel_binding: Vec::new(),
    };
    Pair {
        a: params(&ia, Some(&ib)),
        b: params(&ib, None),
    }
}

fn pqmesh_exchange(p: &Pair) {
    let now = Instant::now();
    let mut i = Exchange::initiate(p.a.clone(), now, NOW).unwrap();
    let mut r = Exchange::respond(p.b.clone(), now, NOW).unwrap();
    for _ in 0..2 {
        while let Some(m) = i.poll_transmit() {
            r.receive(&m, now);
        }
        while let Some(m) = r.poll_transmit() {
            i.receive(&m, now);
        }
    }
    let ok = matches!(i.poll_event(), Some(Event::Established(_)))
        && matches!(r.poll_event(), Some(Event::Established(_)));
    assert!(ok, "exchange must succeed");
}

fn handshakes(c: &mut Criterion) {
    let ki = NoisePrivateKey::generate().unwrap();
    let kr = NoisePrivateKey::generate().unwrap();
    let (ki, kr) = (ki.0.as_bytes(), kr.0.as_bytes());
    let mut g = c.benchmark_group("handshake");
    g.bench_function("classic_xx", |b| {
        b.iter(|| snow_handshake("Noise_XX_25519_ChaChaPoly_BLAKE2s", stock, ki, kr))
    });
    g.bench_function("hybrid_xxhfs_mlkem1024", |b| {
        b.iter(|| snow_handshake(NOISE_PARAMS, kem::resolver, ki, kr))
    });
    g.bench_function("hybrid_xxhfs_pqcrypto_kyber", |b| {
        b.iter(|| snow_handshake(NOISE_PARAMS, stock, ki, kr))
    });
    let p = pair();
    g.bench_function("pqmesh_exchange", |b| b.iter(|| pqmesh_exchange(&p)));
    g.finish();
}

fn kems(c: &mut Criterion) {
    use libcrux_ml_kem::mlkem1024;
    use ml_kem::{Decapsulate, FromSeed, MlKem1024};
    use snow::types::{Kem, Random};
    struct Os;
    impl Random for Os {
        fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), snow::Error> {
            getrandom::fill(d).map_err(|_| snow::Error::Rng)
        }
    }
    let mut g = c.benchmark_group("kem");
    g.bench_function("pqmesh_kem", |b| {
        b.iter(|| {
            let mut alice = kem::MlKem1024::default();
            alice.generate(&mut Os);
            let bob = kem::MlKem1024::default();
            let (mut s1, mut s2, mut ct) = ([0u8; 32], [0u8; 32], [0u8; kem::CIPHERTEXT_LEN]);
            bob.encapsulate(alice.pubkey(), &mut s1, &mut ct).unwrap();
            alice.decapsulate(&ct, &mut s2).unwrap();
            assert_eq!(s1, s2);
        })
    });
    g.bench_function("libcrux_ml_kem_1024", |b| {
        b.iter(|| {
            let kp = mlkem1024::generate_key_pair(black_box([7; 64]));
            let (ct, ss) = mlkem1024::encapsulate(kp.public_key(), black_box([9; 32]));
            let ss2 = mlkem1024::decapsulate(kp.private_key(), &ct);
            assert_eq!(ss, ss2);
        })
    });
    g.bench_function("rustcrypto_ml_kem_1024", |b| {
        b.iter(|| {
            let seed = ml_kem::Seed::from(black_box([7u8; 64]));
            let (dk, ek) = MlKem1024::from_seed(&seed);
            let m = ml_kem::B32::from(black_box([9u8; 32]));
            let (ct, ss) = ek.encapsulate_deterministic(&m);
            assert_eq!(ss, dk.decapsulate(&ct));
        })
    });
    g.bench_function("pqcrypto_kyber1024", |b| {
        use pqcrypto_kyber::kyber1024;
        b.iter(|| {
            let (pk, sk) = kyber1024::keypair();
            let (ss, ct) = kyber1024::encapsulate(&pk);
            assert!(kyber1024::decapsulate(&ct, &sk) == ss);
        })
    });
    g.finish();
}

criterion_group!(benches, handshakes, kems);
criterion_main!(benches);
