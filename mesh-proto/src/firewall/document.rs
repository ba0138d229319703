//! The firewall document keyd gives the data plane: the policy, this node's
//! identity and every peer's, as one line of JSON on a local socket next to
//! the WireGuard userspace API's (`/var/run/wireguard/IFNAME.firewall` by
//! default; the package's units use `/run/pqmesh`).
//! A second socket rather than new UAPI keys: a stock WireGuard data plane
//! serves the UAPI and would refuse unknown keys, and "this data plane has no
//! firewall" is then plainly "no such socket". Both sides use this module,
//! so the format is defined once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::engine::PeerInfo;
use super::policy::{Policy, PolicyError};
use crate::prefix::IpPrefix;

/// A document larger than this is refused unread (10,000 peers fit).
pub const MAX_DOCUMENT: usize = 4 << 20;

/// Where the WireGuard userspace API's sockets live unless told otherwise.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

/// Where a data plane serving `ifname` takes firewall documents.
pub fn socket_path(ifname: &str) -> PathBuf {
    socket_path_in(Path::new(DEFAULT_SOCKET_DIR), ifname)
}

/// The same, for a data plane whose sockets are in `dir`.
pub fn socket_path_in(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.firewall"))
}

/// A member's identity on the wire: addresses as text (`10.77.0.1/32`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePeer {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl From<&PeerInfo> for WirePeer {
    fn from(p: &PeerInfo) -> Self {
        Self {
            name: p.name.clone(),
            groups: p.groups.clone(),
            attributes: p.attributes.clone(),
            addresses: p.addresses.iter().map(ToString::to_string).collect(),
        }
    }
}

impl WirePeer {
    fn to_peer(&self) -> Result<PeerInfo, DocumentError> {
        let addresses = self
            .addresses
            .iter()
            .map(|a| {
                a.parse::<IpPrefix>()
                    .map_err(|_| DocumentError::Address(a.chars().take(64).collect()))
            })
            .collect::<Result<_, _>>()?;
        Ok(PeerInfo {
            name: self.name.clone(),
            groups: self.groups.clone(),
            attributes: self.attributes.clone(),
            addresses,
        })
    }
}

/// The document as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Higher than the last one the data plane took (keyd: the roster's
    /// serial): a lower or equal one is refused as stale.
    pub generation: u64,
    /// `Policy::encode`, base64; `null`: no firewall, everything passes.
    /// The key must be there: a document that forgot it is refused rather
    /// than read as "no firewall".
    #[serde(deserialize_with = "Option::deserialize")]
    pub policy: Option<String>,
    pub local: WirePeer,
    pub peers: Vec<WirePeer>,
}

/// A document taken apart and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub generation: u64,
    pub policy: Option<Policy>,
    pub local: PeerInfo,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DocumentError {
    #[error("document of {0} bytes is over the {MAX_DOCUMENT}-byte limit")]
    TooLong(usize),
    #[error("not a firewall document: {0}")]
    Json(String),
    #[error("the policy is not base64")]
    Base64,
    #[error("the policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("not an address: {0:?}")]
    Address(String),
}

impl Document {
    pub fn new(
        generation: u64,
        policy: Option<&Policy>,
        local: &PeerInfo,
        peers: &[PeerInfo],
    ) -> Self {
        Self {
            generation,
            policy: policy.map(|p| base64::engine::general_purpose::STANDARD.encode(p.encode())),
            local: local.into(),
            peers: peers.iter().map(WirePeer::from).collect(),
        }
    }

