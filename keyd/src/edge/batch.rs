//! Batched UDP on the relay socket: the data plane sends its packets in GSO
//! bursts, and one `recvmsg` with `UDP_GRO` takes a whole burst back (one
//! wake-up and one system call for up to 64 packets instead of one each);
//! packets for the data plane go down the same way, a run of equal-sized
//! ones in one `sendmsg` with `UDP_SEGMENT`. (mesh-node's transports do the
//! same on the WireGuard socket, with its own buffers and gotatun's types.)

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// The kernel's limit on segments in one GSO send.
pub const MAX_SEGMENTS: usize = 64;
/// A receive buffer holds any (coalesced) message.
pub const MAX_BATCH_BYTES: usize = 65535;
/// One GSO send: the kernel refuses more than 65,507 bytes of UDP payload
/// (EMSGSIZE); mesh-node's transport keeps the same margin.
pub const MAX_SEND_BYTES: usize = 65000;

/// A control-message buffer for one int (`UDP_GRO`, `UDP_SEGMENT`), with
/// `cmsghdr`'s alignment, which the `CMSG_*` macros need.
#[repr(C)]
struct ControlBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 32],
}

/// Asks the kernel to coalesce datagrams on `socket` (loopback included).
/// Without it (an old kernel) each receive is one datagram, still correct.
pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket; setsockopt reads one int from a local.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One received message: its length in `buf`, the sender, and the size of
/// each datagram in it (the whole message when it was not coalesced).
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: usize,
}

/// Waits for and receives one (possibly coalesced) message into `buf`.
pub async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    loop {
        socket.readable().await?;
        match socket.try_io(Interest::READABLE, || recv_once(socket.as_raw_fd(), buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

fn recv_once(fd: libc::c_int, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = ControlBuf {
        _align: [],
        bytes: [0; 32],
    };
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes.as_mut_ptr().cast();
    msg.msg_controllen = control.bytes.len() as _;
    // SAFETY: every pointer in msg points at a local that outlives the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    let mut segment = len;
    // SAFETY: the kernel filled msg's control area; the macros walk it
    // within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if size > 0 {
                    segment = size as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len,
        from: source(&name).unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))),
        segment: segment.max(1),
    })
}

fn source(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match name.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { *(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        _ => None,
    }
}

/// Packets for one IPv4 destination, gathered and sent as few GSO sends as
/// their sizes allow (a run of equal sizes, the last of a run may be
/// shorter).
pub struct Batch {
    data: Vec<u8>,
    /// Where each packet starts in `data`.
    starts: Vec<usize>,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            data: Vec::with_capacity(MAX_SEND_BYTES),
            starts: Vec::with_capacity(MAX_SEGMENTS),
        }
    }
}

impl Batch {
    pub fn push(&mut self, packet: &[u8]) {
        self.starts.push(self.data.len());
        self.data.extend_from_slice(packet);
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Room for `bytes` more without passing one send's limits.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.starts.len() < MAX_SEGMENTS && self.data.len() + bytes <= MAX_SEND_BYTES
    }

    fn packet(&self, i: usize) -> &[u8] {
        let end = self.starts.get(i + 1).copied().unwrap_or(self.data.len());
        &self.data[self.starts[i]..end]
    }

    /// Sends everything to `to` without waiting (a full socket buffer drops
    /// the rest, as it would drop a datagram) and empties the batch.
    /// Returns how many packets went out.
    pub fn flush(&mut self, socket: &UdpSocket, to: SocketAddr) -> usize {
        let mut sent = 0;
        let mut i = 0;
        while i < self.starts.len() {
            // A run: equal sizes, the last one may be shorter.
            let size = self.packet(i).len();
            let mut j = i + 1;
            while j < self.starts.len() && self.packet(j).len() == size {
                j += 1;
            }
            if j < self.starts.len() && self.packet(j).len() < size {
                j += 1;
            }
            let start = self.starts[i];
            let end = self.starts.get(j).copied().unwrap_or(self.data.len());
            let bytes = &self.data[start..end];
            if j - i == 1 {
                sent += usize::from(socket.try_send_to(bytes, to).is_ok());
            } else if send_segments(socket, bytes, size, to).is_ok() {
                sent += j - i;
            } else {
                // GSO refused (an old kernel, a size limit): one by one.
                sent += (i..j)
                    .filter(|&k| socket.try_send_to(self.packet(k), to).is_ok())
                    .count();
            }
            i = j;
        }
        self.data.clear();
        self.starts.clear();
        sent
    }
}

fn send_segments(
    socket: &UdpSocket,
    bytes: &[u8],
    segment: usize,
    to: SocketAddr,
) -> io::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    };
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = ControlBuf {
        _align: [],
        bytes: [0; 32],
    };
    // SAFETY: all-zero is a valid msghdr; the pointers set below point at
    // locals that outlive the call; the control buffer holds one cmsg of a
    // u16 (CMSG_SPACE(2) <= 32).
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.bytes.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(2) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
        libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of equal datagrams and a short last one go down as one GSO
    /// send and come back through GRO as one message cut at the segment
    /// size; mixed sizes are split into runs, and all arrive in order.
    #[tokio::test]
    async fn a_batch_goes_down_and_comes_back_whole() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable_gro(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let sizes = [1452, 1452, 1452, 700, 1452, 90, 90, 33];
        let mut batch = Batch::default();
        for (i, &n) in sizes.iter().enumerate() {
            batch.push(&vec![i as u8; n]);
        }
        assert_eq!(batch.len(), sizes.len());
        assert_eq!(batch.flush(&tx, to), sizes.len());
        assert!(batch.is_empty());
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_BATCH_BYTES];
        while got.len() < sizes.len() {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), recv(&rx, &mut buf))
                .await
                .expect("the batch arrives")
                .unwrap();
            assert_eq!(r.from, tx.local_addr().unwrap());
            for d in buf[..r.len].chunks(r.segment) {
                got.push(d.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect();
        assert_eq!(got, want);
    }

    /// The largest batch `has_room` lets through goes out whole (the
    /// kernel's limit is 65,507 bytes per send): 62 x 1,040 bytes.
    #[tokio::test]
    async fn a_full_batch_is_within_the_kernels_limit() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable_gro(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut batch = Batch::default();
        let mut n = 0;
        while batch.has_room(1040) {
            batch.push(&[7; 1040]);
            n += 1;
        }
        assert_eq!(n, 62);
        assert_eq!(batch.flush(&tx, rx.local_addr().unwrap()), n);
        let mut buf = vec![0u8; MAX_BATCH_BYTES];
        let mut got = 0;
        while got < n {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), recv(&rx, &mut buf))
                .await
                .expect("all of it arrives")
                .unwrap();
            got += r.len / 1040;
        }
    }

    #[test]
    fn room_is_bounded_by_segments_and_bytes() {
        let mut b = Batch::default();
        for _ in 0..MAX_SEGMENTS {
            assert!(b.has_room(10));
            b.push(&[0; 10]);
        }
        assert!(!b.has_room(10));
        let mut b = Batch::default();
        b.push(&[0; 64000]);
        assert!(!b.has_room(1001));
        assert!(b.has_room(1000));
    }
}
