//! Reading and writing keyd's files. Private keys are created 0600 and a key
//! file that group or others can read is refused; every error names the file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mesh_proto::identity::{check_private_key_mode, random_bytes};
use zeroize::{Zeroize, Zeroizing};

/// The largest private key file keyd reads. Its keys are a few hundred bytes;
/// the cap bounds the buffer and keeps it from ever being reallocated (a
/// reallocation would leave an unwiped copy of the secret behind).
pub const SECRET_MAX_BYTES: u64 = 64 * 1024;

/// Why a private key file was refused (the root cause of [`read_secret`]'s
/// error; reach it with `downcast_ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFileRefusal {
    /// The path is a symbolic link: whoever can plant a link in the key
    /// directory could otherwise make keyd use a key of their choosing.
    Symlink { path: PathBuf },
    /// A directory, FIFO, device or socket.
    NotRegular { path: PathBuf },
    /// Owned by a user other than the one keyd runs as.
    WrongOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    /// Larger than [`SECRET_MAX_BYTES`].
    TooLarge { path: PathBuf },
    /// Not UTF-8 text.
    NotText { path: PathBuf },
}

impl fmt::Display for SecretFileRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Symlink { path } => write!(
                f,
                "key file {} is a symbolic link; name the key file itself",
                path.display()
            ),
            Self::NotRegular { path } => {
                write!(f, "key file {} is not a regular file", path.display())
            }
            Self::WrongOwner { path, owner, euid } => write!(
                f,
                "key file {} is owned by uid {owner}, not by uid {euid} that keyd runs as; \
                 a private key must belong to its user: run `chown {euid} {}`",
                path.display(),
                path.display()
            ),
            Self::TooLarge { path } => write!(
                f,
                "key file {} is larger than {SECRET_MAX_BYTES} bytes; it is not a key",
                path.display()
            ),
            Self::NotText { path } => write!(f, "key file {} is not UTF-8 text", path.display()),
        }
    }
}

impl std::error::Error for SecretFileRefusal {}

/// Reads a private key file. The file is opened once, without following a
/// symbolic link, and every check is made on the open descriptor (no window
/// between check and read): it must be a regular file, owned by the effective
/// user, and not readable or writable by group or others.
pub fn read_secret(path: &Path) -> Result<Zeroizing<String>> {
    let refuse = |r: SecretFileRefusal| Err(anyhow::Error::new(r));
    let file = match OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a planted FIFO must not hang keyd; the
        // descriptor is refused below as not a regular file.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return refuse(SecretFileRefusal::Symlink { path: path.into() });
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open key file {}", path.display()));
        }
    };
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    if !meta.file_type().is_file() {
        return refuse(SecretFileRefusal::NotRegular { path: path.into() });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return refuse(SecretFileRefusal::WrongOwner {
            path: path.into(),
            owner: meta.uid(),
            euid,
        });
    }
    check_private_key_mode(&path.display().to_string(), meta.permissions().mode())?;
    if meta.len() > SECRET_MAX_BYTES {
        return refuse(SecretFileRefusal::TooLarge { path: path.into() });
    }
    let bytes = read_bounded(file, SECRET_MAX_BYTES as usize)
        .with_context(|| format!("cannot read key file {}", path.display()))?
        .ok_or_else(|| SecretFileRefusal::TooLarge { path: path.into() })?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            refuse(SecretFileRefusal::NotText { path: path.into() })
        }
    }
}

