//! `--socket-group`: the UAPI and firewall sockets are handed to a group
//! (0660), so that an unprivileged keyd in that group can drive the data
//! plane. Without the option they stay 0600, for root alone.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a socket could not be given to the group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("--socket-group: `{0}` is not a group name")]
    BadName(String),
    #[error("--socket-group: no group `{0}` on this system")]
    Unknown(String),
    #[error("--socket-group: cannot look up group `{name}`: {source}")]
    Lookup {
        name: String,
        source: std::io::Error,
    },
    #[error(
        "cannot give {path} to group {gid}: {source} (mesh-node must be a member of the group)"
    )]
    Chown {
        path: PathBuf,
        gid: u32,
        source: std::io::Error,
    },
    #[error("cannot make {path} 0660: {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A group id: `name` looked up in the system's group database, or a
/// number.
pub fn resolve(name: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(GroupError::BadName(name.escape_debug().take(80).collect()));
    }
    let c_name = CString::new(name).map_err(|_| GroupError::BadName(name.into()))?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: every pointer is to a live local of the size given;
        // getgrnam_r writes only into `group` and `buf`.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Err(GroupError::Unknown(name.into())),
            0 => return Ok(group.gr_gid),
            // A group with very many members: a bigger buffer, bounded.
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            errno => {
                return Err(GroupError::Lookup {
                    name: name.into(),
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
        }
    }
}

/// Gives the socket at `path` to `gid` and then opens it to the group:
/// in this order, so that it is never 0660 for the group it had before.
/// A socket that already has the group (mesh-node runs with it as its own,
/// as the packaged unit does) is not chowned, so the unit can forbid the
/// chown system calls.
pub fn share(path: &Path, gid: u32) -> Result<(), GroupError> {
    use std::os::unix::fs::MetadataExt;
    let owned = std::fs::metadata(path).map(|m| m.gid() == gid);
    if !matches!(owned, Ok(true)) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| GroupError::Chown {
            path: path.into(),
            gid,
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        GroupError::Chmod {
            path: path.into(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn numbers_and_names_resolve() {
        assert_eq!(resolve("4242").unwrap(), 4242);
        // Group 0 is called root on every Linux system.
        assert_eq!(resolve("root").unwrap(), 0);
    }

    #[test]
    fn unknown_and_malformed_names_are_refused() {
        assert!(matches!(
            resolve("pqmesh-no-such-group-x"),
            Err(GroupError::Unknown(n)) if n == "pqmesh-no-such-group-x"
        ));
        assert!(matches!(resolve("a b"), Err(GroupError::BadName(_))));
        assert!(matches!(resolve(""), Err(GroupError::BadName(_))));
        assert!(matches!(resolve("x\0y"), Err(GroupError::BadName(_))));
    }

    #[test]
    fn share_sets_group_then_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Our own primary group: allowed without privilege.
        let gid = unsafe { libc::getegid() };
        share(&path, gid).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.gid(), gid);
        assert_eq!(m.mode() & 0o777, 0o660);
    }

    #[test]
    fn share_names_the_missing_socket() {
        let err = share(Path::new("/nonexistent-pqmesh/x.sock"), 0).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-pqmesh/x.sock"),
            "{err}"
        );
    }
}