    /// One line of JSON, newline-terminated.
    pub fn to_line(&self) -> String {
        // Serializing plain strings, maps and numbers cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses and checks a line: bounded, the policy decoded and validated.
    pub fn parse(line: &[u8]) -> Result<Parsed, DocumentError> {
        if line.len() > MAX_DOCUMENT {
            return Err(DocumentError::TooLong(line.len()));
        }
        let doc: Document = serde_json::from_slice(line).map_err(|e| {
            DocumentError::Json(e.to_string().chars().take(200).collect::<String>())
        })?;
        let policy = match &doc.policy {
            None => None,
            Some(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| DocumentError::Base64)?;
                Some(Policy::decode(&bytes)?)
            }
        };
        Ok(Parsed {
            generation: doc.generation,
            policy,
            local: doc.local.to_peer()?,
            peers: doc
                .peers
                .iter()
                .map(WirePeer::to_peer)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The data plane's one-line answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// In force now: its generation, rules and peers.
    Ok {
        generation: u64,
        rules: usize,
        peers: usize,
    },
    /// Not a newer generation than the one in force (nothing changed).
    Stale {
        in_force: u64,
    },
    Error(String),
}

impl Answer {
    pub fn to_line(&self) -> String {
        match self {
            Answer::Ok {
                generation,
                rules,
                peers,
            } => format!("ok {generation} {rules} {peers}\n"),
            Answer::Stale { in_force } => format!("stale {in_force}\n"),
            // One line, whatever the reason says.
            Answer::Error(why) => format!("error {}\n", why.replace(['\n', '\r'], " ")),
        }
    }

    pub fn parse(line: &str) -> Answer {
        let mut words = line.split_whitespace();
        let number = |w: Option<&str>| w.and_then(|w| w.parse().ok());
        match words.next() {
            Some("ok") => {
                let (g, r, p) = (
                    number(words.next()),
                    number(words.next()),
                    number(words.next()),
                );
                match (g, r, p) {
                    (Some(generation), Some(rules), Some(peers)) => Answer::Ok {
                        generation,
                        rules: rules as usize,
                        peers: peers as usize,
                    },
                    _ => Answer::Error(format!("malformed answer: {}", line.trim())),
                }
            }
            Some("stale") => match number(words.next()) {
                Some(in_force) => Answer::Stale { in_force },
                None => Answer::Error(format!("malformed answer: {}", line.trim())),
            },
            Some("error") => Answer::Error(line.trim().trim_start_matches("error").trim().into()),
            _ => Answer::Error(format!(
                "malformed answer: {}",
                line.trim().chars().take(120).collect::<String>()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, addr: &str, groups: &[&str]) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            attributes: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            addresses: vec![addr.parse().unwrap()],
        }
    }

    #[test]
    fn a_document_round_trips_without_and_with_a_policy() {
        let local = peer("web1", "10.77.0.1/32", &["web"]);
        let peers = vec![peer("db1", "10.77.0.2/32", &["db"])];
        let doc = Document::new(7, None, &local, &peers);
        let line = doc.to_line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let parsed = Document::parse(line.trim_end().as_bytes()).unwrap();
        assert_eq!(parsed.generation, 7);
        assert_eq!(parsed.policy, None);
        assert_eq!(parsed.local, local);
        assert_eq!(parsed.peers, peers);
        assert!(
            line.contains("\"10.77.0.2/32\""),
            "addresses as text: {line}"
        );

        let policy = Policy::from_toml(
            "[[rule]]\nname = \"web-to-db\"\naction = \"allow\"\nfrom = { groups = [\"web\"] }\n\
             to = { groups = [\"db\"] }\nproto = \"tcp\"\nports = [\"5432\"]\n",
        )
        .unwrap();
        let doc = Document::new(8, Some(&policy), &local, &peers);
        let parsed = Document::parse(doc.to_line().as_bytes()).unwrap();
        assert_eq!(parsed.policy, Some(policy));
    }

    #[test]
    fn bad_documents_get_their_own_errors() {
        let local = peer("a", "10.0.0.1/32", &[]);
        let mut doc = Document::new(1, None, &local, &[]);
        doc.policy = Some("not base64!".into());
        assert_eq!(
            Document::parse(doc.to_line().as_bytes()),
            Err(DocumentError::Base64)
        );
        doc.policy = Some(base64::engine::general_purpose::STANDARD.encode([0xff; 16]));
        assert!(matches!(
            Document::parse(doc.to_line().as_bytes()),
            Err(DocumentError::Policy(_))
        ));
        let mut doc = Document::new(1, None, &local, &[]);
        doc.local.addresses = vec!["10.0.0.300/32".into()];
        assert!(matches!(
            Document::parse(doc.to_line().as_bytes()),
            Err(DocumentError::Address(_))
        ));
        assert!(matches!(
            Document::parse(b"{\"generation\": 1}"),
            Err(DocumentError::Json(_))
        ));
        // Without its policy key a document is refused, not read as "no
        // firewall"; with `null` it means exactly that.
        let no_key = br#"{"generation":1,"local":{"name":"a"},"peers":[]}"#;
        assert!(matches!(
            Document::parse(no_key),
            Err(DocumentError::Json(_))
        ));
        let null = br#"{"generation":1,"policy":null,"local":{"name":"a"},"peers":[]}"#;
        assert_eq!(Document::parse(null).map(|p| p.policy), Ok(None));
        assert!(matches!(
            Document::parse(&vec![b' '; MAX_DOCUMENT + 1]),
            Err(DocumentError::TooLong(_))
        ));
    }

    #[test]
    fn answers_round_trip() {
        for a in [
            Answer::Ok {
                generation: 3,
                rules: 10,
                peers: 4,
            },
            Answer::Stale { in_force: 9 },
            Answer::Error("stale\nor worse".into()),
        ] {
            let line = a.to_line();
            let back = Answer::parse(&line);
            match (&a, &back) {
                (Answer::Error(_), Answer::Error(why)) => assert_eq!(why, "stale or worse"),
                _ => assert_eq!(a, back),
            }
        }
        assert!(matches!(Answer::parse("ok x"), Answer::Error(_)));
        assert!(matches!(Answer::parse(""), Answer::Error(_)));
    }
}
