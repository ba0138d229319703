//! A TUN device with virtio-net headers and TCP segmentation offload.
//!
//! Opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD(CSUM | TSO4 | TSO6)`, the
//! kernel hands us TCP in super-packets of up to 64 KB (one read, one trip
//! through the sender's TCP stack) that [`gso::split`] cuts into packets for
//! WireGuard. On the way in, the packets decrypted from one UDP batch are
//! held until the batch ends (never waiting for more) and [`gso::coalesce`]d,
//! each TCP flow's consecutive segments into one write, so the receiving TCP
//! stack also works per 64 KB. Packets were authenticated by WireGuard's
//! AEAD, so, as in the kernel's WireGuard, the stack need not verify their
//! checksums again.
//!
//! The firewall ([`crate::firewall`]) sees each packet on both sides: after
//! the split on the way out, before coalescing on the way in, under one lock
//! per batch.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::watch;
use tracing::{debug, warn};

use mesh_proto::firewall::engine::Direction;

use super::gso::{self, VIRTIO_NET_HDR_LEN, VirtioNetHdr};
use crate::firewall::Firewall;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// The interface MTU at creation, as wireguard-go and wg-quick use: 1500
/// minus WireGuard's worst-case overhead (IPv6 + UDP + 32), so the
/// encrypted packets fit an ordinary 1500-byte underlay unfragmented.
pub const DEFAULT_MTU: libc::c_int = 1420;
/// A read holds a virtio-net header and at most a 64 KB IP packet.
const READ_BUF: usize = VIRTIO_NET_HDR_LEN + 65536;
/// Decrypted packets held for one coalescing write, at most.
const WRITE_BATCH: usize = 64;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the offloaded TUN interface `name`, its traffic filtered by
/// `firewall`.
pub fn open(name: &str, firewall: Arc<Firewall>) -> io::Result<(TunSend, TunRecv)> {
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    // SAFETY: plain open(2) of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF takes a pointer to a struct ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    set_mtu(&req.name, DEFAULT_MTU)?;
    let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes the flags as an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, offloads) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Arc::new(fd);
    let mtu = mtu_watcher(name);
    Ok((
        TunSend {
            fd: fd.clone(),
            pending: Vec::with_capacity(WRITE_BATCH),
            scratch: Vec::with_capacity(READ_BUF),
            firewall: firewall.clone(),
        },
        TunRecv {
            fd,
            firewall,
            mtu,
            read_buf: vec![0; READ_BUF],
            scratch: Vec::with_capacity(READ_BUF),
            out: Vec::with_capacity(64),
        },
    ))
}

/// SIOCSIFMTU on a throwaway socket, as `ip link set IF mtu N` does.
fn set_mtu(name: &[libc::c_char; libc::IFNAMSIZ], mtu: libc::c_int) -> io::Result<()> {
    #[repr(C)]
    struct IfReqMtu {
        name: [libc::c_char; libc::IFNAMSIZ],
        mtu: libc::c_int,
        _pad: [u8; 20],
    }
    // SAFETY: socket(2) with constant arguments.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the descriptor just created.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = IfReqMtu {
        name: *name,
        mtu,
        _pad: [0; 20],
    };
    // SAFETY: SIOCSIFMTU takes a struct ifreq with the MTU in ifr_mtu.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interface MTU, polled like gotatun's own TUN device does, so that
/// `ip link set IF mtu N` takes effect.
fn mtu_watcher(name: &str) -> MtuWatcher {
    let initial = read_mtu(name).unwrap_or(DEFAULT_MTU as u16);
    let (tx, rx) = watch::channel(initial);
    let name = name.to_string();
    tokio::spawn(async move {
        let mut current = initial;
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let Some(mtu) = read_mtu(&name) else { return };
            if mtu != current {
                current = mtu;
                if tx.send(mtu).is_err() {
                    return;
                }
            }
        }
    });
    MtuWatcher::from(rx)
}

fn read_mtu(name: &str) -> Option<u16> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes decrypted packets to the interface. gotatun's receive task calls
/// [`IpSend::send`] for each packet of a UDP batch, then [`IpSend::flush`]
/// (our patch); the packets wait here until then, or until a full batch, and
/// go out with each TCP flow's consecutive segments coalesced into one write.
pub struct TunSend {
    fd: Arc<OwnedFd>,
    pending: Vec<Packet<[u8]>>,
    scratch: Vec<u8>,
    firewall: Arc<Firewall>,
}

impl IpSend for TunSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.pending.push(packet.into_bytes());
        if self.pending.len() >= WRITE_BATCH {
            self.write_pending()?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.write_pending()
    }
}

impl TunSend {
    /// Coalesces and writes what is pending. Only a vanished interface is an
    /// error; after any other failed write (a full queue) the rest of the
    /// batch is dropped, as a full NIC queue would drop it; TCP recovers.
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        {
            let mut firewall = self.firewall.batch();
            self.pending
                .retain(|p| firewall.allows(Direction::Inbound, p));
        }
        let mut failed = None;
        // Coalesced packets live in `scratch`: write each as it is formed.
        gso::coalesce(&self.pending, &mut self.scratch, |hdr, pkt| {
            if failed.is_none() {
                failed = write_now(&self.fd, hdr, pkt).err();
            }
        });
        self.pending.clear();
        match failed {
            Some(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBADF | libc::EBADFD | libc::ENODEV)
                ) =>
            {
                Err(e)
            }
            Some(e) => {
                debug!("tun: write failed: {e}");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// One non-blocking write of header + packet. A full TUN queue drops the
/// packet, as a full NIC queue would; TCP recovers.
fn write_now(fd: &OwnedFd, hdr: &VirtioNetHdr, pkt: &[u8]) -> io::Result<()> {
    let hdr = hdr.encode();
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: pkt.as_ptr() as *mut libc::c_void,
            iov_len: pkt.len(),
        },
    ];
    // SAFETY: both iovecs point into buffers alive for this call.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads from the interface and yields plain IP packets.
pub struct TunRecv {
    fd: Arc<OwnedFd>,
    firewall: Arc<Firewall>,
    mtu: MtuWatcher,
    read_buf: Vec<u8>,
    scratch: Vec<u8>,
    out: Vec<Packet<Ip>>,
}

impl TunRecv {
    async fn read(&mut self) -> io::Result<usize> {
        let buf = &mut self.read_buf;
        loop {
            // SAFETY: reading into a buffer we own, bounded by its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    super::wait_ready(self.fd.as_fd(), libc::POLLIN).await?
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

impl IpRecv for TunRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.out.clear();
        loop {
            let n = self.read().await?;
            let out = &mut self.out;
            // The firewall's lock is held for this read's packets only.
            let mut firewall = self.firewall.batch();
            let result = gso::split(&self.read_buf[..n], &mut self.scratch, |pkt| {
                if !firewall.allows(Direction::Outbound, pkt) {
                    return;
                }
                let mut p = pool.get();
                if pkt.len() > p.len() {
                    debug!(
                        "tun: {}-byte packet larger than a buffer; dropped",
                        pkt.len()
                    );
                    return;
                }
                p.truncate(pkt.len());
                p.copy_from_slice(pkt);
                match p.try_into_ip() {
                    Ok(ip) => out.push(ip),
                    Err(e) => debug!("tun: not an IP packet: {e}"),
                }
            });
            drop(firewall);
            if let Err(e) = result {
                warn!("tun: cannot split packet from the kernel: {e}");
            }
            if !self.out.is_empty() {
                return Ok(self.out.drain(..));
            }
        }
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}
