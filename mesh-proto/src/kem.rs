//! ML-KEM-1024 (FIPS 203) for snow's `hfs` KEM slot, backed by libcrux-ml-kem.
//!
//! snow's pattern grammar only knows the name `Kyber1024`, so the protocol
//! name hashed into the handshake is `Noise_XXhfs_25519+Kyber1024_...`; the
//! algorithm behind that name here is ML-KEM-1024, and the prologue (see
//! [`crate::exchange::prologue`]) says so explicitly. snow's stock provider,
//! pqcrypto-kyber 0.8.1, is unmaintained (RUSTSEC-2024-0381) and is kept only
//! as a test-time interop reference.
//!
//! libcrux is formally verified and picks its AVX2 code path at run time.
//! Why libcrux over RustCrypto's ml-kem: `docs/dependencies.md`.
//!
//! The resolver also supplies X25519 ([`X25519`]): snow 0.10's own holds the
//! Noise static and ephemeral private keys in plain arrays that are never
//! wiped; ours keeps them in x25519-dalek's `StaticSecret`, wiped on drop.

use libcrux_ml_kem::mlkem1024::{self, MlKem1024Ciphertext, MlKem1024PublicKey};
use libcrux_ml_kem::{ENCAPS_SEED_SIZE, KEY_GENERATION_SEED_SIZE, SHARED_SECRET_SIZE};
use snow::params::{CipherChoice, DHChoice, HashChoice, KemChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Kem, Random};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

pub const PUBLIC_KEY_LEN: usize = 1568;
pub const CIPHERTEXT_LEN: usize = 1568;

/// Resolves the KEM to ML-KEM-1024 and X25519 to [`X25519`]; everything
/// else to nothing (chain it in front of snow's default resolver with
/// [`resolver`]).
#[derive(Default)]
pub struct PqmeshResolver;

impl CryptoResolver for PqmeshResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::<X25519>::default()),
            _ => None,
        }
    }
    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
    fn resolve_kem(&self, choice: &KemChoice) -> Option<Box<dyn Kem>> {
        match choice {
            KemChoice::Kyber1024 => Some(Box::new(MlKem1024::default())),
        }
    }
}

/// The resolver pqmesh uses: ML-KEM-1024 from libcrux, X25519 that wipes its
/// private key, and snow's defaults (ChaChaPoly, BLAKE2s, OS randomness) for
/// the rest.
pub fn resolver() -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(PqmeshResolver),
        Box::new(DefaultResolver),
    ))
}

/// X25519 for snow, computing exactly what snow's own `Dh25519` computes
/// (raw private bytes, clamped at use), but holding the private key in a
/// `StaticSecret`, which zeroizes itself on drop.
pub struct X25519 {
    secret: StaticSecret,
    public: [u8; 32],
}

