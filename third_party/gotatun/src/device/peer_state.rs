// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.
//
// This file incorporates work covered by the following copyright and
// permission notice:
//
//   Copyright (c) Mullvad VPN AB. All rights reserved.
//   Copyright (c) 2019 Cloudflare, Inc. All rights reserved.
//
// SPDX-License-Identifier: MPL-2.0

use ipnetwork::IpNetwork;

use std::collections::HashSet;
use std::net::SocketAddr;

use tokio::sync::watch;

#[cfg(feature = "daita")]
use crate::device::daita::{DaitaHooks, DaitaSettings};
use crate::noise::errors::WireGuardError;
use crate::noise::{Tunn, TunnResult};
#[cfg(feature = "daita")]
use crate::packet;
use crate::packet::{Packet, WgHandshakeInit, WgKind};
#[cfg(feature = "daita")]
use crate::tun::MtuWatcher;
#[cfg(feature = "daita")]
use crate::udp::UdpSend;

#[derive(Default, Debug)]
pub struct Endpoint {
    pub addr: Option<SocketAddr>,
}

/// A handshake initiated by [`PeerState::force_handshake`].
pub struct PendingHandshake {
    /// Notified when a handshake initiated by us completes.
    pub completed: watch::Receiver<()>,
    /// The initiation to send and where to send it, or `None` if one is already in flight.
    pub initiation: Option<(Packet<WgHandshakeInit>, SocketAddr)>,
}

pub struct PeerState {
    /// The associated tunnel struct
    pub(crate) tunnel: Tunn,
    pub(crate) endpoint: Endpoint,
    /// This peer's allowed IPs, host bits cleared, each once (pqmesh patch 6).
    ///
    /// Only listed and used to find this peer's entries in the device's `peers_by_ip`, which
    /// routes: a trie per peer cost ~7 KB of an idle peer's ~19 KB. `peers_by_ip` is the
    /// authority. A network that another peer takes leaves this list then (kernel semantics),
    /// or, should this peer's lock be busy at that moment, at this peer's next modification;
    /// until then readers skip it (`DeviceRead::peers`).
    pub(crate) allowed_ips: Vec<IpNetwork>,

    #[cfg(feature = "daita")]
    daita_settings: Option<DaitaSettings>,
    #[cfg(feature = "daita")]
    pub(crate) daita: Option<DaitaHooks>,

    /// Notified whenever a handshake that we initiated completes. Created by the first
    /// [`Self::force_handshake`] (pqmesh patch 6): its shared state is ~370 bytes that an
    /// embedder that never forces a handshake would pay for every peer.
    handshake_completed: Option<watch::Sender<()>>,
}

/// `network` with its host bits cleared, the form `peers_by_ip` stores and lists.
pub(crate) fn canonical(network: IpNetwork) -> IpNetwork {
    // `new` only fails on a prefix longer than the address, which `network` cannot have.
    IpNetwork::new(network.network(), network.prefix()).unwrap_or(network)
}

impl PeerState {
    pub fn new(
        tunnel: Tunn,
        endpoint: Option<SocketAddr>,
        allowed_ips: &[IpNetwork],
        #[cfg(feature = "daita")] daita_settings: Option<DaitaSettings>,
    ) -> PeerState {
        Self {
            tunnel,
            endpoint: Endpoint { addr: endpoint },
            allowed_ips: Self::dedup(allowed_ips),
            #[cfg(feature = "daita")]
            daita_settings,
            #[cfg(feature = "daita")]
            daita: None,
            handshake_completed: None,
        }
    }

    /// `networks` canonical, the first of each in input order, with no spare capacity.
    fn dedup(networks: &[IpNetwork]) -> Vec<IpNetwork> {
        let mut list: Vec<IpNetwork> = networks.iter().copied().map(canonical).collect();
        if list.len() > 1 {
            let mut seen = HashSet::with_capacity(list.len());
            list.retain(|network| seen.insert(*network));
            list.shrink_to_fit();
        }
        list
    }

    /// Drop `network` from this peer's list: another peer has taken it.
    pub(crate) fn forget_allowed_ip(&mut self, network: IpNetwork) {
        self.allowed_ips.retain(|n| *n != network);
    }

    /// Process an incoming packet received from `addr`.
    ///
    /// Any authenticated packet updates the peer endpoint to `addr`. Waiters are notified if the
    /// packet completes a handshake that we initiated.
    pub fn handle_incoming_packet(&mut self, packet: WgKind, addr: SocketAddr) -> TunnResult {
        let is_handshake_resp = matches!(packet, WgKind::HandshakeResp(_));
        let result = self.tunnel.handle_incoming_packet(packet);
        match result {
            TunnResult::WriteToNetwork(_) => {
                self.endpoint.addr = Some(addr);
                if is_handshake_resp {
                    self.notify_handshake_completed();
                }
            }
            TunnResult::WriteToTunnel(_) => self.endpoint.addr = Some(addr),
            // Don't update the peer endpoint on cookie replies, for consistency
            // with both the Linux kernel and wireguard-go.
            TunnResult::Done | TunnResult::Err(_) => {}
        }
        result
    }

    /// Subscribe to completions of handshakes that we initiated.
    ///
    /// The receiver only sees completions that happen after this call.
    fn subscribe_handshake_completed(&mut self) -> watch::Receiver<()> {
        self.handshake_completed
            .get_or_insert_with(|| watch::Sender::new(()))
            .subscribe()
    }

    /// Wake everyone waiting on [`Self::subscribe_handshake_completed`].
    fn notify_handshake_completed(&self) {
        // No channel: nobody ever subscribed, so nobody is waiting.
        if let Some(sender) = &self.handshake_completed {
            sender.send_replace(());
        }
    }

