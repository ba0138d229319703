//! UDP with generic segmentation offload on send.
//!
//! gotatun's UDP transport sends a batch with `sendmmsg`: one datagram, one
//! trip through the kernel's UDP/IP stack each. With `UDP_SEGMENT`, a run of
//! equal-sized datagrams to one destination goes down as one buffer and the
//! kernel (or the NIC) cuts it as late as possible; across a veth or a real
//! NIC with UDP GRO, the receiver's stack sees one packet too. Receiving is in
//! `udp_recv.rs`, the socket in `udp_socket.rs`. If the kernel refuses GSO,
//! each datagram is sent on its own from then on. A segment larger than the
//! egress MTU cannot be sent with GSO at all (EMSGSIZE: GSO never fragments),
//! so such runs go one datagram at a time, which the kernel fragments, and
//! the size is remembered.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use gotatun::packet::Packet;
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use tracing::{debug, warn};

use super::udp_recv::GroRecv;
use super::udp_socket::UdpSocket;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// The kernel's limit on segments in one GSO send.
const MAX_SEGMENTS: usize = 64;

/// A control-message buffer with room for one message of an int (`UDP_SEGMENT`
/// on send, `UDP_GRO` on receive). The `CMSG_*` macros read and write a
/// `cmsghdr` in place, so the buffer must have `cmsghdr`'s alignment (8 on
/// 64-bit Linux), which a byte array does not promise.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ControlBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; CONTROL_BYTES],
}

/// `CMSG_SPACE` of an int is 24 on 64-bit Linux (16 on 32-bit).
const CONTROL_BYTES: usize = 32;

impl ControlBuf {
    pub(crate) const fn new() -> Self {
        Self {
            _align: [],
            bytes: [0; CONTROL_BYTES],
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.bytes.as_mut_ptr().cast()
    }

    pub(crate) const fn len(&self) -> usize {
        CONTROL_BYTES
    }
}
/// One send is at most one IP datagram's worth of UDP payload.
const MAX_GSO_BYTES: usize = 65000;

/// Binds our UDP socket: GSO on send, GRO on receive.
pub struct GsoUdpFactory {
    /// `SO_RCVBUF` and `SO_SNDBUF` (capped by net.core.{r,w}mem_max).
    pub buffer_size: usize,
}

impl UdpTransportFactory for GsoUdpFactory {
    type Send = GsoSend;
    type Recv = GroRecv;

    async fn bind(&mut self, params: &UdpTransportFactoryParams) -> io::Result<(GsoSend, GroRecv)> {
        let socket = Arc::new(UdpSocket::bind(params, self.buffer_size)?);
        Ok((
            GsoSend {
                socket: Arc::clone(&socket),
                gso: Arc::new(AtomicBool::new(true)),
                too_big: Arc::new(AtomicUsize::new(usize::MAX)),
            },
            GroRecv::new(socket),
        ))
    }
}

#[derive(Clone)]
pub struct GsoSend {
    socket: Arc<UdpSocket>,
    /// Cleared when the kernel refuses UDP_SEGMENT.
    gso: Arc<AtomicBool>,
    /// Smallest segment size that failed with EMSGSIZE (larger than the MTU).
    too_big: Arc<AtomicUsize>,
}

/// Reused between calls: the coalesced datagrams of one send.
#[derive(Default)]
pub struct GsoBuf {
    data: Vec<u8>,
}

/// Length of the run of packets from the start of `packets` that can go in
/// one GSO send: same destination, same size (the last may be shorter).
pub fn run_length(packets: impl IntoIterator<Item = (usize, SocketAddr)>) -> usize {
    let mut packets = packets.into_iter().peekable();
    let Some(&(seg, dst)) = packets.peek() else {
        return 0;
    };
    let mut total = 0;
    let mut count = 0;
    for (i, (len, to)) in packets.enumerate() {
        if i == MAX_SEGMENTS || to != dst || len > seg || total + len > MAX_GSO_BYTES {
            return i;
        }
        total += len;
        count = i + 1;
        if len < seg {
            return count;
        }
    }
    count
}

impl GsoSend {
    /// One `sendmsg` of `data` to `dst`, cut by the kernel into `seg`-byte
    /// datagrams; waits while the send buffer is full.
    async fn send_segments(&self, data: &[u8], seg: u16, dst: SocketAddr) -> io::Result<()> {
        let addr = self.socket.sockaddr(dst);
        loop {
            match send_segments_now(self.socket.as_fd().as_raw_fd(), data, seg, &addr) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    super::wait_ready(self.socket.as_fd(), libc::POLLOUT).await?
                }
                other => return other,
            }
        }
    }

    /// Sends a run of packets one datagram each.
    async fn send_each(
        &self,
        packets: impl Iterator<Item = (Packet, SocketAddr)>,
    ) -> io::Result<()> {
        for (packet, to) in packets {
            self.socket.send_to(&packet, to).await?;
        }
        Ok(())
    }
}

