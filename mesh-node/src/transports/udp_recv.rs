//! UDP receive: `recvmmsg` with UDP GRO into buffers reused across calls.
//!
//! gotatun's own receiver allocates its `recvmmsg` headers on every call and
//! reads up to 100 messages of 256 KiB; each call here reuses the same few
//! 64 KiB buffers (every page the kernel writes into stays resident) and
//! allocates nothing. A GRO message is cut back into its datagrams, each
//! copied into a packet from gotatun's pool, except path probes, which are
//! answered here and never reach gotatun (`probe.rs`).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use gotatun::packet::{Packet, PacketBufPool};
use gotatun::udp::UdpRecv;

use super::probe::Responder;
use super::udp::ControlBuf;
use super::udp_socket::UdpSocket;

const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;
/// Messages per `recvmmsg`; each carries up to 64 coalesced datagrams.
const MESSAGES: usize = 4;
/// One message holds at most one IP datagram's worth of UDP payload.
const MESSAGE_BYTES: usize = 65536;

/// The receiving half of our socket.
pub struct GroRecv {
    socket: Arc<UdpSocket>,
    probes: Responder,
}

impl GroRecv {
    pub fn new(socket: Arc<UdpSocket>) -> Self {
        Self {
            socket,
            probes: Responder::new(&crate::counters::PROBES),
        }
    }
}

/// The buffers of one `recvmmsg`, kept between calls.
pub struct GroBufs {
    data: Vec<u8>,
    names: [libc::sockaddr_storage; MESSAGES],
    control: [ControlBuf; MESSAGES],
}

impl Default for GroBufs {
    fn default() -> Self {
        Self {
            data: vec![0; MESSAGES * MESSAGE_BYTES],
            // SAFETY: all-zero is a valid sockaddr_storage.
            names: unsafe { std::mem::zeroed() },
            control: [ControlBuf::new(); MESSAGES],
        }
    }
}

impl UdpRecv for GroRecv {
    type RecvManyBuf = GroBufs;

    async fn recv_from(&mut self, pool: &mut PacketBufPool) -> io::Result<(Packet, SocketAddr)> {
        let mut bufs = GroBufs::default();
        let mut packets = Vec::new();
        while packets.is_empty() {
            self.recv_many_from(&mut bufs, pool, &mut packets).await?;
        }
        Ok(packets.swap_remove(0))
    }

