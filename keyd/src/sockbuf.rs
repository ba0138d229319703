//! Socket buffers large enough for bursts of WireGuard packets.

use std::os::fd::AsRawFd;

/// What each UDP socket that carries data-plane packets asks for.
const BYTES: libc::c_int = 4 << 20;

/// Grows a UDP socket's receive and send buffers to 4 MiB. The data plane
/// writes in bursts (a GSO batch is up to 64 datagrams at once) and the
/// peer keyd's QUIC connection sends as fast as its window allows; the
/// default buffers (about 200 KiB) drop part of a burst whenever keyd is a
/// moment late, and on the QUIC rung every such drop is a loss that halves
/// QUIC's congestion window and the tunnelled TCP flows' as well. Root may
/// go past the system's limit (`SO_RCVBUFFORCE`); otherwise up to it
/// (`net.core.rmem_max`, docs/edge.md). Returns the receive buffer the
/// kernel granted (it reports twice what it accounts for).
pub fn grow(socket: &impl AsRawFd) -> usize {
    let fd = socket.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set(fd, force) != 0 {
            set(fd, plain);
        }
    }
    receive_buffer(fd)
}

fn set(fd: libc::c_int, option: libc::c_int) -> libc::c_int {
    // SAFETY: a valid socket, an int option of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&BYTES as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

fn receive_buffer(fd: libc::c_int) -> usize {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, an int option with its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 { value.max(0) as usize } else { 0 }
}

/// Whether the kernel granted the buffer `grow` asks for. It reports twice
/// the value it accepted (the rest is its bookkeeping), so a system capped
/// at half of what was asked reports exactly `BYTES`.
pub fn is_full_size(granted: usize) -> bool {
    granted >= 2 * BYTES as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_socket_gets_the_buffer_root_may_force() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = receive_buffer(s.as_raw_fd());
        let granted = grow(&s);
        assert!(granted >= before, "{granted} < {before}");
        // Root (the tests run as root in CI) may force past rmem_max.
        if unsafe { libc::geteuid() } == 0 {
            assert!(is_full_size(granted), "granted {granted}");
        }
        // Capped at half of what was asked: reported as BYTES, not full.
        assert!(!is_full_size(BYTES as usize));
    }
}
