//! The UDP socket of our transports: non-blocking and not registered with
//! tokio, because it is read and written on gotatun's data-path thread,
//! which waits for it in its `poll(2)` reactor (see [`super::wait_ready`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use gotatun::udp::UdpTransportFactoryParams;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::warn;

const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;

pub struct UdpSocket {
    socket: Socket,
    /// A dual-stack socket sends to IPv4 peers at v4-mapped addresses.
    map_ipv4: bool,
}

impl UdpSocket {
    /// Binds as gotatun's socket does: `params.addr`, or dual-stack `[::]`
    /// (IPv4 only where IPv6 is unavailable), with the given buffer sizes
    /// and, where the kernel has it, UDP GRO on receive.
    pub fn bind(params: &UdpTransportFactoryParams, buffer: usize) -> io::Result<Self> {
        let dual_stack = params.addr.is_none();
        let addr = params.addr.unwrap_or(Ipv6Addr::UNSPECIFIED.into());
        let socket = match Self::open(addr, params, buffer) {
            Err(e) if dual_stack && ipv6_unavailable(&e) => {
                warn!("udp: IPv6 is unavailable; listening on IPv4 only");
                Self::open(Ipv4Addr::UNSPECIFIED.into(), params, buffer)?
            }
            other => other?,
        };
        let map_ipv4 = dual_stack && socket.local_addr()?.is_ipv6();
        if let Err(e) = set_int_option(&socket, SOL_UDP, UDP_GRO, 1) {
            warn!("udp: no UDP GRO ({e}); receiving one datagram per message");
        }
        Ok(Self { socket, map_ipv4 })
    }

    fn open(addr: IpAddr, params: &UdpTransportFactoryParams, buffer: usize) -> io::Result<Socket> {
        let domain = match addr {
            IpAddr::V4(_) => Domain::IPV4,
            IpAddr::V6(_) => Domain::IPV6,
        };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_nonblocking(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(params.addr.is_some())?;
        }
        if let Some(mark) = params.fwmark {
            socket.set_mark(mark)?;
        }
        // Small buffers only cost throughput: not a reason to fail.
        if let Err(e) = socket.set_recv_buffer_size(buffer) {
            warn!("udp: cannot set the receive buffer to {buffer} bytes: {e}");
        }
        if let Err(e) = socket.set_send_buffer_size(buffer) {
            warn!("udp: cannot set the send buffer to {buffer} bytes: {e}");
        }
        socket.bind(&SocketAddr::new(addr, params.port).into())?;
        Ok(socket)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("UDP socket bound to a non-IP address"))
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.socket.set_mark(mark)
    }

    /// The destination as this socket must name it.
    pub fn sockaddr(&self, mut to: SocketAddr) -> SockAddr {
        if self.map_ipv4
            && let IpAddr::V4(ip) = to.ip()
        {
            to.set_ip(ip.to_ipv6_mapped().into());
        }
        to.into()
    }

    /// One datagram to `to` now; `WouldBlock` when the send buffer is full.
    pub fn try_send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket.send_to(data, &self.sockaddr(to)).map(drop)
    }

    /// One datagram to `to`; waits while the send buffer is full.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = self.sockaddr(to);
        loop {
            match self.socket.send_to(data, &to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    super::wait_ready(self.as_fd(), libc::POLLOUT).await?
                }
                other => return other.map(drop),
            }
        }
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a local that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
