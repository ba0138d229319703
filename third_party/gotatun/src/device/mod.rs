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

//! WireGuard device implementation with support for peers, handshakes, and packet routing.
pub(crate) mod allowed_ips;
mod builder;
pub mod configure;
#[cfg(feature = "daita")]
pub mod daita;
#[cfg(test)]
mod integration_tests;
pub mod parallel;
mod peer;
mod peer_state;
#[cfg(test)]
pub(crate) mod tests;
mod transports;
pub mod uapi;

use crate::noise::index_table::IndexTable;
use builder::Nul;
use futures::{FutureExt, TryFutureExt};
use std::collections::HashMap;
use std::io::{self};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::BitOrAssign;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::join;
use tokio::sync::RwLock;
use tokio::sync::{Mutex, watch};
use tracing::{Level, instrument};

use crate::noise::errors::WireGuardError;
use crate::noise::handshake::parse_handshake_anon;
use crate::noise::rate_limiter::RateLimiter;
use crate::noise::{Tunn, TunnResult};
use crate::packet::{Ip, Packet, PacketBufPool, WgKind};
#[cfg(not(feature = "daita"))]
use crate::packet::{WgData, WgPacketType};
use crate::task::Task;
use crate::tun::{IpRecv, IpSend, MtuWatcher};
use crate::udp::buffer::{BufferedUdpReceive, BufferedUdpSend};
use crate::udp::{UdpRecv, UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use crate::x25519;
use allowed_ips::AllowedIps;
#[cfg(not(feature = "daita"))]
use parallel::{CHUNK, CryptoPool, Item, Job};
use peer_state::{PeerState, PendingHandshake};

#[cfg(feature = "tun")]
pub use crate::device::transports::DefaultDeviceTransports;
pub use crate::device::transports::DeviceTransports;
pub use builder::DeviceBuilder;
pub use peer::Peer;

/// The number of handshakes per second to tolerate before using cookies
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Maximum number of packet buffers that each channel may contain
const MAX_PACKET_BUFS: usize = 4000;

/// Error of [`Device`]-related operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Multiple peers have the same public key
    #[error("Multiple peers have the same public key")]
    DuplicatePeer,

    /// I/O error
    #[error("i/o error: {0}")]
    IoError(#[from] io::Error),

    /// Failed to bind UDP sockets
    #[error("Failed to bind UDP sockets (params={1:?}): {0}")]
    Bind(#[source] io::Error, UdpTransportFactoryParams),

    /// TUN device error
    #[error("TUN device error: {0}")]
    #[cfg(feature = "tun")]
    TunDevice(#[from] crate::tun::tun_async_device::Error),

    /// Failed to initialize DAITA hooks
    #[error("Failed to initialize DAITA hooks")]
    #[cfg(feature = "daita")]
    DaitaHooks(#[from] daita::Error),

    /// No peer with the given public key exists
    #[error("No peer with the given public key exists")]
    PeerNotFound,

    /// The peer has no known endpoint
    #[error("The peer has no known endpoint")]
    NoEndpoint,

    /// The device has no active connection, e.g. because it is suspended
    #[error("The device has no active connection")]
    NotConnected,

    /// The device has no private key yet (pqmesh patch 5)
    #[error("The device has no private key")]
    NoPrivateKey,
}

/// A reference-counted handle to a WireGuard device.
pub struct Device<T: DeviceTransports> {
    inner: Arc<RwLock<DeviceState<T>>>,
    fatal_error: watch::Receiver<Option<Error>>,
}

/// Entry point for building a [`Device`].
///
/// See [`DeviceBuilder`] for options.
pub const fn build() -> DeviceBuilder<Nul, Nul, Nul> {
    DeviceBuilder::new()
}

/// Counters of packets the device dropped, by reason (pqmesh patch, see
/// docs/gotatun-patches.md in the pqmesh repository).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Decrypted packets whose inner source address is not in the sending
    /// peer's allowed IPs (cryptokey routing refused them).
    pub rx_source_not_allowed: std::sync::atomic::AtomicU64,
    /// Packets sealed on the crypto pool, in batches of more than
    /// [`parallel::CHUNK`] for one peer (pqmesh patch 6).
    pub tx_parallel: std::sync::atomic::AtomicU64,
    /// Packets opened on the crypto pool (pqmesh patch 6).
    pub rx_parallel: std::sync::atomic::AtomicU64,
}

pub(crate) struct DeviceState<T: DeviceTransports> {
    counters: Arc<DeviceCounters>,
    key_pair: Option<(x25519::StaticSecret, x25519::PublicKey)>,
    fwmark: Option<u32>,

    tun_tx: Arc<Mutex<T::IpSend>>,
    /// The tun device reader.
    ///
    /// This is `Arc<Mutex>`:ed because:
    /// - The task responsible from reading from the `tun_rx` must have ownership of it.
    /// - We must be able to claim the ownership after that task is stopped.
    ///
    /// This is implemented by the task taking the lock upon startup, and holding it until it is
    /// stopped.
    tun_rx: Arc<Mutex<T::IpRecv>>,

    /// MTU watcher of the TUN device.
    tun_rx_mtu: MtuWatcher,

    peers: HashMap<x25519::PublicKey, Arc<Mutex<PeerState>>>,
    peers_by_ip: AllowedIps<Arc<Mutex<PeerState>>>,
    peers_by_idx: parking_lot::Mutex<HashMap<u32, Arc<Mutex<PeerState>>>>,
    index_table: IndexTable,

    rate_limiter: Option<Arc<RateLimiter>>,

    port: u16,
    udp_factory: T::UdpTransportFactory,
    connection: Option<Connection<T>>,

    /// Whether the device has been suspended via [`Device::suspend`].
    ///
    /// While suspended, the [`Connection`] (and all its tasks) is torn down so no
    /// traffic flows, but peers, keys, and config are retained for [`Device::resume`].
    suspended: bool,

    /// Whether the data path runs inline, without buffering tasks (pqmesh patch).
    inline: bool,

    /// Whether the inline data path runs on a thread of its own, and how
    /// long that thread busy-polls (pqmesh patch).
    threads: bool,
    busy_poll: Duration,
    /// With `threads`: one thread per direction (pqmesh patch 6).
    split_directions: bool,

    /// Threads that seal and open large batches of one peer's packets
    /// beside the data path (pqmesh patch 6); `None`: all crypto inline.
    /// (Not used with DAITA, whose hooks see each packet on its own.)
    #[cfg_attr(feature = "daita", expect(dead_code))]
    crypto_pool: Option<Arc<parallel::CryptoPool>>,

    /// The task that responds to API requests.
    api: Option<Task>,

    /// If an unrecoverable error occurs (such as the TUN device being deleted),
    /// it will be stored here and propagated to all [`Device`] handles.
    fatal_error: watch::Sender<Option<Error>>,
}

pub(crate) struct Connection<T: DeviceTransports> {
    udp: <T::UdpTransportFactory as UdpTransportFactory>::Send,

    /// The task that reads IPv4 traffic from the UDP socket; `None` when
    /// `outgoing` is the data-path thread that runs both (pqmesh patch).
    incoming: Option<Task>,

    /// The task that handles keepalives/heartbeats/etc.
    timers: Task,

    /// The task that reads traffic from the TUN device (or, pqmesh patch,
    /// the data-path thread).
    outgoing: Task,
}

impl<T: DeviceTransports> Connection<T> {
    #[instrument(level = Level::TRACE, skip_all, ret)]
    pub async fn set_up(device_arc: Arc<RwLock<DeviceState<T>>>) -> Result<(), Error> {
        let mut device = device_arc.write().await;

        // While suspended, no connection may be brought up: a reconfiguration
        // (adding a peer, changing the key/port, a UAPI `set=1`, ...) must not
        // silently resume the tunnel. The config change is still applied to
        // `DeviceState`; [`Device::resume`] brings the connection up afterwards
        // with the latest config.
        if device.suspended {
            return Ok(());
        }

        // pqmesh patch 5: peers (and a port) may be configured before the
        // private key, as in wireguard-go and the kernel. Without a key there
        // is nothing to answer or send with, so the connection comes up when
        // the key is set (`set_key` asks for a reconfiguration).
        if device.key_pair.is_none() {
            return Ok(());
        }

        let pool = PacketBufPool::new_lazy(MAX_PACKET_BUFS);

        // clean up existing connection
        if let Some(conn) = device.connection.take() {
            conn.stop().await;
        }

        let (udp_tx, udp_rx) = device.open_listen_socket().await?;

        // Remember the bound port in case it was 0
        if let Some(addr) = udp_tx.local_addr()? {
            device.port = addr.port();
        }

        if device.inline {
            return Self::set_up_inline(&device_arc, &mut device, udp_tx, udp_rx, pool).await;
        }

        let (buffered_ip_tx, buffered_ip_rx) = crate::tun::buffer::channel(
            MAX_PACKET_BUFS,
            pool.clone(),
            Arc::clone(&device.tun_tx),
            Arc::clone(&device.tun_rx),
        )
        .await?;

        let buffered_udp_tx = BufferedUdpSend::new(MAX_PACKET_BUFS, udp_tx.clone());

        let buffered_udp_rx = BufferedUdpReceive::new(MAX_PACKET_BUFS, udp_rx, pool.clone());

        // Start DAITA/hooks tasks
        #[cfg(feature = "daita")]
        for peer_arc in device.peers.values() {
            PeerState::maybe_start_daita(
                peer_arc,
                pool.clone(),
                device.tun_rx_mtu.clone(),
                buffered_udp_tx.clone(),
            )
            .await?;
        }

        let fatal_error = device.fatal_error.clone();
        let register_fatal_error = move |e| {
            fatal_error.send_if_modified(|option| {
                let has_error = option.is_some();
                if !has_error {
                    *option = Some(e);
                }
                !has_error
            })
        };

        // Start device tasks
        let outgoing = Task::spawn(
            "handle_outgoing",
            DeviceState::handle_outgoing(
                Arc::downgrade(&device_arc),
                buffered_ip_rx,
                buffered_udp_tx.clone(),
                pool.clone(),
            )
            .map_err(register_fatal_error.clone()),
        );
        let timers = Task::spawn(
            "handle_timers",
            DeviceState::handle_timers(Arc::downgrade(&device_arc), buffered_udp_tx.clone()),
        );
        let incoming = Task::spawn(
            "handle_incoming",
            DeviceState::handle_incoming(
                Arc::downgrade(&device_arc),
                buffered_ip_tx.clone(),
                buffered_udp_tx,
                buffered_udp_rx,
                pool.clone(),
            )
            .map_err(register_fatal_error.clone()),
        );

        debug_assert!(device.connection.is_none());
        device.connection = Some(Connection {
            udp: udp_tx,
            incoming: Some(incoming),
            timers,
            outgoing,
        });

        Ok(())
    }
}

impl<T: DeviceTransports> Connection<T> {
    /// The inline data path (pqmesh patch): `handle_outgoing` reads the TUN
    /// device and sends on the socket itself, `handle_incoming` reads the
    /// socket and writes the TUN device itself; no buffering tasks between.
    async fn set_up_inline(
        device_arc: &Arc<RwLock<DeviceState<T>>>,
        device: &mut DeviceState<T>,
        udp_tx: <T::UdpTransportFactory as UdpTransportFactory>::Send,
        udp_rx: <T::UdpTransportFactory as UdpTransportFactory>::Recv,
        pool: PacketBufPool,
    ) -> Result<(), Error> {
        // The previous connection's tasks may still be letting go of these.
        let lock_timeout = Duration::from_secs(5);
        let busy = || Error::IoError(io::Error::other("TUN device still held by a stopped task"));
        let tun_tx = tokio::time::timeout(lock_timeout, Arc::clone(&device.tun_tx).lock_owned())
            .await
            .map_err(|_| busy())?;
        let tun_rx = tokio::time::timeout(lock_timeout, Arc::clone(&device.tun_rx).lock_owned())
            .await
            .map_err(|_| busy())?;

        let fatal_error = device.fatal_error.clone();
        let register_fatal_error = move |e| {
            fatal_error.send_if_modified(|option| {
                let has_error = option.is_some();
                if !has_error {
                    *option = Some(e);
                }
                !has_error
            })
        };
        let outgoing = DeviceState::handle_outgoing(
            Arc::downgrade(device_arc),
            LockedIp(tun_rx),
            udp_tx.clone(),
            pool.clone(),
        )
        .map_err(register_fatal_error.clone())
        .boxed();
        let incoming = DeviceState::handle_incoming(
            Arc::downgrade(device_arc),
            LockedIp(tun_tx),
            udp_tx.clone(),
            udp_rx,
            pool,
        )
        .map_err(register_fatal_error)
        .boxed();
        let (outgoing, incoming) = if device.threads && device.split_directions {
            // Each thread has its own reactor: a transport waits on the
            // thread whose task uses it.
            let out = Task::spawn_thread(
                "data path out",
                vec![("handle_outgoing", outgoing)],
                device.busy_poll,
            )
            .map_err(Error::IoError)?;
            let inc = Task::spawn_thread(
                "data path in",
                vec![("handle_incoming", incoming)],
                device.busy_poll,
            )
            .map_err(Error::IoError)?;
            (out, Some(inc))
        } else if device.threads {
            let tasks = vec![("handle_outgoing", outgoing), ("handle_incoming", incoming)];
            let thread =
                Task::spawn_thread("data path", tasks, device.busy_poll).map_err(Error::IoError)?;
            (thread, None)
        } else {
            let outgoing = Task::spawn("handle_outgoing", outgoing);
            (outgoing, Some(Task::spawn("handle_incoming", incoming)))
        };
        let timers = Task::spawn(
            "handle_timers",
            DeviceState::handle_timers(Arc::downgrade(device_arc), udp_tx.clone()),
        );
        device.connection = Some(Connection {
            udp: udp_tx,
            incoming,
            timers,
            outgoing,
        });
        Ok(())
    }
}

/// A TUN half held for the lifetime of an inline connection (pqmesh patch).
struct LockedIp<I>(tokio::sync::OwnedMutexGuard<I>);

impl<S: IpSend> IpSend for LockedIp<S> {
    fn send(
        &mut self,
        packet: Packet<Ip>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.0.send(packet)
    }

    fn flush(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        self.0.flush()
    }
}

impl<R: IpRecv> IpRecv for LockedIp<R> {
    fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> impl std::future::Future<Output = io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a>> + Send
    {
        self.0.recv(pool)
    }

    fn mtu(&self) -> MtuWatcher {
        self.0.mtu()
    }
}

impl<T: DeviceTransports> Device<T> {
    /// Counters of dropped packets (pqmesh patch).
    pub async fn counters(&self) -> Arc<DeviceCounters> {
        Arc::clone(&self.inner.read().await.counters)
    }

    /// Stop tunneling traffic and shut down the [`Device`].
    pub async fn stop(self) {
        Self::stop_inner(self.inner.clone()).await
    }

    async fn stop_inner(device: Arc<RwLock<DeviceState<T>>>) {
        tracing::debug!("Stopping device");

        let mut device = device.write().await;

        if let Some(api_task) = device.api.take() {
            api_task.stop().await;
        }

        if let Some(connection) = device.connection.take() {
            connection.stop().await;
        }
    }

    /// Suspend the device, stopping all tunnel activity.
    ///
    /// This tears down the connection and all its background tasks (timers,
    /// inbound, and outbound I/O), so no keepalives, handshakes, or data packets are
    /// sent or received. Peers, keys, and configuration are retained, and the device
    /// can be brought back with [`Device::resume`].
    ///
    /// This is primarily intended for platforms such as iOS, where the host process
    /// may be suspended by the system: an explicit suspend stops the timers (whose
    /// clock keeps advancing while suspended) from waking the process and flooding
    /// the link on resume.
    ///
    /// Calling this on an already-suspended device is a no-op.
    pub async fn suspend(&self) {
        tracing::debug!("Suspending device");

        let mut device = self.inner.write().await;

        if device.suspended {
            return;
        }

        if let Some(connection) = device.connection.take() {
            connection.stop().await;
        }

        device.suspended = true;
    }

    /// Resume a device that was suspended with [`Device::suspend`].
    ///
    /// This rebuilds the connection (rebinding sockets and respawning tasks).
    /// Existing sessions are cleared first, so the tunnel performs a fresh handshake
    /// rather than reusing a stale session.
    ///
    /// Calling this on a device that is not suspended is a no-op.
    pub async fn resume(&self) -> Result<(), Error> {
        tracing::debug!("Resuming device");

        {
            let mut device = self.inner.write().await;

            if !device.suspended {
                return Ok(());
            }

            // Force a fresh handshake on resume by dropping any existing sessions.
            for peer in device.peers.values() {
                peer.lock().await.reset();
            }

            device.suspended = false;

            // Nothing to bring up if the device has no peers (and therefore no key).
            if device.peers.is_empty() {
                return Ok(());
            }
        }

        Connection::set_up(self.inner.clone()).await
    }

    /// Wait until there is a session with the peer with `public_key` that is not yet due for
    /// rekeying.
    ///
    /// Returns immediately if such a session exists. Otherwise, a handshake initiation is sent
    /// unless one is already in progress, and this waits until a handshake initiated by us
    /// completes. Note that this function never times out.
    ///
    /// Returns [`Error::PeerNotFound`] if the peer does not exist or is removed while waiting.
    pub async fn force_handshake(&self, public_key: &x25519::PublicKey) -> Result<(), Error> {
        let mut completed = {
            let device = self.inner.read().await;
            let connection = device.connection.as_ref().ok_or(Error::NotConnected)?;
            let peer_arc = device.peers.get(public_key).ok_or(Error::PeerNotFound)?;

            let mut peer = peer_arc.lock().await;
            let Some(PendingHandshake {
                completed,
                initiation,
            }) = peer.force_handshake()?
            else {
                return Ok(());
            };

            if let Some((packet, endpoint_addr)) = initiation {
                let packet = WgKind::from(packet);
                DeviceState::<T>::register_handshake_idx(&device.peers_by_idx, &packet, peer_arc);
                drop(peer);

                // NOTE: Like `handle_timers`, this does not trigger DAITA events.
                connection.udp.send_to(packet.into(), endpoint_addr).await?;
            }

            completed
        };

        // The sender is dropped along with the peer
        completed.changed().await.map_err(|_| Error::PeerNotFound)
    }

    /// Wait until an unrecoverable error occurs.
    pub async fn wait(&mut self) {
        self.fatal_error
            .wait_for(|err| err.is_some())
            .await
            .expect("Sender will not be dropped while Self exists");
    }
}

impl<T: DeviceTransports> Drop for Device<T> {
    fn drop(&mut self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("Failed to get tokio runtime handle");
            return;
        };
        let device = self.inner.clone();
        handle.spawn(async move {
            Self::stop_inner(device).await;
        });
    }
}

/// Do we need to reconfigure the socket?
#[must_use]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reconfigure {
    Yes,
    No,
}

impl BitOrAssign for Reconfigure {
    fn bitor_assign(&mut self, rhs: Self) {
        *self = match (*self, rhs) {
            (Reconfigure::No, Reconfigure::No) => Reconfigure::No,
            _ => Reconfigure::Yes,
        };
    }
}

impl<T: DeviceTransports> DeviceState<T> {
    async fn remove_peer(&mut self, pub_key: &x25519::PublicKey) -> Option<Arc<Mutex<PeerState>>> {
        if let Some(peer) = self.peers.remove(pub_key) {
            // Remove all session index entries that point to this peer
            self.peers_by_idx
                .lock()
                .retain(|_idx, p| !Arc::ptr_eq(&peer, p));
            // Only the peer's own networks, where they still route to it
            // (pqmesh patch 6): no walk over the whole trie per removal,
            // which made replacing 10,000 peers take seconds.
            let mut state = peer.lock().await;
            self.unroute_peer(&peer, &mut state);
            drop(state);

            tracing::info!("Peer removed");

            Some(peer)
        } else {
            None
        }
    }

    fn add_peer(&mut self, peer_builder: Peer) {
        let pub_key = peer_builder.public_key;
        let allowed_ips = peer_builder.allowed_ips.clone();
        let peer = self.create_peer(peer_builder);
        let peer = Arc::new(Mutex::new(peer));

        self.peers.insert(pub_key, Arc::clone(&peer));

        // A network another peer had leaves its list (kernel semantics).
        self.take_from_owners(&allowed_ips);
        for allowed_ip in allowed_ips {
            let addr = allowed_ip.network();
            let cidr = allowed_ip.prefix();
            self.peers_by_ip.insert(addr, cidr, Arc::clone(&peer));
        }

        tracing::info!("Peer added");
    }

    fn create_peer(&mut self, peer_builder: Peer) -> PeerState {
        // pqmesh patch 5: a peer added before the private key gets its
        // handshake state on a throwaway key, which `set_key` replaces (as it
        // replaces the old key on a key change). Nothing is sent with it: no
        // connection exists until the device has a key (`Connection::set_up`).
        let (private_key, rate_limiter) = match (&self.key_pair, &self.rate_limiter) {
            (Some((private_key, _)), Some(rate_limiter)) => {
                (private_key.clone(), Arc::clone(rate_limiter))
            }
            _ => {
                let throwaway = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
                let public_key = x25519::PublicKey::from(&throwaway);
                let rate_limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
                (throwaway, rate_limiter)
            }
        };

        let mut tunn = Tunn::new(
            private_key,
            peer_builder.public_key,
            peer_builder.preshared_key,
            peer_builder.keepalive,
            self.index_table.clone(),
            rate_limiter,
        );

        if let Some(timer_params) = peer_builder.danger_timer_params {
            tunn.dangerously_set_timer_params(timer_params);
        }

        PeerState::new(
            tunn,
            peer_builder.endpoint,
            peer_builder.allowed_ips.as_slice(),
            #[cfg(feature = "daita")]
            peer_builder.daita_settings,
        )
    }

    fn set_port(&mut self, port: u16) -> Reconfigure {
        if self.port == port {
            Reconfigure::No
        } else {
            self.port = port;
            Reconfigure::Yes
        }
    }

    /// Bind two UDP sockets. One for IPv4, one for IPv6.
    async fn open_listen_socket(
        &mut self,
    ) -> Result<
        (
            <T::UdpTransportFactory as UdpTransportFactory>::Send,
            <T::UdpTransportFactory as UdpTransportFactory>::Recv,
        ),
        Error,
    > {
        let params = UdpTransportFactoryParams {
            addr: None,
            port: self.port,
            #[cfg(target_os = "linux")]
            fwmark: self.fwmark,
        };
        let (udp_tx, udp_rx) = self
            .udp_factory
            .bind(&params)
            .await
            .map_err(|e| Error::Bind(e, params))?;
        Ok((udp_tx, udp_rx))
    }

    async fn set_key(&mut self, private_key: x25519::StaticSecret) -> Reconfigure {
        let public_key = x25519::PublicKey::from(&private_key);
        // x25519 (rightly) doesn't let us expose secret keys for comparison.
        // If the public keys are the same, then the private keys are the same.
        if let Some(key_pair) = self.key_pair.as_ref()
            && key_pair.1 == public_key
        {
            return Reconfigure::No;
        }

        let rate_limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));

        for peer in self.peers.values_mut() {
            peer.lock().await.tunnel.set_static_private(
                private_key.clone(),
                public_key,
                Arc::clone(&rate_limiter),
            )
        }

        self.key_pair = Some((private_key, public_key));
        self.rate_limiter = Some(rate_limiter);

        Reconfigure::Yes
    }

    #[cfg(target_os = "linux")]
    fn set_fwmark(&mut self, mark: u32) -> Result<(), Error> {
        self.fwmark = Some(mark);

        if let Some(conn) = &mut self.connection {
            conn.udp.set_fwmark(mark)?;
        }

        // // Then on all currently connected sockets
        // for peer in self.peers.values() {
        //     if let Some(ref sock) = peer.delay_lock().endpoint().conn {
        //         sock.set_mark(mark)?
        //     }
        // }

        Ok(())
    }

    /// Remove all peers.
    ///
    /// # Returns
    /// Returns the number of peers removed.
    fn clear_peers(&mut self) -> usize {
        let n = self.peers.len();
        self.peers.clear();
        self.peers_by_idx.lock().clear();
        self.peers_by_ip.clear();
        // TODO: tear down connection?
        n
    }

    /// If `packet` is a handshake init or response, register its `sender_idx` in `peers_by_idx`.
    fn register_handshake_idx(
        peers_by_idx: &parking_lot::Mutex<HashMap<u32, Arc<Mutex<PeerState>>>>,
        packet: &WgKind,
        peer: &Arc<Mutex<PeerState>>,
    ) {
        let sender_idx = match packet {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        peers_by_idx.lock().insert(sender_idx, Arc::clone(peer));
    }

    #[instrument(level = Level::TRACE, skip_all)]
    async fn handle_timers(device: Weak<RwLock<Self>>, udp: impl UdpSend) {
        loop {
            let Some(device) = device.upgrade() else {
                break;
            };
            let device = device.read().await;
            // Remove stale session indices.
            //
            // `device.index_table` is a singleton which identifies ongoing handshakes and active sessions.
            // Once a session is stale it is dropped (see `update_session_timers`), and its
            // associated index is freed from the table.
            device
                .peers_by_idx
                .lock()
                .retain(|idx, _| device.index_table.in_use(*idx));

            // NOTE: Try to reset the packet counts here in addition to inside of `PeerState::update_timers`.
            // Otherwise if the device has no peers, try_reset_count will never trigger, and packet
            // counts will accumulate indefinitely. Fixes GHSA-m2rr-7rr7-vmp7.
            if let Some(rate_limiter) = device.rate_limiter.as_ref() {
                rate_limiter.try_reset_count();
            }

            // TODO: pass in peers instead?
            let peer_map = &device.peers;

            // Go over each peer and invoke the timer function
            for peer in peer_map.values() {
                let mut p = peer.lock().await;
                let endpoint_addr = match p.endpoint().addr {
                    Some(addr) => addr,
                    None => continue,
                };

                match p.update_timers() {
                    Ok(Some(packet)) => {
                        // Register sender_idx from outgoing handshake packets
                        Self::register_handshake_idx(&device.peers_by_idx, &packet, peer);

                        drop(p);

                        // NOTE: we don't bother with triggering TunnelRecv DAITA events here.

                        let _ = udp.send_to(packet.into(), endpoint_addr).await;
                    }
                    Ok(None) => {}
                    Err(WireGuardError::ConnectionExpired) => {}
                    Err(e) => tracing::error!("Timer error = {e:?}: {e:?}"),
                }
            }

            drop(device);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Read from UDP socket, decapsulate, write to tunnel device
    #[instrument(level = Level::TRACE, skip_all)]
    async fn handle_incoming(
        device: Weak<RwLock<Self>>,
        mut tun_tx: impl IpSend,
        udp_tx: impl UdpSend,
        mut udp_rx: impl UdpRecv,
        mut packet_pool: PacketBufPool,
    ) -> Result<(), Error> {
        let (private_key, public_key, rate_limiter, mut tun_mtu, counters) = {
            let Some(device) = device.upgrade() else {
                return Ok(());
            };
            let device = device.read().await;

            // pqmesh patch 5: unreachable (no connection without a key), but
            // an error rather than a panic if that ever changes.
            let (Some((private_key, public_key)), Some(rate_limiter)) =
                (device.key_pair.clone(), device.rate_limiter.clone())
            else {
                return Err(Error::NoPrivateKey);
            };
            let tun_mtu = device.tun_rx_mtu.clone();
            let counters = Arc::clone(&device.counters);
            (private_key, public_key, rate_limiter, tun_mtu, counters)
        };
        #[cfg(not(feature = "daita"))]
        let crypto_pool = Self::crypto_pool(&device).await;

        // Received datagrams, in reverse order (pqmesh patch: batches).
        let mut recv_many_buf = Default::default();
        let mut received = Vec::new();
        loop {
            let Some((src_buf, addr)) = received.pop() else {
                // The batch is done: a batching TUN writer writes it now.
                tun_tx.flush().await.map_err(Error::IoError)?;
                udp_rx
                    .recv_many_from(&mut recv_many_buf, &mut packet_pool, &mut received)
                    .await
                    .map_err(Error::IoError)?;
                received.reverse();
                continue;
            };

            // pqmesh patch 6: a long run of one session's data packets from
            // one source is opened on the crypto pool, then delivered in
            // arrival order before anything received after it.
            #[cfg(not(feature = "daita"))]
            if let Some(pool) = &crypto_pool
                && let Some(idx) = data_receiver_idx(&src_buf)
            {
                let more = received
                    .iter()
                    .rev()
                    .take_while(|(next, from)| {
                        *from == addr && data_receiver_idx(next) == Some(idx)
                    })
                    .count();
                if more >= CHUNK {
                    let mut run = Vec::with_capacity(1 + more);
                    run.push(src_buf);
                    // `received` is in reverse order.
                    run.extend(
                        received
                            .drain(received.len() - more..)
                            .rev()
                            .map(|(p, _)| p),
                    );
                    let Some(device) = device.upgrade() else {
                        return Ok(());
                    };
                    let device_guard = device.read().await;
                    device_guard
                        .receive_parallel(pool, idx, addr, run, &rate_limiter, &mut tun_tx)
                        .await?;
                    continue;
                }
            }

            let parsed_packet = match rate_limiter.verify_packet(addr, src_buf) {
                Ok(packet) => packet,
                Err(TunnResult::WriteToNetwork(WgKind::CookieReply(cookie))) => {
                    // Note: Cookies should not affect counters.
                    udp_tx
                        .send_to(cookie.into(), addr)
                        .await
                        .map_err(Error::IoError)?;
                    continue;
                }
                Err(_) => continue,
            };

            let Some(device) = device.upgrade() else {
                return Ok(());
            };

            let device_guard = device.read().await;
            let peers = &device_guard.peers;
            let peer = match &parsed_packet {
                WgKind::HandshakeInit(p) => parse_handshake_anon(&private_key, &public_key, p)
                    .ok()
                    .and_then(|hh| peers.get(&x25519::PublicKey::from(hh.peer_static_public)))
                    .cloned(),
                WgKind::HandshakeResp(p) => device_guard
                    .peers_by_idx
                    .lock()
                    .get(&p.receiver_idx.get())
                    .cloned(),
                WgKind::CookieReply(p) => device_guard
                    .peers_by_idx
                    .lock()
                    .get(&p.receiver_idx.get())
                    .cloned(),
                WgKind::Data(p) => device_guard
                    .peers_by_idx
                    .lock()
                    .get(&p.header.receiver_idx.get())
                    .cloned(),
            };
            let Some(peer_arc) = peer else { continue };
            let mut peer = peer_arc.lock().await;

            let result = peer.handle_incoming_packet(parsed_packet, addr);

            #[cfg(feature = "daita")]
            let PeerState { tunnel, daita, .. } = &mut *peer;
            #[cfg(not(feature = "daita"))]
            let PeerState { tunnel, .. } = &mut *peer;

            match result {
                TunnResult::Done => {}
                TunnResult::Err(_) => continue,
                // Flush pending queue
                TunnResult::WriteToNetwork(packet) => {
                    // Register sender_idx from outgoing handshake packets
                    Self::register_handshake_idx(&device_guard.peers_by_idx, &packet, &peer_arc);

                    // TODO: does this end up with the packets being out-of-order?
                    let packets =
                        std::iter::once(packet).chain(tunnel.get_queued_packets(&mut tun_mtu));

                    #[cfg(feature = "daita")]
                    let packets = packets.filter_map(|p| match daita {
                        Some(daita) => daita.on_tunnel_sent(p),
                        None => Some(p),
                    });

                    for packet in packets {
                        if let Err(_err) = udp_tx.send_to(packet.into(), addr).await {
                            tracing::trace!("udp.send_to failed");
                            break;
                        }
                    }
                }
                #[cfg_attr(not(feature = "daita"), expect(unused_mut))]
                TunnResult::WriteToTunnel(mut packet) => {
                    #[cfg(feature = "daita")]
                    if let Some(daita) = daita {
                        match daita.on_data_recv(packet) {
                            Some(new) => packet = new,
                            None => continue,
                        }
                    }

                    // keepalive
                    if packet.is_empty() {
                        continue;
                    }
                    let Ok(packet) = packet.try_into_ipvx() else {
                        continue;
                    };

                    // Only accept the incoming packet if an outgoing packet to the source IP address
                    // would be routed to the same peer. This is determined by the most specific
                    // matching allowed IP range on the device.
                    let (source, packet): (IpAddr, _) = packet.either(
                        |ipv4| (ipv4.header.source().into(), ipv4.into()),
                        |ipv6| (ipv6.header.source().into(), ipv6.into()),
                    );
                    let routed_to_this_peer = device_guard
                        .peers_by_ip
                        .find(source)
                        .is_some_and(|owner| Arc::ptr_eq(owner, &peer_arc));
                    if !routed_to_this_peer {
                        counters
                            .rx_source_not_allowed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if cfg!(debug_assertions) {
                            let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into();
                            tracing::warn!(
                                "peer at {} is not allowed to send us packets from: {source}",
                                peer.endpoint().addr.unwrap_or(unspecified)
                            );
                        }
                        continue;
                    }

                    if let Err(e) = tun_tx.send(packet).await {
                        tracing::trace!("buffered_tun_send.send failed");
                        return Err(Error::IoError(e));
                    }
                }
            }
        }
    }

    /// Read from tunnel device, encapsulate, and write to UDP socket for the corresponding peer
    #[instrument(level = Level::TRACE, skip_all)]
    async fn handle_outgoing(
        device: Weak<RwLock<Self>>,
        mut tun_rx: impl IpRecv,
        udp: impl UdpSend,
        mut packet_pool: PacketBufPool,
    ) -> Result<(), Error> {
        let mut tun_mtu = {
            let Some(device) = device.upgrade() else {
                return Ok(());
            };
            let device = device.read().await;
            device.tun_rx_mtu.clone()
        };
        #[cfg(not(feature = "daita"))]
        let crypto_pool = Self::crypto_pool(&device).await;

        // Encrypted packets of one TUN read, sent together (pqmesh patch).
        let mut send_many_buf = Default::default();
        let mut to_send = Vec::new();
        let max_batch = udp.max_number_of_packets_to_send().max(1);
        loop {
            Self::send_batch(&udp, &mut send_many_buf, &mut to_send).await;
            let packets = match tun_rx.recv(&mut packet_pool).await {
                Ok(packets) => packets,
                Err(e) => {
                    tracing::error!("Unexpected error on tun interface: {e:?}");
                    return Err(Error::IoError(e));
                }
            };

            #[cfg(not(feature = "daita"))]
            if let Some(pool) = &crypto_pool {
                let Some(device_arc) = device.upgrade() else {
                    return Ok(());
                };
                let device_guard = device_arc.read().await;
                let mut outbox = Outbox {
                    udp: &udp,
                    buf: &mut send_many_buf,
                    to_send: &mut to_send,
                    max_batch,
                };
                device_guard
                    .send_parallel(pool, packets, &mut outbox, &mut tun_mtu)
                    .await;
                continue;
            }

            for packet in packets {
                // Determine peer to use from the destination address
                let Some(dst_addr) = packet.destination() else {
                    continue;
                };

                let Some(device_arc) = device.upgrade() else {
                    return Ok(());
                };

                let device_guard = device_arc.read().await;

                let Some(peer_arc) = device_guard.peers_by_ip.find(dst_addr).cloned() else {
                    if cfg!(debug_assertions) {
                        tracing::trace!("Dropping packet with no routable peer");
                    }

                    // Drop packet if no peer has allowed IPs for destination
                    drop(packet);
                    continue;
                };

                let mut peer = peer_arc.lock().await;
                let Some(peer_addr) = peer.endpoint().addr else {
                    // TODO: Implement the following error handling from section 3 of the
                    // whitepaper: If [peer_addr] matches no peer, it is dropped, and the sender is
                    // informed by a standard ICMP “no route to host” packet, as well as returning
                    // -ENOKEY to user space.
                    tracing::error!("No endpoint");
                    continue;
                };

                #[cfg(feature = "daita")]
                let PeerState { tunnel, daita, .. } = &mut *peer;
                #[cfg(not(feature = "daita"))]
                let PeerState { tunnel, .. } = &mut *peer;

                #[cfg(feature = "daita")]
                let packet = match daita {
                    Some(daita) => daita.on_normal_sent(packet),
                    None => packet.into(),
                };
                #[cfg(not(feature = "daita"))]
                let packet = packet.into();

                let Some(packet) = tunnel.handle_outgoing_packet(packet, Some(&mut tun_mtu)) else {
                    continue;
                };

                // Register sender_idx from outgoing handshake packets
                Self::register_handshake_idx(&device_guard.peers_by_idx, &packet, &peer_arc);

                #[cfg(feature = "daita")]
                let packet = match daita {
                    None => packet.into(),
                    Some(daita) => match daita.on_tunnel_sent(packet) {
                        Some(packet) => packet.into(),
                        None => continue,
                    },
                };
                #[cfg(not(feature = "daita"))]
                let packet = packet.into();

                drop(peer); // release lock
                drop(device_guard);

                // One batch holds one address family, as send_many_to asks.
                let other_family = to_send
                    .last()
                    .is_some_and(|(_, to): &(_, SocketAddr)| to.is_ipv4() != peer_addr.is_ipv4());
                if other_family || to_send.len() >= max_batch {
                    Self::send_batch(&udp, &mut send_many_buf, &mut to_send).await;
                }
                to_send.push((packet, peer_addr));
            }
        }
    }

    /// Sends and empties `packets` (pqmesh patch); a failed send drops them.
    async fn send_batch<U: UdpSend>(
        udp: &U,
        buf: &mut U::SendManyBuf,
        packets: &mut Vec<(crate::packet::Packet, SocketAddr)>,
    ) {
        send_batch(udp, buf, packets).await
    }

    #[cfg(not(feature = "daita"))]
    async fn crypto_pool(device: &Weak<RwLock<Self>>) -> Option<Arc<CryptoPool>> {
        device.upgrade()?.read().await.crypto_pool.clone()
    }

    /// `handle_outgoing` with a crypto pool (pqmesh patch 6), for one TUN
    /// read: routed under one read lock, then taken in runs of consecutive
    /// packets for the same peer. A run of more than [`CHUNK`] gets its
    /// counters reserved in order under the peer's lock and is sealed on
    /// the pool with the lock released; the sealed packets leave in the
    /// run's order. Shorter runs, and whatever has no session or no counter
    /// left, take the per-packet path (queue, handshake).
    #[cfg(not(feature = "daita"))]
    async fn send_parallel<U: UdpSend>(
        &self,
        pool: &CryptoPool,
        packets: impl Iterator<Item = Packet<Ip>>,
        out: &mut Outbox<'_, U>,
        tun_mtu: &mut MtuWatcher,
    ) {
        let mut routed = packets
            .filter_map(|packet| {
                let peer = self.peers_by_ip.find(packet.destination()?)?;
                Some((Arc::clone(peer), packet))
            })
            .peekable();
        while let Some((peer_arc, first)) = routed.next() {
            let mut group = vec![first];
            while let Some((_, packet)) = routed.next_if(|(p, _)| Arc::ptr_eq(p, &peer_arc)) {
                group.push(packet);
            }
            let mut peer = peer_arc.lock().await;
            let Some(peer_addr) = peer.endpoint().addr else {
                tracing::error!("No endpoint");
                continue;
            };
            let mut padded: Vec<Packet> = group
                .into_iter()
                .map(|packet| crate::noise::pad_to_x16(packet.into(), tun_mtu))
                .collect();
            if padded.len() > CHUNK {
                let bytes = padded.iter().map(|p| p.len() + WgData::OVERHEAD).sum();
                let data = padded.iter().any(|p| !p.is_empty());
                // Counts the whole run's bytes even if fewer counters are
                // granted: that happens once per 2^64 - 2^13 packets.
                if let Some((session, base, granted)) =
                    peer.tunnel.begin_send(padded.len(), bytes, data)
                {
                    let granted =
                        usize::try_from(granted).map_or(padded.len(), |g| g.min(padded.len()));
                    let rest = padded.split_off(granted);
                    let batch = std::mem::replace(&mut padded, rest);
                    drop(peer);
                    self.counters
                        .tx_parallel
                        .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    for item in pool.run(&Job::seal(session, base, batch)) {
                        if let Item::Sealed(packet) = item {
                            out.push(packet.into_bytes(), peer_addr).await;
                        }
                    }
                    if padded.is_empty() {
                        continue;
                    }
                    peer = peer_arc.lock().await;
                }
            }
            for packet in padded {
                // Already padded.
                let Some(packet) = peer.tunnel.handle_outgoing_packet(packet, None) else {
                    continue;
                };
                Self::register_handshake_idx(&self.peers_by_idx, &packet, &peer_arc);
                out.push(packet.into(), peer_addr).await;
            }
        }
    }

    /// `handle_incoming` with a crypto pool (pqmesh patch 6), for a run of
    /// more than [`CHUNK`] data packets from `addr` to receiver index `idx`,
    /// in arrival order. Opened on the pool with the peer unlocked; then, in
    /// order and under the peer's lock, each counter is marked in the replay
    /// window (a replay that raced through decryption is dropped here), the
    /// session's timers and bytes, the endpoint and cryptokey routing are
    /// done as `PeerState::handle_incoming_packet` and the per-packet path
    /// do them, and the packet goes to the TUN device. The device's read
    /// lock is held throughout, so a peer removed before the run started
    /// gets nothing through, and one being removed waits for the run.
    #[cfg(not(feature = "daita"))]
    async fn receive_parallel(
        &self,
        pool: &CryptoPool,
        idx: u32,
        addr: SocketAddr,
        run: Vec<Packet>,
        rate_limiter: &RateLimiter,
        tun_tx: &mut impl IpSend,
    ) -> Result<(), Error> {
        let wire: Vec<Packet<WgData>> = run
            .into_iter()
            .filter_map(
                |datagram| match rate_limiter.verify_packet(addr, datagram) {
                    Ok(WgKind::Data(packet)) => Some(packet),
                    // Not reached: `data_receiver_idx` checked the type and size.
                    _ => None,
                },
            )
            .collect();
        let Some(peer_arc) = self.peers_by_idx.lock().get(&idx).cloned() else {
            return Ok(());
        };
        // Without the session every packet would fail as `NoCurrentSession`.
        let Some((slot, session)) = peer_arc.lock().await.tunnel.session_for_receive(idx) else {
            return Ok(());
        };
        self.counters
            .rx_parallel
            .fetch_add(wire.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let opened = pool.run(&Job::open(Arc::clone(&session), wire));

        let mut peer = peer_arc.lock().await;
        // The timers may have replaced the session while the peer was
        // unlocked; its packets would then fail, as they do inline.
        let same_session = peer
            .tunnel
            .session_for_receive(idx)
            .is_some_and(|(s, current)| s == slot && Arc::ptr_eq(&current, &session));
        if !same_session {
            return Ok(());
        }
        for item in opened {
            let (counter, packet) = match item {
                Item::Opened(counter, packet) => (counter, packet),
                Item::Failed(e) => {
                    tracing::trace!("data packet refused: {e:?}");
                    continue;
                }
                _ => continue,
            };
            if session.mark(counter).is_err() {
                continue;
            }
            peer.tunnel
                .commit_receive(slot, packet.len(), !packet.is_empty());
            peer.endpoint.addr = Some(addr);
            // keepalive
            if packet.is_empty() {
                continue;
            }
            let Ok(packet) = packet.try_into_ipvx() else {
                continue;
            };
            let (source, packet): (IpAddr, _) = packet.either(
                |ipv4| (ipv4.header.source().into(), ipv4.into()),
                |ipv6| (ipv6.header.source().into(), ipv6.into()),
            );
            let routed_to_this_peer = self
                .peers_by_ip
                .find(source)
                .is_some_and(|owner| Arc::ptr_eq(owner, &peer_arc));
            if !routed_to_this_peer {
                self.counters
                    .rx_source_not_allowed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            tun_tx.send(packet).await.map_err(Error::IoError)?;
        }
        Ok(())
    }
}

/// Sends and empties `packets` (pqmesh patch); a failed send drops them.
async fn send_batch<U: UdpSend>(
    udp: &U,
    buf: &mut U::SendManyBuf,
    packets: &mut Vec<(crate::packet::Packet, SocketAddr)>,
) {
    if packets.len() > 1 {
        if udp.send_many_to(buf, packets).await.is_err() {
            tracing::trace!("udp.send_many_to failed");
        }
    } else if let Some((packet, to)) = packets.pop() {
        if udp.send_to(packet, to).await.is_err() {
            tracing::trace!("udp.send_to failed");
        }
    }
    packets.clear();
}

/// Encrypted packets of one TUN read on their way to the socket, batched
/// as `handle_outgoing` batches them (pqmesh patch 6).
#[cfg(not(feature = "daita"))]
struct Outbox<'a, U: UdpSend> {
    udp: &'a U,
    buf: &'a mut U::SendManyBuf,
    to_send: &'a mut Vec<(Packet, SocketAddr)>,
    max_batch: usize,
}

#[cfg(not(feature = "daita"))]
impl<U: UdpSend> Outbox<'_, U> {
    async fn push(&mut self, packet: Packet, to: SocketAddr) {
        // One batch holds one address family, as send_many_to asks.
        let other_family = self
            .to_send
            .last()
            .is_some_and(|(_, last)| last.is_ipv4() != to.is_ipv4());
        if other_family || self.to_send.len() >= self.max_batch {
            send_batch(self.udp, self.buf, self.to_send).await;
        }
        self.to_send.push((packet, to));
    }
}

/// The receiver index of a datagram that will parse as a WireGuard data
/// packet (type and size as `Packet::try_into_wg` checks them), read
/// without consuming it (pqmesh patch 6).
#[cfg(not(feature = "daita"))]
fn data_receiver_idx(datagram: &[u8]) -> Option<u32> {
    if datagram.len() < WgData::OVERHEAD || datagram.first() != Some(&WgPacketType::Data.0) {
        return None;
    }
    Some(u32::from_le_bytes(datagram.get(4..8)?.try_into().ok()?))
}

impl<T: DeviceTransports> Connection<T> {
    async fn stop(self) {
        let Self {
            udp,
            incoming,
            timers,
            outgoing,
        } = self;
        drop(udp);

        let incoming = async {
            if let Some(incoming) = incoming {
                incoming.stop().await
            }
        };
        join!(incoming, timers.stop(), outgoing.stop(),);
    }
}
