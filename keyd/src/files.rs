//! Reading and writing keyd's files. Private keys are created 0600 and a key
//! file that group or others can read is refused; every error names the file.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use mesh_proto::identity::check_private_key_mode;
use zeroize::Zeroizing;

/// Reads a private key file, refusing it if group or others may read it.
pub fn read_secret(path: &Path) -> Result<Zeroizing<String>> {
    let meta =
        fs::metadata(path).with_context(|| format!("cannot open key file {}", path.display()))?;
    check_private_key_mode(&path.display().to_string(), meta.permissions().mode())?;
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    Ok(Zeroizing::new(text))
}

/// Reads a public file (certificate, roster, public key).
pub fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Creates a private key file with mode 0600. Never overwrites: losing a key
/// by accident is worse than an error.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    create_new(path, contents, 0o600)
}

/// Creates a public key file (0644). Never overwrites, like [`write_secret`],
/// so a public key cannot drift from its private half.
pub fn write_public_key(path: &Path, contents: &str) -> Result<()> {
    create_new(path, contents, 0o644)
}

fn create_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key",
            path.display()
        );
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a public document (certificate, roster) atomically: a reader sees
/// the old file or the new one, never half of either.
pub fn write_document(path: &Path, contents: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, "secret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_secret(&p, "other").is_err());
        assert_eq!(&*read_secret(&p).unwrap(), "secret");
    }

    #[test]
    fn readable_key_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, "secret").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", read_secret(&p).unwrap_err());
        assert!(
            err.contains("chmod 600") && err.contains(&p.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = format!(
            "{:#}",
            read_text(Path::new("/nonexistent/roster")).unwrap_err()
        );
        assert!(err.contains("/nonexistent/roster"), "{err}");
    }

    #[test]
    fn documents_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("roster");
        write_document(&p, "one").unwrap();
        write_document(&p, "two").unwrap();
        assert_eq!(read_text(&p).unwrap(), "two");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