    #[cfg(feature = "daita")]
    pub(crate) async fn maybe_start_daita<US: UdpSend + Clone + 'static>(
        peer: &std::sync::Arc<tokio::sync::Mutex<PeerState>>,
        pool: packet::PacketBufPool,
        tun_rx_mtu: MtuWatcher,
        udp_tx: US,
    ) -> Result<(), super::Error> {
        let mut peer_g = peer.lock().await;
        let Some(daita_settings) = peer_g.daita_settings.clone() else {
            // No DAITA settings; disabled
            return Ok(());
        };

        peer_g.daita = Some(DaitaHooks::new(
            daita_settings,
            std::sync::Arc::downgrade(peer),
            tun_rx_mtu,
            udp_tx,
            pool,
        )?);

        Ok(())
    }

    pub fn update_timers(&mut self) -> Result<Option<WgKind>, WireGuardError> {
        self.tunnel.update_timers()
    }

    /// Drop all sessions and reset the tunnel, forcing a fresh handshake.
    pub fn reset(&mut self) {
        self.tunnel.reset();
    }

    /// Start a handshake unless there is an active session or our own initiation is in flight.
    ///
    /// Returns `None` if there is an active session.
    pub fn force_handshake(&mut self) -> Result<Option<PendingHandshake>, super::Error> {
        if self.tunnel.has_active_session() {
            return Ok(None);
        }
        let endpoint_addr = self.endpoint.addr.ok_or(super::Error::NoEndpoint)?;

        // Subscribe before creating the initiation so that a fast response cannot be missed
        let completed = self.subscribe_handshake_completed();

        // `None` means that our own initiation is already in flight
        let initiation = self
            .tunnel
            .format_handshake_initiation(false)
            .map(|packet| (packet, endpoint_addr));

        Ok(Some(PendingHandshake {
            completed,
            initiation,
        }))
    }

    #[cfg(feature = "daita")]
    pub fn daita_settings(&self) -> Option<&DaitaSettings> {
        self.daita_settings.as_ref()
    }

    #[cfg(feature = "daita")]
    pub fn daita(&self) -> Option<&DaitaHooks> {
        self.daita.as_ref()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// This peer's allowed IPs, including, rarely, one that another peer has taken since (see
    /// the field); [`DeviceRead::peers`](super::configure::DeviceRead::peers) lists only those
    /// that route to this peer.
    pub fn allowed_ips(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.allowed_ips.iter().copied()
    }

    pub fn time_since_last_handshake(&self) -> Option<std::time::Duration> {
        self.tunnel.time_since_last_handshake()
    }

    pub fn persistent_keepalive(&self) -> Option<u16> {
        self.tunnel.persistent_keepalive()
    }

    pub fn preshared_key(&self) -> Option<[u8; 32]> {
        self.tunnel.preshared_key()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::noise::index_table::IndexTable;
    use crate::noise::rate_limiter::RateLimiter;
    use crate::x25519::{PublicKey, StaticSecret};

    fn peer_state(allowed_ips: &[IpNetwork]) -> PeerState {
        let ours = StaticSecret::random();
        let rate_limiter = Arc::new(RateLimiter::new(&PublicKey::from(&ours), 10));
        let tunnel = Tunn::new(
            ours,
            PublicKey::from(&StaticSecret::random()),
            None,
            None,
            IndexTable::from_os_rng(),
            rate_limiter,
        );
        PeerState::new(
            tunnel,
            None,
            allowed_ips,
            #[cfg(feature = "daita")]
            None,
        )
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("test network")
    }

    /// pqmesh patch 6. Beside the tunnel a peer holds its endpoint (32 B), the list of its
    /// allowed IPs (24 B, where a trie per peer was 1,760 B inline and ~5.5 KB of heap) and the
    /// lazily created channel (8 B). The tunnel is 10,560 B, 9,024 of them its eight session
    /// slots held inline (`[Option<Session>; 8]`); as `Option<Arc<Session>>` they are 64 B and
    /// `PeerState` is 1,664 B: lower the second bound to that when they are.
    #[test]
    #[cfg(all(target_pointer_width = "64", not(feature = "daita")))]
    fn an_idle_peer_is_small() {
        // One allocation per idle peer: the tunnel (handshake, timers, eight
        // shared session slots of 8 bytes each) and a few fields.
        assert!(size_of::<PeerState>() - size_of::<Tunn>() <= 64);
        assert!(size_of::<PeerState>() <= 1_664);
    }

    #[test]
    fn allowed_ips_are_stored_once_without_host_bits_and_without_spare_room() {
        let peer = peer_state(&[
            net("10.0.0.7/24"),
            net("fd00::1/64"),
            net("10.0.0.0/24"),
            net("10.0.1.1/32"),
            net("fd00::/64"),
        ]);
        let expected = [net("10.0.0.0/24"), net("fd00::/64"), net("10.0.1.1/32")];
        assert_eq!(peer.allowed_ips().collect::<Vec<_>>(), expected);
        assert_eq!(peer.allowed_ips.capacity(), expected.len());
    }

    #[test]
    fn the_handshake_channel_exists_only_once_someone_waits() {
        let mut peer = peer_state(&[]);
        peer.notify_handshake_completed();
        assert!(peer.handshake_completed.is_none());

        let completed = peer.subscribe_handshake_completed();
        assert!(!completed.has_changed().expect("sender alive"));
        peer.notify_handshake_completed();
        assert!(completed.has_changed().expect("sender alive"));
    }
}