/// Reads at most `max` bytes into one buffer allocated up front and never
/// grown, wiping it on every path that does not hand it to the caller.
/// `None`: the file holds more than `max` bytes.
fn read_bounded(mut file: File, max: usize) -> io::Result<Option<Vec<u8>>> {
    // One byte more than allowed, to tell "exactly max" from "more".
    let mut buf = Zeroizing::new(vec![0u8; max + 1]);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if len > max {
        return Ok(None);
    }
    buf[len..].zeroize();
    buf.truncate(len);
    // Moves the allocation out (no copy); the caller owns wiping it.
    Ok(Some(std::mem::take(&mut *buf)))
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

/// Writes a public document (certificate, roster, status) atomically and
/// durably with mode 0644: see [`write_document_mode`].
pub fn write_document(path: &Path, contents: &str) -> Result<()> {
    write_document_mode(path, contents, 0o644)
}

/// Writes a document atomically and durably: a reader sees the old file or
/// the new one, never half of either, and once this returns the new one
/// survives a crash (the file and then its directory are fsynced). The
/// document gets `mode` less the umask, whatever the file it replaces had:
/// 0600 for state that others need not read. The temporary file gets an
/// unpredictable name and is created exclusively without following links, so
/// nothing planted in the directory is written through or removed.
pub fn write_document_mode(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let suffix = random_bytes::<8>()?;
    let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{}.tmp-{hex}", name.to_string_lossy()));
    let mut f =
        create_temp(&tmp, mode).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = f
        .write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    drop(f);
    if let Err(e) = written {
        // Only ever the file created above: its name was new and exclusive.
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| {
        format!(
            "wrote {} but cannot sync its directory {}",
            path.display(),
            dir.display()
        )
    })
}

/// Creates `tmp` only if nothing, not even a dangling link, has that name.
fn create_temp(tmp: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(tmp)
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

    #[test]
    fn symlinked_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        write_secret(&key, "secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let err = format!("{:#}", read_secret(&link).unwrap_err());
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn key_owned_by_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        write_secret(&key, "secret").unwrap();
        // The tests run as root (the namespace tests need it), so chown works.
        std::os::unix::fs::chown(&key, Some(4242), None).unwrap();
        let err = format!("{:#}", read_secret(&key).unwrap_err());
        assert!(err.contains("owned by uid 4242"), "{err}");
    }

    #[test]
    fn planted_symlink_at_the_old_temp_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let planted = dir
            .path()
            .join(format!(".roster.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let p = dir.path().join("roster");
        write_document(&p, "new").unwrap();
        assert_eq!(read_text(&p).unwrap(), "new");
        assert_eq!(read_text(&victim).unwrap(), "precious");
        assert!(
            fs::symlink_metadata(&planted)
                .unwrap()
                .file_type()
                .is_symlink(),
            "someone else's file is left alone"
        );
    }

    fn refusal(e: &anyhow::Error) -> &SecretFileRefusal {
        e.downcast_ref::<SecretFileRefusal>()
            .unwrap_or_else(|| panic!("not a typed refusal: {e:#}"))
    }

    #[test]
    fn refusals_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        write_secret(&key, "secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert_eq!(
            refusal(&read_secret(&link).unwrap_err()),
            &SecretFileRefusal::Symlink { path: link }
        );
        std::os::unix::fs::chown(&key, Some(4242), None).unwrap();
        assert_eq!(
            refusal(&read_secret(&key).unwrap_err()),
            &SecretFileRefusal::WrongOwner {
                path: key,
                owner: 4242,
                euid: unsafe { libc::geteuid() }
            }
        );
    }

    #[test]
    fn a_directory_or_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            refusal(&read_secret(&sub).unwrap_err()),
            SecretFileRefusal::NotRegular { .. }
        ));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            refusal(&read_secret(&fifo).unwrap_err()),
            SecretFileRefusal::NotRegular { .. }
        ));
    }

    #[test]
    fn oversized_or_binary_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        write_secret(&big, &"a".repeat(SECRET_MAX_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            refusal(&read_secret(&big).unwrap_err()),
            SecretFileRefusal::TooLarge { .. }
        ));
        let max = dir.path().join("max");
        write_secret(&max, &"a".repeat(SECRET_MAX_BYTES as usize)).unwrap();
        assert_eq!(read_secret(&max).unwrap().len(), SECRET_MAX_BYTES as usize);
        let bin = dir.path().join("bin");
        write_secret(&bin, "").unwrap();
        fs::write(&bin, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            refusal(&read_secret(&bin).unwrap_err()),
            SecretFileRefusal::NotText { .. }
        ));
    }

    #[test]
    fn temp_file_creation_neither_follows_nor_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let link = dir.path().join(".doc.tmp-planted");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert_eq!(
            create_temp(&link, 0o644).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // A dangling link is not created through either.
        let dangling = dir.path().join(".doc.tmp-dangling");
        let target = dir.path().join("created-through-link");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        assert!(create_temp(&dangling, 0o644).is_err());
        assert!(!target.exists());
        let plain = dir.path().join(".doc.tmp-plain");
        fs::write(&plain, "someone's").unwrap();
        assert!(create_temp(&plain, 0o644).is_err());
        assert_eq!(read_text(&plain).unwrap(), "someone's");
        assert_eq!(read_text(&victim).unwrap(), "precious");
    }

    #[test]
    fn document_mode_applies_and_a_symlinked_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        write_document_mode(&state, "{}", 0o600).unwrap();
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let doc = dir.path().join("doc");
        std::os::unix::fs::symlink(&victim, &doc).unwrap();
        write_document(&doc, "new").unwrap();
        assert_eq!(read_text(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(&doc).unwrap().file_type().is_file());
        assert_eq!(read_text(&doc).unwrap(), "new");
    }

    #[test]
    fn failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp
        // file was written.
        let target = dir.path().join("d");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), "").unwrap();
        assert!(write_document(&target, "new").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