/// One non-blocking `sendmsg` with a `UDP_SEGMENT` control message.
fn send_segments_now(
    fd: libc::c_int,
    data: &[u8],
    seg: u16,
    addr: &socket2::SockAddr,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = ControlBuf::new();
    debug_assert!(space <= control.len());
    // SAFETY: all-zero is a valid msghdr; every pointer set below
    // points into a local that outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg of a u16.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg);
    }
    // SAFETY: msg is fully initialised above.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl UdpSend for GsoSend {
    type SendManyBuf = GsoBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.socket.send_to(&packet, destination).await
    }

    async fn send_many_to(
        &self,
        buf: &mut GsoBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        if !self.gso.load(Ordering::Relaxed) {
            return self.send_each(packets.drain(..)).await;
        }
        while !packets.is_empty() {
            let n = run_length(packets.iter().map(|(p, a)| (p.len(), *a)));
            let (seg, dst) = (packets[0].0.len(), packets[0].1);
            if n > 1 && seg < self.too_big.load(Ordering::Relaxed) {
                buf.data.clear();
                for (p, _) in &packets[..n] {
                    buf.data.extend_from_slice(&p[..]);
                }
                match self.send_segments(&buf.data, seg as u16, dst).await {
                    Ok(()) => {
                        packets.drain(..n);
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                        // Larger than the egress MTU: only fragmentation helps.
                        self.too_big.fetch_min(seg, Ordering::Relaxed);
                        debug!(
                            "udp: {seg}-byte segments exceed the MTU to {dst}; sending them unsegmented"
                        );
                    }
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT)
                        ) =>
                    {
                        warn!(
                            "udp: kernel refuses UDP GSO ({e}); one datagram per send from now on"
                        );
                        self.gso.store(false, Ordering::Relaxed);
                        return self.send_each(packets.drain(..)).await;
                    }
                    Err(e) => {
                        packets.clear();
                        return Err(e);
                    }
                }
            }
            // One packet, or segments GSO cannot carry: the kernel fragments.
            self.send_each(packets.drain(..n)).await?;
        }
        Ok(())
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        MAX_SEGMENTS
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.socket.local_addr().map(Some)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.socket.set_fwmark(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn control_buffers_are_aligned_for_cmsghdr_and_hold_an_int() {
        assert!(std::mem::align_of::<ControlBuf>() >= std::mem::align_of::<libc::cmsghdr>());
        let mut bufs = [ControlBuf::new(); 3];
        for b in &mut bufs {
            assert_eq!(
                b.as_mut_ptr() as usize % std::mem::align_of::<libc::cmsghdr>(),
                0
            );
        }
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
        assert!(space as usize <= ControlBuf::new().len());
    }

    #[test]
    fn runs_follow_gso_rules() {
        assert_eq!(run_length([]), 0);
        assert_eq!(run_length([(100, a(1)); 5]), 5);
        // A shorter packet ends the run (and belongs to it).
        assert_eq!(
            run_length([(100, a(1)), (100, a(1)), (60, a(1)), (100, a(1))]),
            3
        );
        // A longer one or another destination starts a new run.
        assert_eq!(run_length([(100, a(1)), (120, a(1))]), 1);
        assert_eq!(run_length([(100, a(1)), (100, a(2))]), 1);
        // At most 64 segments and 65000 bytes.
        assert_eq!(run_length([(10, a(1)); 100]), MAX_SEGMENTS);
        assert_eq!(run_length([(1500, a(1)); 60]), 65000 / 1500);
    }
}
