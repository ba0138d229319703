//! The two rtnetlink requests mesh-node needs: add an address to an
//! interface and set it up. What `ip addr add` and `ip link set up` send,
//! without depending on iproute2 being installed or on a helper with
//! privileges of its own.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mesh_proto::prefix::IpPrefix;

const NLMSG_HDRLEN: usize = 16;
/// `IFA_F_NODAD`: an overlay address is unique by construction (the
/// authority never reuses one); skipping duplicate detection makes an IPv6
/// address usable at once instead of after a second of tentativeness.
const IFA_F_NODAD: u32 = 0x02;
const IFA_FLAGS: u16 = 8;

/// One rtnetlink socket; requests are answered in order.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor no one else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    /// `ip addr replace PREFIX dev INDEX` (replace: idempotent).
    pub fn add_address(&mut self, index: u32, prefix: &IpPrefix) -> std::io::Result<()> {
        let msg = address_message(self.next_seq(), index, prefix);
        self.request(&msg)
    }

    /// `ip link set INDEX up`.
    pub fn set_up(&mut self, index: u32) -> std::io::Result<()> {
        let msg = link_up_message(self.next_seq(), index);
        self.request(&msg)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends one request and reads its acknowledgement (an `NLMSG_ERROR`
    /// whose error is 0 on success, a negative errno on failure).
    fn request(&self, msg: &[u8]) -> std::io::Result<()> {
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and kernel are live for the call; sizes are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is live and its length is given.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(errno) = ack_of(&buf[..n as usize], seq)? {
                return match errno {
                    0 => Ok(()),
                    e => Err(std::io::Error::from_raw_os_error(-e)),
                };
            }
        }
    }
}

/// The error code of the acknowledgement for `seq` in one datagram, if it
/// holds one.
fn ack_of(datagram: &[u8], seq: u32) -> std::io::Result<Option<i32>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed netlink answer");
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().map_err(|_| bad())?) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().map_err(|_| bad())?);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().map_err(|_| bad())?);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(bad());
        }
        if kind == libc::NLMSG_ERROR as u16 && msg_seq == seq {
            let code = rest.get(16..20).ok_or_else(bad)?;
            return Ok(Some(i32::from_ne_bytes(
                code.try_into().map_err(|_| bad())?,
            )));
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(None)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
}

fn attribute(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align(buf.len()), 0);
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn address_message(seq: u32, index: u32, prefix: &IpPrefix) -> Vec<u8> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    let mut buf = Vec::with_capacity(64);
    header(&mut buf, libc::RTM_NEWADDR, flags as u16, seq);
    let (family, bytes) = match prefix.addr {
        IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    // struct ifaddrmsg: family, prefix length, flags, scope (universe), index.
    buf.extend_from_slice(&[family as u8, prefix.len, 0, libc::RT_SCOPE_UNIVERSE]);
    buf.extend_from_slice(&index.to_ne_bytes());
    attribute(&mut buf, libc::IFA_LOCAL, &bytes);
    attribute(&mut buf, libc::IFA_ADDRESS, &bytes);
    attribute(&mut buf, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
    finish(buf)
}

fn link_up_message(seq: u32, index: u32) -> Vec<u8> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    let mut buf = Vec::with_capacity(32);
    header(&mut buf, libc::RTM_NEWLINK, flags as u16, seq);
    // struct ifinfomsg: family, pad, type, index, flags, change mask.
    buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    buf.extend_from_slice(&(index as i32).to_ne_bytes());
    buf.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    buf.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    finish(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let p: IpPrefix = "10.77.0.5/16".parse().unwrap();
        let m = address_message(7, 3, &p);
        // header 16 + ifaddrmsg 8 + two 8-byte addresses + flags 8.
        assert_eq!(m.len(), 48);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 48);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            libc::RTM_NEWADDR
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 16, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);
        assert_eq!(&m[28..32], &[10, 77, 0, 5]);
        let p6: IpPrefix = "fd77::5/64".parse().unwrap();
        // Two 20-byte address attributes instead of 8.
        assert_eq!(address_message(1, 3, &p6).len(), 72);
    }

    #[test]
    fn acks_are_found_by_sequence() {
        let mut ack = Vec::new();
        header(&mut ack, libc::NLMSG_ERROR as u16, 0, 9);
        ack.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        let ack = finish(ack);
        assert_eq!(ack_of(&ack, 9).unwrap(), Some(-libc::EPERM));
        assert_eq!(ack_of(&ack, 8).unwrap(), None);
        // A length that runs past the datagram is refused, not followed.
        let mut bad = ack.clone();
        bad[0..4].copy_from_slice(&999u32.to_ne_bytes());
        assert!(ack_of(&bad, 9).is_err());
    }
}
