//! Root writing into a service user's directory acts as that user.
//!
//! The package gives `/var/lib/pqmesh` to the `pqmesh` user that `keyd run`
//! runs as (and systemd gives `/var/lib/pqmesh-authority` to the
//! authority's user), and keyd refuses a key file that is not its own
//! (`files::read_secret`). So `keyd join` and the authority's commands that
//! write its directory (`init`, `rotate-key`), run as root on such a
//! directory (cloud-init, `sudo`), first become the directory's owner: the
//! keys, certificates, roster and configuration they write then belong to
//! the user who will read them, and the rest runs without root. A
//! directory root owns (or one not there yet) changes nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Root does not follow a link to decide whose files it writes.
    #[error("{dir} is a symbolic link: give the directory itself")]
    Link { dir: PathBuf },
    /// Acting as a user with root's group would hand root's group on.
    #[error("{dir} belongs to uid {uid} but to group 0: give it the user's own group (chgrp)")]
    RootGroup { dir: PathBuf, uid: u32 },
    #[error("cannot act as uid {uid} gid {gid}, the owner of {dir}: {source}")]
    Switch {
        dir: PathBuf,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
}

/// Who we act as after [`act_as_owner_of`].
#[derive(Debug, PartialEq, Eq)]
pub enum Acting {
    /// Not root, or the directory is root's or absent.
    Unchanged,
    /// Switched to the directory's owner.
    Owner { uid: u32, gid: u32 },
}

/// If this process is root and `dir` belongs to another user, drops to that
/// user and the directory's group, for good (supplementary groups cleared).
pub fn act_as_owner_of(dir: &Path) -> Result<Acting, OwnerError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Acting::Unchanged);
    }
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(Acting::Unchanged);
    };
    if meta.file_type().is_symlink() {
        return Err(OwnerError::Link { dir: dir.into() });
    }
    let (uid, gid) = (meta.uid(), meta.gid());
    if uid == 0 {
        return Ok(Acting::Unchanged);
    }
    if gid == 0 {
        return Err(OwnerError::RootGroup {
            dir: dir.into(),
            uid,
        });
    }
    let fail = |source| OwnerError::Switch {
        dir: dir.into(),
        uid,
        gid,
        source,
    };
    // Groups first: once the uid is dropped they can no longer be changed.
    // glibc applies each call to every thread of the process.
    // SAFETY: plain syscalls on integers; a null list with length 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        // Not root's umask (a hardened image's 077 would make the
        // certificate unreadable for the data plane, which reads it
        // through the group): files for the owner and its group.
        libc::umask(0o027);
    }
    Ok(Acting::Owner { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_s_or_a_missing_directory_changes_nothing() {
        // As root (CI) the directory below is root's; as anyone else
        // nothing is ever switched. Both must leave the process as it is.
        let dir = tempfile::tempdir().unwrap();
        let before = unsafe { libc::geteuid() };
        assert_eq!(act_as_owner_of(dir.path()).unwrap(), Acting::Unchanged);
        assert_eq!(
            act_as_owner_of(&dir.path().join("absent")).unwrap(),
            Acting::Unchanged
        );
        assert_eq!(unsafe { libc::geteuid() }, before);
    }

    /// The review's findings: root decides whose files it writes by the
    /// directory itself, never through a link, and never hands on group 0.
    /// (Both refusals come before any switch, so the test process stays
    /// root.)
    #[test]
    fn a_link_or_a_directory_of_group_0_is_refused() {
        if unsafe { libc::geteuid() } != 0 {
            return; // only root ever switches
        }
        let dir = tempfile::tempdir().unwrap();
        let owned = dir.path().join("owned");
        std::fs::create_dir(&owned).unwrap();
        std::os::unix::fs::chown(&owned, Some(4_242_019), Some(4_242_019)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&owned, &link).unwrap();
        assert!(matches!(
            act_as_owner_of(&link),
            Err(OwnerError::Link { .. })
        ));
        std::os::unix::fs::chown(&owned, Some(4_242_019), Some(0)).unwrap();
        let e = act_as_owner_of(&owned).unwrap_err();
        assert!(
            matches!(e, OwnerError::RootGroup { uid: 4_242_019, .. }),
            "{e}"
        );
        assert_eq!(unsafe { libc::geteuid() }, 0);
    }
}
