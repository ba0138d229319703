//! keyd's side of the data plane's firewall (issue 13): the document the
//! data plane enforces (the roster's policy, this node's identity and every
//! peer's, from their certificates), pushed over the data plane's firewall
//! socket (`mesh_proto::firewall::document`), and what keyd knows of it for
//! `keyd status`.
//!
//! When to push is the driver's (daemon.rs): whenever the roster changed,
//! and after the data plane restarted, before any peer is installed, so a
//! restarted data plane never carries traffic without its policy.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_proto::firewall::document::{self, Answer, Document};
use mesh_proto::firewall::engine::PeerInfo;
use mesh_proto::identity::NodeId;
use mesh_proto::roster::Roster;
use serde::{Deserialize, Serialize};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A member's identity as the firewall sees it: its certificate's.
pub fn peer_info(cert: &mesh_proto::cert::NodeCert) -> PeerInfo {
    let b = cert.body();
    PeerInfo {
        name: b.name.clone(),
        groups: b.groups.clone(),
        attributes: b.attributes.clone(),
        // The allowed IPs keyd installs (host routes): the source of a
        // decrypted packet is one of them, and a certificate's /24 would
        // make every member's lookup overlap.
        addresses: crate::policy::allowed_ips(cert),
    }
}

/// The document for this node under `roster` (generation: its serial).
pub fn document_for(roster: &Roster, me: &mesh_proto::cert::NodeCert) -> Document {
    let my_id: NodeId = me.body().node_id;
    let peers: Vec<PeerInfo> = roster
        .members()
        .iter()
        .filter(|m| m.cert.body().node_id != my_id)
        .map(|m| peer_info(&m.cert))
        .collect();
    Document::new(roster.serial(), roster.policy(), &peer_info(me), &peers)
}

/// What `keyd status` says about the firewall.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirewallState {
    /// Not pushed yet.
    #[default]
    Unknown,
    /// The data plane enforces the roster's policy.
    Enforced,
    /// The roster has no policy: every member reaches every other.
    NoPolicy,
    /// The data plane has no firewall (a stock WireGuard): the roster's
    /// policy, if any, is NOT enforced on this node.
    NotSupported,
    /// The data plane refused the document or could not be reached.
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallStatus {
    pub state: FirewallState,
    /// The roster serial whose policy is in force in the data plane.
    pub generation: Option<u64>,
    pub rules: usize,
    pub peers: usize,
    /// Why, when it is not enforced.
    pub detail: Option<String>,
}

/// Pushes `doc` to the data plane serving `ifname` with its sockets in
/// `dir` (blocking, bounded).
pub fn push(dir: &Path, ifname: &str, doc: &Document) -> FirewallStatus {
    push_to(document::socket_path_in(dir, ifname), doc)
}

fn push_to(socket: PathBuf, doc: &Document) -> FirewallStatus {
    let has_policy = doc.policy.is_some();
    let failed = |state, detail: String| FirewallStatus {
        state,
        detail: Some(detail),
        ..FirewallStatus::default()
    };
    let mut stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return if has_policy {
                failed(
                    FirewallState::NotSupported,
                    format!(
                        "the data plane has no firewall ({} missing): the roster's policy is NOT enforced on this node",
                        socket.display()
                    ),
                )
            } else {
                FirewallStatus {
                    state: FirewallState::NoPolicy,
                    detail: Some("the data plane has no firewall".into()),
                    ..FirewallStatus::default()
                }
            };
        }
        Err(e) => {
            return failed(
                FirewallState::Failed,
                format!("cannot reach {}: {e}", socket.display()),
            );
        }
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    if let Err(e) = stream.write_all(doc.to_line().as_bytes()) {
        return failed(FirewallState::Failed, format!("sending the document: {e}"));
    }
    let mut line = String::new();
    // An answer is one short line.
    let mut reader = BufReader::new(std::io::Read::take(stream, 4096));
    if let Err(e) = reader.read_line(&mut line) {
        return failed(FirewallState::Failed, format!("reading the answer: {e}"));
    }
    let in_force = |generation, rules, peers| FirewallStatus {
        state: if has_policy {
            FirewallState::Enforced
        } else {
            FirewallState::NoPolicy
        },
        generation: Some(generation),
        rules,
        peers,
        detail: None,
    };
    match Answer::parse(&line) {
        Answer::Ok {
            generation,
            rules,
            peers,
        } => in_force(generation, rules, peers),
        // This very generation is in force already (keyd restarted, or
        // the periodic refresh).
        Answer::Stale { in_force: g } if g == doc.generation => {
            in_force(g, rules_in(doc), doc.peers.len())
        }
        Answer::Stale { in_force: g } => failed(
            FirewallState::Failed,
            format!(
                "the data plane holds generation {g}, newer than roster serial {}",
                doc.generation
            ),
        ),
        Answer::Error(why) => failed(
            FirewallState::Failed,
            format!(
                "the data plane refused the document: {}",
                crate::text::sanitize(&why, crate::text::ERROR_MAX)
            ),
        ),
    }
}

/// The rule count of the policy a document carries.
fn rules_in(doc: &Document) -> usize {
    Document::parse(doc.to_line().trim_end().as_bytes())
        .ok()
        .and_then(|p| p.policy)
        .map_or(0, |p| p.rules.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn doc(policy: bool) -> Document {
        let local = PeerInfo {
            name: "a".into(),
            addresses: vec!["10.0.0.1/32".parse().unwrap()],
            ..PeerInfo::default()
        };
        let policy = policy.then(|| {
            mesh_proto::firewall::policy::Policy::from_toml(
                "[[rule]]\nname = \"all\"\naction = \"allow\"\nfrom = { any = true }\nto = { any = true }\nproto = \"any\"\n",
            )
            .unwrap()
        });
        Document::new(5, policy.as_ref(), &local, &[])
    }

    /// A data plane that answers `answer` to one document.
    fn serve(
        answer: &'static str,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.firewall");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            (&s).write_all(answer.as_bytes()).unwrap();
            line
        });
        (dir, path, t)
    }

    #[test]
    fn an_accepted_document_is_enforced() {
        let (_d, path, t) = serve("ok 5 1 0\n");
        let s = push_to(path, &doc(true));
        assert_eq!(s.state, FirewallState::Enforced, "{s:?}");
        assert_eq!((s.generation, s.rules), (Some(5), 1));
        let sent = Document::parse(t.join().unwrap().trim_end().as_bytes()).unwrap();
        assert_eq!(sent.generation, 5);
        assert!(sent.policy.is_some());
    }

    #[test]
    fn no_socket_means_not_enforced_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = push_to(dir.path().join("none.firewall"), &doc(true));
        assert_eq!(s.state, FirewallState::NotSupported);
        assert!(s.detail.unwrap().contains("NOT enforced"));
        let s = push_to(dir.path().join("none.firewall"), &doc(false));
        assert_eq!(s.state, FirewallState::NoPolicy);
    }

    #[test]
    fn refusals_and_stale_generations() {
        let (_d, path, _t) = serve("error bad policy\n");
        let s = push_to(path, &doc(true));
        assert_eq!(s.state, FirewallState::Failed);
        assert!(s.detail.unwrap().contains("bad policy"));
        let (_d, path, _t) = serve("stale 5\n");
        assert_eq!(push_to(path, &doc(true)).state, FirewallState::Enforced);
        let (_d, path, _t) = serve("stale 9\n");
        assert_eq!(push_to(path, &doc(true)).state, FirewallState::Failed);
    }
}