impl Default for X25519 {
    fn default() -> Self {
        Self {
            secret: StaticSecret::from([0u8; 32]),
            public: [0u8; 32],
        }
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        // snow's builder hands over exactly 32 bytes; copy what there is, as
        // snow's own implementation does, without panicking on less.
        let mut bytes = Zeroizing::new([0u8; 32]);
        let n = privkey.len().min(32);
        bytes[..n].copy_from_slice(&privkey[..n]);
        self.secret = StaticSecret::from(*bytes);
        self.public = PublicKey::from(&self.secret).to_bytes();
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(bytes.as_mut())?;
        self.set(bytes.as_ref());
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let (Some(theirs), Some(out)) = (pubkey.first_chunk::<32>(), out.first_chunk_mut::<32>())
        else {
            return Err(snow::Error::Dh);
        };
        let shared = self.secret.diffie_hellman(&PublicKey::from(*theirs));
        out.copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

/// An ML-KEM-1024 key pair kept *unpacked* (with the expanded matrix A), so
/// that decapsulation does not regenerate A: the initiator always decapsulates
/// with the key pair it generated moments before. Measured here: decapsulation
/// 12.2 us unpacked against 25.2 us packed (docs/performance.md).
enum KeyPair {
    #[cfg(target_arch = "x86_64")]
    Avx2(Box<mlkem1024::avx2::unpacked::MlKem1024KeyPairUnpacked>),
    Portable(Box<mlkem1024::portable::unpacked::MlKem1024KeyPairUnpacked>),
}

/// The AVX2 code may only run on a CPU that has AVX2.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl KeyPair {
    fn generate(seed: [u8; KEY_GENERATION_SEED_SIZE]) -> (Self, [u8; PUBLIC_KEY_LEN]) {
        Self::generate_on(seed, has_avx2())
    }

    fn generate_on(
        seed: [u8; KEY_GENERATION_SEED_SIZE],
        avx2: bool,
    ) -> (Self, [u8; PUBLIC_KEY_LEN]) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            use mlkem1024::avx2::unpacked as u;
            let kp = Box::new(u::generate_key_pair(seed));
            let pk = u::key_pair_serialized_public_key(&kp);
            return (KeyPair::Avx2(kp), *pk.as_slice());
        }
        let _ = avx2;
        use mlkem1024::portable::unpacked as u;
        let kp = Box::new(u::generate_key_pair(seed));
        let pk = u::key_pair_serialized_public_key(&kp);
        (KeyPair::Portable(kp), *pk.as_slice())
    }

    fn decapsulate(&self, ct: &MlKem1024Ciphertext) -> [u8; SHARED_SECRET_SIZE] {
        match self {
            #[cfg(target_arch = "x86_64")]
            KeyPair::Avx2(kp) => mlkem1024::avx2::unpacked::decapsulate(kp, ct),
            KeyPair::Portable(kp) => mlkem1024::portable::unpacked::decapsulate(kp, ct),
        }
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        // libcrux's key types do not zeroize; overwrite the secret key in
        // place. The volatile write keeps the compiler from eliding it.
        // SAFETY: each pointer is a valid, exclusively borrowed, initialised
        // value of its type, and the old value has no drop glue to skip.
        match self {
            #[cfg(target_arch = "x86_64")]
            KeyPair::Avx2(kp) => unsafe { std::ptr::write_volatile(&mut **kp, Default::default()) },
            KeyPair::Portable(kp) => unsafe {
                std::ptr::write_volatile(&mut **kp, Default::default())
            },
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// One side's ephemeral ML-KEM-1024 state inside a snow handshake.
#[derive(Default)]
pub struct MlKem1024 {
    keypair: Option<(KeyPair, [u8; PUBLIC_KEY_LEN])>,
}

impl Kem for MlKem1024 {
    fn name(&self) -> &'static str {
        "Kyber1024"
    }

    fn pub_len(&self) -> usize {
        PUBLIC_KEY_LEN
    }

    fn ciphertext_len(&self) -> usize {
        CIPHERTEXT_LEN
    }

    fn shared_secret_len(&self) -> usize {
        SHARED_SECRET_SIZE
    }

    fn generate(&mut self, rng: &mut dyn Random) {
        let mut seed = Zeroizing::new([0u8; KEY_GENERATION_SEED_SIZE]);
        // snow's trait gives no way to report a failed generator here. If the
        // OS generator fails, the seed stays zero; refuse to use it, leaving no
        // key pair, so `pubkey()` is empty and snow fails the message.
        if rng.try_fill_bytes(seed.as_mut()).is_err() {
            self.keypair = None;
            return;
        }
        self.keypair = Some(KeyPair::generate(*seed));
    }

    fn pubkey(&self) -> &[u8] {
        self.keypair.as_ref().map_or(&[][..], |(_, pk)| &pk[..])
    }

    fn encapsulate(
        &self,
        pubkey: &[u8],
        shared_secret_out: &mut [u8],
        ciphertext_out: &mut [u8],
    ) -> Result<(usize, usize), snow::Error> {
        let public = MlKem1024PublicKey::try_from(pubkey).map_err(|_| snow::Error::Kem)?;
        // FIPS 203 section 7.2: check the encapsulation key before use.
        if !mlkem1024::validate_public_key(&public) {
            return Err(snow::Error::Kem);
        }
        if shared_secret_out.len() < SHARED_SECRET_SIZE || ciphertext_out.len() < CIPHERTEXT_LEN {
            return Err(snow::Error::Kem);
        }
        let mut randomness = Zeroizing::new([0u8; ENCAPS_SEED_SIZE]);
        getrandom::fill(randomness.as_mut()).map_err(|_| snow::Error::Kem)?;
        let (ciphertext, shared) = mlkem1024::encapsulate(&public, *randomness);
        let shared = Zeroizing::new(shared);
        shared_secret_out[..SHARED_SECRET_SIZE].copy_from_slice(shared.as_ref());
        ciphertext_out[..CIPHERTEXT_LEN].copy_from_slice(ciphertext.as_ref());
        Ok((SHARED_SECRET_SIZE, CIPHERTEXT_LEN))
    }

    fn decapsulate(
        &self,
        ciphertext: &[u8],
        shared_secret_out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let (keypair, _) = self.keypair.as_ref().ok_or(snow::Error::Kem)?;
        let ciphertext = MlKem1024Ciphertext::try_from(ciphertext).map_err(|_| snow::Error::Kem)?;
        if shared_secret_out.len() < SHARED_SECRET_SIZE {
            return Err(snow::Error::Kem);
        }
        let shared = Zeroizing::new(keypair.decapsulate(&ciphertext));
        shared_secret_out[..SHARED_SECRET_SIZE].copy_from_slice(shared.as_ref());
        Ok(SHARED_SECRET_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OsRandom;
    impl Random for OsRandom {
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
            getrandom::fill(dest).map_err(|_| snow::Error::Rng)
        }
    }

    #[test]
    fn encapsulate_decapsulate_agree() {
        let mut alice = MlKem1024::default();
        alice.generate(&mut OsRandom);
        let bob = MlKem1024::default();
        let (mut ss_b, mut ct) = ([0u8; 32], [0u8; CIPHERTEXT_LEN]);
        assert_eq!(
            bob.encapsulate(alice.pubkey(), &mut ss_b, &mut ct).unwrap(),
            (32, CIPHERTEXT_LEN)
        );
        let mut ss_a = [0u8; 32];
        alice.decapsulate(&ct, &mut ss_a).unwrap();
        assert_eq!(ss_a, ss_b);
        assert_ne!(ss_a, [0; 32]);
    }

    #[test]
    fn avx2_and_portable_backends_agree() {
        let (portable, pk_p) = KeyPair::generate_on([3; 64], false);
        let (native, pk_n) = KeyPair::generate_on([3; 64], has_avx2());
        assert_eq!(pk_p, pk_n);
        let pk = MlKem1024PublicKey::from(pk_p);
        let (ct, ss) = mlkem1024::encapsulate(&pk, [5; 32]);
        assert_eq!(portable.decapsulate(&ct), ss);
        assert_eq!(native.decapsulate(&ct), ss);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7748 section 6.1, through snow's `Dh` trait as the handshake uses it.
    #[test]
    fn x25519_matches_rfc7748() {
        let resolve = || PqmeshResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let (mut alice, mut bob) = (resolve(), resolve());
        alice.set(&unhex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        bob.set(&unhex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.pubkey(),
            unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            bob.pubkey(),
            unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let shared = unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        let mut out = [0u8; 32];
        alice.dh(bob.pubkey(), &mut out).unwrap();
        assert_eq!(out.as_slice(), shared);
        bob.dh(alice.pubkey(), &mut out).unwrap();
        assert_eq!(out.as_slice(), shared);
        assert_eq!(alice.privkey()[0], 0x77, "raw bytes kept, as snow's own");
        assert!(alice.dh(&[9; 31], &mut out).is_err());
        assert!(alice.dh(bob.pubkey(), &mut [0u8; 31]).is_err());
        assert_eq!(alice.name(), "25519");
        assert_eq!((alice.pub_len(), alice.priv_len()), (32, 32));
    }

    #[test]
    fn x25519_generates_from_the_rng() {
        let mut a = X25519::default();
        a.generate(&mut OsRandom).unwrap();
        assert_ne!(a.privkey(), [0u8; 32]);
        let mut again = X25519::default();
        again.set(a.privkey());
        assert_eq!(again.pubkey(), a.pubkey());
    }

    #[test]
    fn refuses_bad_lengths_and_invalid_keys() {
        let kem = MlKem1024::default();
        let (mut ss, mut ct) = ([0u8; 32], [0u8; CIPHERTEXT_LEN]);
        assert!(kem.encapsulate(&[0; 10], &mut ss, &mut ct).is_err());
        // Coefficients >= q fail the FIPS 203 modulus check.
        assert!(
            kem.encapsulate(&[0xff; PUBLIC_KEY_LEN], &mut ss, &mut ct)
                .is_err()
        );
        assert!(kem.decapsulate(&ct, &mut ss).is_err(), "no key pair yet");
    }
}
