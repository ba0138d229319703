//! The QUIC connections this node dialled: one per peer, reused across
//! rotations and by the edge ladder's QUIC carrier.
//!
//! Two dials to one peer can be due at once (the policy's exchange and the
//! ladder's carrier). Each used to find no connection and open its own;
//! both exchanges succeeded, the peer attached both in turn, and the
//! connection replaced first stayed open on keep-alives, with a reader and
//! a serving task on each side. Here the second dial waits for the first's
//! connection instead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_proto::identity::NodeId;

/// Connections of type `C` by peer (generic so that the rule is tested
/// without a network).
pub struct Dialled<C> {
    connections: Mutex<HashMap<NodeId, C>>,
    /// Held while a dial to the peer is under way; entries nobody holds are
    /// dropped at the next dial, so this stays as small as the dials in
    /// flight.
    dialling: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl<C: Clone> Default for Dialled<C> {
    fn default() -> Self {
        Self {
            connections: Mutex::new(HashMap::new()),
            dialling: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: Clone> Dialled<C> {
    /// The peer's connection if `alive` says it still is, else one `dial`
    /// opens (and that is kept). A dial already under way to the same
    /// peer is waited for and its connection used.
    pub async fn get_or_dial<E, F, Fut>(
        &self,
        peer: NodeId,
        alive: impl Fn(&C) -> bool,
        dial: F,
    ) -> Result<C, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, E>>,
    {
        let gate = {
            let mut dialling = lock(&self.dialling);
            dialling.retain(|_, g| Arc::strong_count(g) > 1);
            dialling.entry(peer).or_default().clone()
        };
        let _one_at_a_time = gate.lock().await;
        if let Some(c) = self.get(&peer).filter(|c| alive(c)) {
            return Ok(c);
        }
        let c = dial().await?;
        lock(&self.connections).insert(peer, c.clone());
        Ok(c)
    }

    fn get(&self, peer: &NodeId) -> Option<C> {
        lock(&self.connections).get(peer).cloned()
    }

    /// Forgets the peer's connection if `which` says it is the one meant
    /// (not one dialled since), and gives it to the caller (to close).
    pub fn remove_if(&self, peer: &NodeId, which: impl Fn(&C) -> bool) -> Option<C> {
        let mut connections = lock(&self.connections);
        if !connections.get(peer).is_some_and(which) {
            return None;
        }
        connections.remove(peer)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// A stand-in connection: its number, and whether it is still open.
    #[derive(Clone)]
    struct Conn(usize, Arc<AtomicBool>);

    fn open(n: usize) -> Conn {
        Conn(n, Arc::new(AtomicBool::new(true)))
    }

    fn alive(c: &Conn) -> bool {
        c.1.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn two_dials_at_once_open_one_connection() {
        let d = Arc::new(Dialled::<Conn>::default());
        let dials = Arc::new(AtomicUsize::new(0));
        let peer = NodeId([1; 16]);
        let dial_once = |d: Arc<Dialled<Conn>>, dials: Arc<AtomicUsize>| async move {
            d.get_or_dial(peer, alive, || async {
                let n = dials.fetch_add(1, Ordering::Relaxed);
                // A handshake takes a while: the other dial comes meanwhile.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, ()>(open(n))
            })
            .await
            .unwrap()
            .0
        };
        let (a, b) = tokio::join!(
            dial_once(d.clone(), dials.clone()),
            dial_once(d.clone(), dials.clone())
        );
        assert_eq!(dials.load(Ordering::Relaxed), 1, "two connections opened");
        assert_eq!((a, b), (0, 0));
    }

    #[tokio::test]
    async fn only_dials_under_way_keep_a_gate() {
        let d = Dialled::<Conn>::default();
        for n in 0..3u8 {
            d.get_or_dial(NodeId([n; 16]), alive, || async {
                Ok::<_, ()>(open(n.into()))
            })
            .await
            .unwrap();
        }
        // Each dial drops the gates nobody holds: the last one's is left.
        assert_eq!(lock(&d.dialling).len(), 1);
    }

    #[tokio::test]
    async fn a_closed_or_removed_connection_is_dialled_again() {
        let d = Dialled::<Conn>::default();
        let peer = NodeId([2; 16]);
        let first = d
            .get_or_dial(peer, alive, || async { Ok::<_, ()>(open(1)) })
            .await
            .unwrap();
        let reused = d
            .get_or_dial(peer, alive, || async { Ok::<_, ()>(open(2)) })
            .await
            .unwrap();
        assert_eq!(reused.0, 1);
        first.1.store(false, Ordering::Relaxed);
        let redialled = d
            .get_or_dial(peer, alive, || async { Ok::<_, ()>(open(3)) })
            .await
            .unwrap();
        assert_eq!(redialled.0, 3);
        // Only the connection meant: not one dialled since.
        assert!(d.remove_if(&peer, |c| c.0 == 1).is_none());
        assert_eq!(d.remove_if(&peer, |c| c.0 == 3).map(|c| c.0), Some(3));
        let failed = d.get_or_dial(peer, alive, || async { Err::<Conn, _>("refused") });
        assert_eq!(failed.await.err(), Some("refused"));
        assert!(
            d.remove_if(&peer, |_| true).is_none(),
            "a failed dial left a connection"
        );
    }
}
