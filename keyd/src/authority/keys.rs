//! The authority's key files in its state directory.
//!
//! - `ca.crt`: the root CA certificate (public).
//! - `root.key`: the root CA key, only if the operator keeps it online (then
//!   the authority rolls its own signing key over by itself).
//! - `authority-<fingerprint>.key` / `.crt`: signing keys certified by the
//!   root; the roster names which one signs. A rollover adds a pair (never
//!   overwrites one) before the roster that names it is committed, so a
//!   crash at any point leaves the key the stored roster needs on disk.
//! - `noise.key`: the authority's Noise static key (join tokens pin it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mesh_proto::cert::CaCert;
use mesh_proto::cert::{AUTHORITY_BACKDATE, AuthorityCert};
use mesh_proto::identity::CaSigningKey;

use super::service::{AuthorityError, KeyFiles, SigningKey};
use crate::files;

pub const CA_CERT: &str = "ca.crt";
pub const ROOT_KEY: &str = "root.key";
pub const NOISE_KEY: &str = "noise.key";
const AUTHORITY_PREFIX: &str = "authority-";

/// Key files of the authority in `dir`.
pub struct DirKeyFiles {
    pub dir: PathBuf,
}

fn stem(cert: &AuthorityCert) -> String {
    format!("{AUTHORITY_PREFIX}{}", &cert.fingerprint().to_hex()[..16])
}

impl KeyFiles for DirKeyFiles {
    fn save(&mut self, key: &SigningKey) -> Result<(), AuthorityError> {
        save(&self.dir, key).map_err(|e| AuthorityError::KeyFile(format!("{e:#}")))
    }
}

/// A new signing key, certified by the root for `lifetime` seconds from
/// `now` (back-dated by [`AUTHORITY_BACKDATE`] for slow clocks, never before
/// the CA's own start, never past its end).
pub fn certify(
    ca: &CaCert,
    root: &CaSigningKey,
    now: u64,
    lifetime: u64,
) -> Result<SigningKey, AuthorityError> {
    let key = CaSigningKey::generate().map_err(|e| AuthorityError::Random(e.to_string()))?;
    let not_before = now
        .saturating_sub(AUTHORITY_BACKDATE)
        .max(ca.body().not_before);
    let not_after = now.saturating_add(lifetime).min(ca.body().not_after);
    let cert = ca.certify_authority(
        root,
        &format!("authority-{now}"),
        key.verifying_key(),
        not_before,
        not_after,
    )?;
    Ok(SigningKey { cert, key })
}

/// Writes a signing key pair: the key 0600, then the certificate.
pub fn save(dir: &Path, key: &SigningKey) -> Result<()> {
    let stem = stem(&key.cert);
    files::write_secret(&dir.join(format!("{stem}.key")), &key.key.to_text())?;
    files::write_document(&dir.join(format!("{stem}.crt")), &key.cert.to_text())?;
    Ok(())
}

/// Every signing key pair in `dir` that the root certified. A pair whose
/// certificate is another network's or whose key does not match is an error:
/// the operator must look.
pub fn load_all(dir: &Path, ca: &CaCert) -> Result<Vec<SigningKey>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name
            .strip_prefix(AUTHORITY_PREFIX)
            .and_then(|s| s.strip_suffix(".crt"))
        else {
            continue;
        };
        let cert = AuthorityCert::from_text(&files::read_text(&path)?, ca)
            .with_context(|| format!("authority certificate {}", path.display()))?;
        let key_path = dir.join(format!("{AUTHORITY_PREFIX}{stem}.key"));
        let key = CaSigningKey::from_text(&files::read_secret(&key_path)?)
            .with_context(|| format!("authority key {}", key_path.display()))?;
        if key.verifying_key() != cert.body().public_key {
            anyhow::bail!(
                "{} does not hold the key that {} certifies",
                key_path.display(),
                path.display()
            );
        }
        out.push(SigningKey { cert, key });
    }
    Ok(out)
}
