//! What keyd persists across restarts, in `state_dir/state.json` (0600,
//! written atomically and fsynced): the roster in use (serial and content
//! fingerprint, for rollback and serial-reuse protection) and, per peer, the
//! last key epoch and when that key was installed (so epochs only go up and
//! a key found in the data plane after a restart is cut on time).
//!
//! A missing or corrupt state file fails closed: keyd refuses to start, since
//! starting from nothing would accept an older roster (a rollback) and reuse
//! epochs. An empty or absent `state_dir` is a first start; `--reset-state`
//! is the operator's explicit way past a lost file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_proto::identity::NodeId;
use mesh_proto::roster::Roster;
use serde::{Deserialize, Serialize};

use crate::files;
use crate::policy::PairRecord;

pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{path} is missing but {dir} holds other keyd files: the roster serial and key epochs \
         are lost, so a rolled-back roster would be accepted; restore the file, or start once \
         with `keyd run --reset-state` to begin again from the current roster"
    )]
    Missing { path: PathBuf, dir: PathBuf },
    #[error(
        "{path} is corrupt ({reason}); restore it, or start once with `keyd run --reset-state`"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "roster serial {offered} is older than serial {current} already used here (rollback refused)"
    )]
    Rollback { current: u64, offered: u64 },
    #[error(
        "roster serial {serial} is not the roster this node used under that serial (serial reuse refused)"
    )]
    SerialReuse { serial: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    pub version: u32,
    pub roster_serial: u64,
    /// Hex fingerprint (hash) of the signed roster in use.
    pub roster_fingerprint: String,
    /// Per peer node id (hex).
    pub pairs: BTreeMap<String, PairRecord>,
}

impl PersistedState {
    pub fn new(roster: &Roster, pairs: &BTreeMap<NodeId, PairRecord>) -> Self {
        Self {
            version: STATE_VERSION,
            roster_serial: roster.serial(),
            roster_fingerprint: roster.fingerprint().to_hex(),
            pairs: pairs
                .iter()
                .map(|(id, r)| (id.to_string(), r.clone()))
                .collect(),
        }
    }

    /// May `roster` be used after the one recorded here?
    pub fn check_roster(&self, roster: &Roster) -> Result<(), StateError> {
        let offered = roster.serial();
        match offered.cmp(&self.roster_serial) {
            std::cmp::Ordering::Less => Err(StateError::Rollback {
                current: self.roster_serial,
                offered,
            }),
            std::cmp::Ordering::Equal
                if roster.fingerprint().to_hex() != self.roster_fingerprint =>
            {
                Err(StateError::SerialReuse { serial: offered })
            }
            _ => Ok(()),
        }
    }

    /// The per-pair records for peers whose id parses (all, in a file we wrote).
    pub fn records(&self) -> BTreeMap<NodeId, PairRecord> {
        self.pairs
            .iter()
            .filter_map(|(id, r)| Some((parse_node_id(id)?, r.clone())))
            .collect()
    }
}

fn parse_node_id(hex: &str) -> Option<NodeId> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(NodeId(out))
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Loads the state. `Ok(None)`: a first start (no or empty `dir`), or the
/// operator asked for a reset.
pub fn load(dir: &Path, reset: bool) -> Result<Option<PersistedState>, StateError> {
    let path = path(dir);
    if reset {
        return Ok(None);
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(source) => {
                    return Err(StateError::Io {
                        path: dir.to_path_buf(),
                        source,
                    });
                }
            };
            return if empty {
                Ok(None)
            } else {
                Err(StateError::Missing {
                    path,
                    dir: dir.to_path_buf(),
                })
            };
        }
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let state: PersistedState = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Corrupt {
            path,
            reason: format!(
                "version {} (this keyd writes {STATE_VERSION})",
                state.version
            ),
        });
    }
    if state.pairs.keys().any(|id| parse_node_id(id).is_none()) {
        return Err(StateError::Corrupt {
            path,
            reason: "a peer entry is not a node id".into(),
        });
    }
    Ok(Some(state))
}

/// Writes the state atomically (temp file, fsync, rename, fsync the folder).
pub fn save(dir: &Path, state: &PersistedState) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(state)?;
    files::write_document_mode(&path(dir), &json, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> PersistedState {
        PersistedState {
            version: STATE_VERSION,
            roster_serial: 4,
            roster_fingerprint: "ab".repeat(32),
            pairs: BTreeMap::from([(
                "01".repeat(16),
                PairRecord {
                    epoch: 9,
                    installed_at: Some(1_900_000_000),
                },
            )]),
        }
    }

    #[test]
    fn round_trip_is_exact_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &state()).unwrap();
        assert_eq!(load(dir.path(), false).unwrap(), Some(state()));
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let records = state().records();
        assert_eq!(records[&NodeId([1; 16])].epoch, 9);
    }

    #[test]
    fn an_empty_or_absent_folder_is_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), false).unwrap(), None);
        assert_eq!(load(&dir.path().join("absent"), false).unwrap(), None);
    }

    #[test]
    fn a_lost_state_file_stops_keyd_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status.json"), "{}").unwrap();
        let e = load(dir.path(), false).unwrap_err();
        assert!(matches!(e, StateError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("--reset-state"), "{e}");
        assert_eq!(load(dir.path(), true).unwrap(), None);
    }

    #[test]
    fn a_corrupt_state_file_stops_keyd_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "12\n",
            "{\"version\": 1}",
            &serde_json::to_string(&PersistedState {
                version: 99,
                ..state()
            })
            .unwrap(),
            &serde_json::to_string(&PersistedState {
                pairs: BTreeMap::from([("zz".into(), PairRecord::default())]),
                ..state()
            })
            .unwrap(),
        ] {
            std::fs::write(path(dir.path()), bad).unwrap();
            let e = load(dir.path(), false).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("state.json"), "{e}");
        }
    }
}