    /// Waits for at least one message, then takes what `recvmmsg` has.
    async fn recv_many_from(
        &mut self,
        bufs: &mut GroBufs,
        pool: &mut PacketBufPool,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        let mut received = [(0, None); MESSAGES];
        let n = loop {
            match recv_messages(self.socket.as_fd().as_raw_fd(), bufs, &mut received) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    super::wait_ready(self.socket.as_fd(), libc::POLLIN).await?
                }
                other => break other?,
            }
        };
        for (i, &(len, gro_size)) in received[..n].iter().enumerate() {
            let Some(from) = source(&bufs.names[i]) else {
                continue;
            };
            let message = &bufs.data[i * MESSAGE_BYTES..][..len];
            // Without GRO the message is one datagram.
            let segment = gro_size.filter(|&s| s > 0).unwrap_or(len.max(1));
            for datagram in message.chunks(segment) {
                // One byte compare for WireGuard packets (types 1-4).
                if Responder::may_be_probe(datagram)
                    && self.probes.receive(datagram, from, &self.socket)
                {
                    continue;
                }
                let mut packet = pool.get();
                packet.buf_mut().clear();
                packet.buf_mut().extend_from_slice(datagram);
                packets.push((packet, from));
            }
        }
        Ok(())
    }

    /// GRO is switched on when the socket is bound.
    fn enable_udp_gro(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One non-blocking `recvmmsg`. Returns how many messages arrived and puts
/// each one's length and GRO segment size (if the kernel coalesced it) in
/// `received`.
fn recv_messages(
    fd: libc::c_int,
    bufs: &mut GroBufs,
    received: &mut [(usize, Option<usize>); MESSAGES],
) -> io::Result<usize> {
    let mut iovs: [libc::iovec; MESSAGES] = std::array::from_fn(|i| libc::iovec {
        iov_base: bufs.data[i * MESSAGE_BYTES..].as_mut_ptr().cast(),
        iov_len: MESSAGE_BYTES,
    });
    let iovs = iovs.as_mut_ptr();
    // SAFETY: all-zero is a valid mmsghdr; every pointer set below points
    // into `bufs` or `iovs`, which outlive the call.
    let mut headers: [libc::mmsghdr; MESSAGES] = unsafe { std::mem::zeroed() };
    for (i, header) in headers.iter_mut().enumerate() {
        let h = &mut header.msg_hdr;
        h.msg_name = (&mut bufs.names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: i < MESSAGES, the length of the iovec array.
        h.msg_iov = unsafe { iovs.add(i) };
        h.msg_iovlen = 1;
        h.msg_control = bufs.control[i].as_mut_ptr();
        h.msg_controllen = bufs.control[i].len() as _;
    }
    // SAFETY: headers describe MESSAGES valid, writable buffers.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            headers.as_mut_ptr(),
            MESSAGES as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (slot, header) in received.iter_mut().zip(&headers[..n]) {
        *slot = (header.msg_len as usize, gro_size(&header.msg_hdr));
    }
    Ok(n)
}

/// The `UDP_GRO` control message's segment size, if present.
fn gro_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: msg was filled in by recvmmsg; CMSG_* walk its control buffer
    // within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok();
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    None
}

/// The sender's address; an IPv4 sender on a dual-stack socket arrives
/// v4-mapped and is given back as IPv4, as gotatun's socket does.
fn source(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match name.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddrV4::new(v4, port).into(),
                None => SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transports::udp::GsoUdpFactory;
    use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};

    async fn bind() -> (impl UdpSend, GroRecv, u16) {
        let params = UdpTransportFactoryParams {
            addr: None,
            port: 0,
            fwmark: None,
        };
        let (send, recv) = GsoUdpFactory {
            buffer_size: 1 << 20,
        }
        .bind(&params)
        .await
        .unwrap();
        let port = send.local_addr().unwrap().unwrap().port();
        (send, recv, port)
    }

    /// Loopback keeps a GSO send whole for a GRO socket, so this covers the
    /// split of a coalesced message as well as plain datagrams.
    #[tokio::test]
    async fn gso_batches_arrive_split_in_order_from_an_ipv4_source() {
        let (a_send, _a_recv, a_port) = bind().await;
        let (_b_send, mut b_recv, b_port) = bind().await;
        let to = SocketAddr::from(([127, 0, 0, 1], b_port));
        let mut pool = PacketBufPool::new(64);
        // Ten equal datagrams (one GSO send), then a short one and an empty one.
        let mut batch: Vec<(Packet, SocketAddr)> = (0..10u8)
            .map(|i| (Packet::copy_from(&[i; 1000][..]), to))
            .collect();
        batch.push((Packet::copy_from(&[99u8; 10][..]), to));
        a_send
            .send_many_to(&mut Default::default(), &mut batch)
            .await
            .unwrap();
        a_send
            .send_to(Packet::copy_from(&[][..]), to)
            .await
            .unwrap();
        a_send
            .send_to(Packet::copy_from(&[7u8; 3][..]), to)
            .await
            .unwrap();

        // Off a data-path thread the receiver cannot block: it reports
        // WouldBlock, and the test polls.
        let mut bufs = GroBufs::default();
        let mut got = Vec::new();
        for _ in 0..500 {
            if got.len() == 12 {
                break;
            }
            match b_recv.recv_many_from(&mut bufs, &mut pool, &mut got).await {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                other => other.unwrap(),
            }
        }
        assert_eq!(got.len(), 12, "datagrams arrive: {got:?}");
        let from = SocketAddr::from(([127, 0, 0, 1], a_port));
        assert!(got.iter().all(|(_, src)| *src == from), "{got:?}");
        for (i, (packet, _)) in got[..10].iter().enumerate() {
            assert_eq!(&packet[..], &[i as u8; 1000][..]);
        }
        assert_eq!(&got[10].0[..], &[99u8; 10][..]);
        // The empty datagram is skipped, and the receiver goes on.
        assert_eq!(&got[11].0[..], &[7u8; 3][..]);
    }
}
