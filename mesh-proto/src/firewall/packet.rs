//! The few header fields the firewall decides on, read from one IP packet as
//! it crosses the TUN device (outbound before encryption, inbound after
//! decryption).
//!
//! The input comes from a peer (inbound) or from a local program (outbound),
//! so parsing is bounded and total: every length is checked before it is
//! used, IPv6 extension headers are skipped at most [`MAX_EXTENSION_HEADERS`]
//! deep, an ICMP error's quoted packet is read one level deep only, and any
//! input gives either a [`PacketMeta`] or a [`ParseError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// IP protocol numbers the firewall reads further than the IP header.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers skipped before the upper-layer protocol. A packet
/// with more than this many is refused: no legitimate traffic needs them,
/// and walking an unbounded chain is work a peer could make us do.
pub const MAX_EXTENSION_HEADERS: usize = 4;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

/// The original packet an ICMP error quotes, as its sender saw it:
/// (source, destination, protocol, source port, destination port).
pub type QuotedFlow = (IpAddr, IpAddr, u8, u16, u16);

/// What the firewall needs from one packet.
///
/// For TCP and UDP the ports are the transport ports. For ICMP echo request
/// and reply (ICMPv4 8/0, ICMPv6 128/129) both ports are the echo
/// identifier, so that a ping and its reply are one flow; for other ICMP
/// messages both are 0. A non-first fragment carries no transport header:
/// its ports are 0 and `fragment` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PacketMeta {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (`TCP_SYN`, ...); 0 for anything else.
    pub tcp_flags: u8,
    /// For an ICMP error (destination unreachable, time exceeded, packet too
    /// big, parameter problem): the flow of the packet it is about.
    pub icmp_error_of: Option<QuotedFlow>,
    /// A fragment other than the first: no ports, no TCP flags.
    pub fragment: bool,
}

/// Why a packet could not be read. Each variant names the header at fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} (only 4 and 6 are carried)")]
    Version(u8),
    #[error("{header} header truncated: needs {need} bytes, packet has {have}")]
    Truncated {
        header: &'static str,
        need: usize,
        have: usize,
    },
    #[error("IPv4 header length {0} words is below the minimum of 5")]
    Ipv4HeaderLength(u8),
    #[error("IP length field says {stated} bytes, but the header alone is {header}")]
    TotalLength { stated: usize, header: usize },
    #[error("more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")]
    TooManyExtensionHeaders,
    #[error("TCP data offset {0} words is below the minimum of 5")]
    TcpDataOffset(u8),
    #[error("ICMP error quotes an IPv{quoted} packet inside IPv{outer}")]
    QuotedVersion { outer: u8, quoted: u8 },
    #[error("ICMP error quotes a malformed packet: {0}")]
    Quoted(Box<ParseError>),
}

/// Reads one IP packet (as read from or written to a TUN device, no link
/// header). Bytes after the IP length field's end are ignored.
pub fn parse(packet: &[u8]) -> Result<PacketMeta, ParseError> {
    let ip = ip_header(packet, false)?;
    let mut meta = PacketMeta {
        src: ip.src,
        dst: ip.dst,
        proto: ip.proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_error_of: None,
        fragment: ip.later_fragment,
    };
    if ip.later_fragment {
        return Ok(meta);
    }
    let l4 = ip.payload;
    match ip.proto {
        PROTO_TCP => {
            need("TCP", l4, 20)?;
            let offset = l4[12] >> 4;
            if offset < 5 {
                return Err(ParseError::TcpDataOffset(offset));
            }
            need("TCP", l4, usize::from(offset) * 4)?;
            (meta.sport, meta.dport) = ports(l4);
            meta.tcp_flags = l4[13];
        }
        PROTO_UDP => {
            need("UDP", l4, 8)?;
            (meta.sport, meta.dport) = ports(l4);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let v6 = ip.proto == PROTO_ICMPV6;
            let header = if v6 { "ICMPv6" } else { "ICMP" };
            need(header, l4, 8)?;
            match icmp_kind(v6, l4[0]) {
                IcmpKind::Echo => {
                    let id = u16::from_be_bytes([l4[4], l4[5]]);
                    (meta.sport, meta.dport) = (id, id);
                }
                IcmpKind::Error => {
                    let quoted = quoted_flow(&l4[8..], if v6 { 6 } else { 4 })
                        .map_err(|e| ParseError::Quoted(Box::new(e)))?;
                    meta.icmp_error_of = Some(quoted);
                }
                IcmpKind::Other => {}
            }
        }
        _ => {}
    }
    Ok(meta)
}

enum IcmpKind {
    Echo,
    Error,
    Other,
}

fn icmp_kind(v6: bool, kind: u8) -> IcmpKind {
    match (v6, kind) {
        (false, 0 | 8) | (true, 128 | 129) => IcmpKind::Echo,
        // v4: destination unreachable, time exceeded, parameter problem;
        // v6: destination unreachable, packet too big, time exceeded,
        // parameter problem.
        (false, 3 | 11 | 12) | (true, 1..=4) => IcmpKind::Error,
        _ => IcmpKind::Other,
    }
}

struct IpHeader<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    later_fragment: bool,
    payload: &'a [u8],
}

/// The IP header of `packet`. A `quoted` packet (inside an ICMP error) is
/// usually cut short by its quoter, so its length field is not enforced.
fn ip_header(packet: &[u8], quoted: bool) -> Result<IpHeader<'_>, ParseError> {
    let first = *packet.first().ok_or(ParseError::Empty)?;
    match first >> 4 {
        4 => ipv4_header(packet, quoted),
        6 => ipv6_header(packet, quoted),
        v => Err(ParseError::Version(v)),
    }
}

fn ipv4_header(packet: &[u8], quoted: bool) -> Result<IpHeader<'_>, ParseError> {
    need("IPv4", packet, 20)?;
    let ihl = packet[0] & 0x0f;
    if ihl < 5 {
        return Err(ParseError::Ipv4HeaderLength(ihl));
    }
    let header = usize::from(ihl) * 4;
    need("IPv4", packet, header)?;
    let stated = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = if quoted {
        packet.len()
    } else {
        if stated < header {
            return Err(ParseError::TotalLength { stated, header });
        }
        need("IPv4 payload", packet, stated)?;
        stated
    };
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    Ok(IpHeader {
        src: IpAddr::V4(v4(&packet[12..16])),
        dst: IpAddr::V4(v4(&packet[16..20])),
        proto: packet[9],
        later_fragment: fragment_offset != 0,
        payload: packet.get(header..end).unwrap_or_default(),
    })
}

fn ipv6_header(packet: &[u8], quoted: bool) -> Result<IpHeader<'_>, ParseError> {
    need("IPv6", packet, 40)?;
    let stated = 40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    let end = if quoted {
        packet.len()
    } else {
        need("IPv6 payload", packet, stated)?;
        stated
    };
    let src = IpAddr::V6(v6(&packet[8..24]));
    let dst = IpAddr::V6(v6(&packet[24..40]));
    let mut next = packet[6];
    let mut rest = packet.get(40..end).unwrap_or_default();
    let mut later_fragment = false;
    let mut walked = 0;
    loop {
        let length = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS => {
                need("IPv6 extension", rest, 2)?;
                (usize::from(rest[1]) + 1) * 8
            }
            IPV6_FRAGMENT => 8,
            _ => break,
        };
        walked += 1;
        if walked > MAX_EXTENSION_HEADERS {
            return Err(ParseError::TooManyExtensionHeaders);
        }
        need("IPv6 extension", rest, length)?;
        if next == IPV6_FRAGMENT && u16::from_be_bytes([rest[2], rest[3]]) >> 3 != 0 {
            // What follows is the middle of some upper-layer payload.
            later_fragment = true;
        }
        next = rest[0];
        rest = &rest[length..];
        if later_fragment {
            break;
        }
    }
    Ok(IpHeader {
        src,
        dst,
        proto: next,
        later_fragment,
        payload: rest,
    })
}

/// The flow of the packet an ICMP error quotes. RFC 792 guarantees the IP
/// header and 8 bytes of its payload, enough for ports and an echo id.
fn quoted_flow(quote: &[u8], outer_version: u8) -> Result<QuotedFlow, ParseError> {
    let first = *quote.first().ok_or(ParseError::Truncated {
        header: "quoted IP",
        need: 1,
        have: 0,
    })?;
    if first >> 4 != outer_version {
        return Err(ParseError::QuotedVersion {
            outer: outer_version,
            quoted: first >> 4,
        });
    }
    let ip = ip_header(quote, true)?;
    let (mut sport, mut dport) = (0, 0);
    if !ip.later_fragment {
        let l4 = ip.payload;
        match ip.proto {
            PROTO_TCP | PROTO_UDP => {
                need("quoted transport", l4, 4)?;
                (sport, dport) = ports(l4);
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                need("quoted ICMP", l4, 6)?;
                if let IcmpKind::Echo = icmp_kind(ip.proto == PROTO_ICMPV6, l4[0]) {
                    let id = u16::from_be_bytes([l4[4], l4[5]]);
                    (sport, dport) = (id, id);
                }
            }
            _ => {}
        }
    }
    Ok((ip.src, ip.dst, ip.proto, sport, dport))
}

fn need(header: &'static str, bytes: &[u8], need: usize) -> Result<(), ParseError> {
    if bytes.len() < need {
        return Err(ParseError::Truncated {
            header,
            need,
            have: bytes.len(),
        });
    }
    Ok(())
}

/// Source and destination port; the caller has checked 4 bytes.
fn ports(l4: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    )
}

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(b);
    Ipv6Addr::from(octets)
}

/// Packet builders for this module's tests and conntrack's.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// An IPv4 or IPv6 packet (by the addresses' family) around `payload`.
    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0u8; 20];
                p[0] = 0x45;
                let total = u16::try_from(20 + payload.len()).unwrap();
                p[2..4].copy_from_slice(&total.to_be_bytes());
                p[8] = 64;
                p[9] = proto;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
                p.extend_from_slice(payload);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0u8; 40];
                p[0] = 0x60;
                let len = u16::try_from(payload.len()).unwrap();
                p[4..6].copy_from_slice(&len.to_be_bytes());
                p[6] = proto;
                p[7] = 64;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
                p.extend_from_slice(payload);
                p
            }
            _ => panic!("mixed address families"),
        }
    }

    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        ip(src, dst, PROTO_TCP, &t)
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        u.extend_from_slice(b"payload");
        ip(src, dst, PROTO_UDP, &u)
    }

    fn icmp_proto(src: IpAddr) -> u8 {
        if src.is_ipv4() {
            PROTO_ICMP
        } else {
            PROTO_ICMPV6
        }
    }

    /// An echo request (`reply` false) or reply.
    pub fn echo(src: IpAddr, dst: IpAddr, id: u16, reply: bool) -> Vec<u8> {
        let kind = match (src.is_ipv4(), reply) {
            (true, false) => 8,
            (true, true) => 0,
            (false, false) => 128,
            (false, true) => 129,
        };
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        ip(src, dst, icmp_proto(src), &m)
    }

    /// An ICMP error of `kind`/`code` from `src` to `dst` quoting `original`
    /// (cut to its IP header and 8 bytes, as routers do).
    pub fn icmp_error(src: IpAddr, dst: IpAddr, kind: u8, code: u8, original: &[u8]) -> Vec<u8> {
        let header = if original[0] >> 4 == 4 { 20 } else { 40 };
        let cut = original.len().min(header + 8);
        let mut m = vec![kind, code, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&original[..cut]);
        ip(src, dst, icmp_proto(src), &m)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    fn a4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, last))
    }

    fn a6(last: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, last))
    }

    #[test]
    fn reads_tcp_with_flags() {
        let p = tcp(a4(1), 40000, a4(2), 5432, TCP_SYN);
        let m = parse(&p).unwrap();
        assert_eq!(
            m,
            PacketMeta {
                src: a4(1),
                dst: a4(2),
                proto: PROTO_TCP,
                sport: 40000,
                dport: 5432,
                tcp_flags: TCP_SYN,
                icmp_error_of: None,
                fragment: false,
            }
        );
    }

    #[test]
    fn echo_request_and_reply_share_the_identifier_as_ports() {
        for (s, d) in [(a4(1), a4(2)), (a6(1), a6(2))] {
            let req = parse(&echo(s, d, 777, false)).unwrap();
            let rep = parse(&echo(d, s, 777, true)).unwrap();
            assert_eq!((req.sport, req.dport), (777, 777));
            assert_eq!((rep.sport, rep.dport), (777, 777));
            assert_eq!(req.icmp_error_of, None);
        }
    }

    #[test]
    fn icmp_errors_name_the_quoted_flow() {
        let original = udp(a4(1), 5000, a4(2), 53);
        for (kind, code) in [(3, 3), (11, 0), (12, 0)] {
            let err = icmp_error(a4(2), a4(1), kind, code, &original);
            let m = parse(&err).unwrap();
            assert_eq!(m.proto, PROTO_ICMP);
            assert_eq!((m.sport, m.dport), (0, 0));
            assert_eq!(
                m.icmp_error_of,
                Some((a4(1), a4(2), PROTO_UDP, 5000, 53)),
                "type {kind}"
            );
        }
        let original = tcp(a6(1), 41000, a6(2), 22, TCP_SYN);
        for kind in 1..=4 {
            let m = parse(&icmp_error(a6(2), a6(1), kind, 0, &original)).unwrap();
            assert_eq!(
                m.icmp_error_of,
                Some((a6(1), a6(2), PROTO_TCP, 41000, 22)),
                "type {kind}"
            );
        }
        // An error about a ping names the ping's flow.
        let ping = echo(a4(1), a4(2), 9, false);
        let m = parse(&icmp_error(a4(2), a4(1), 11, 0, &ping)).unwrap();
        assert_eq!(m.icmp_error_of, Some((a4(1), a4(2), PROTO_ICMP, 9, 9)));
    }

    #[test]
    fn informational_icmp_is_not_an_error() {
        // ICMPv4 redirect and ICMPv6 router advertisement: neither echo nor error.
        let m = parse(&ip(a4(2), a4(1), PROTO_ICMP, &[5, 1, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!((m.sport, m.dport, m.icmp_error_of), (0, 0, None));
        let m = parse(&ip(a6(2), a6(1), PROTO_ICMPV6, &[134, 0, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!((m.sport, m.dport, m.icmp_error_of), (0, 0, None));
    }

    #[test]
    fn ipv4_fragments() {
        // First fragment (MF set, offset 0): parsed as usual.
        let mut p = udp(a4(1), 7000, a4(2), 8000);
        p[6] = 0x20;
        let m = parse(&p).unwrap();
        assert_eq!((m.sport, m.dport, m.fragment), (7000, 8000, false));
        // A later fragment: its first bytes are payload, not ports.
        p[6] = 0x00;
        p[7] = 0x10;
        let m = parse(&p).unwrap();
        assert_eq!(
            (m.proto, m.sport, m.dport, m.fragment),
            (PROTO_UDP, 0, 0, true)
        );
    }

    /// `payload` behind the given extension headers (each: kind, 8 bytes).
    fn with_extensions(kinds: &[u8], last: u8, payload: &[u8], fragment_offset: u16) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, &kind) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(last);
            let mut h = vec![next, 0, 0, 0, 0, 0, 0, 0];
            if kind == IPV6_FRAGMENT {
                h[2..4].copy_from_slice(&(fragment_offset << 3).to_be_bytes());
            }
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(payload);
        ip(a6(1), a6(2), kinds.first().copied().unwrap_or(last), &body)
    }

    #[test]
    fn ipv6_extension_headers_are_skipped_up_to_the_bound() {
        let udp_header = [0x1b, 0x58, 0x00, 0x35, 0, 8, 0, 0];
        let chain = [
            IPV6_HOP_BY_HOP,
            IPV6_DESTINATION_OPTIONS,
            IPV6_ROUTING,
            IPV6_FRAGMENT,
        ];
        let m = parse(&with_extensions(&chain, PROTO_UDP, &udp_header, 0)).unwrap();
        assert_eq!((m.proto, m.sport, m.dport), (PROTO_UDP, 7000, 53));
        let five = [
            IPV6_HOP_BY_HOP,
            IPV6_DESTINATION_OPTIONS,
            IPV6_ROUTING,
            60,
            60,
        ];
        assert_eq!(
            parse(&with_extensions(&five, PROTO_UDP, &udp_header, 0)),
            Err(ParseError::TooManyExtensionHeaders)
        );
        let m = parse(&with_extensions(
            &[IPV6_FRAGMENT],
            PROTO_TCP,
            &udp_header,
            3,
        ))
        .unwrap();
        assert_eq!((m.proto, m.sport, m.fragment), (PROTO_TCP, 0, true));
    }

    #[test]
    fn refuses_malformed_packets_with_the_header_at_fault() {
        assert_eq!(parse(&[]), Err(ParseError::Empty));
        assert_eq!(parse(&[0x50; 40]), Err(ParseError::Version(5)));
        let good = tcp(a4(1), 1, a4(2), 2, TCP_SYN);
        assert!(matches!(
            parse(&good[..30]),
            Err(ParseError::Truncated {
                header: "IPv4 payload",
                ..
            })
        ));
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse(&short_ihl), Err(ParseError::Ipv4HeaderLength(4)));
        let mut small_total = good.clone();
        small_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert!(matches!(
            parse(&small_total),
            Err(ParseError::TotalLength { stated: 10, .. })
        ));
        let mut bad_offset = good.clone();
        bad_offset[20 + 12] = 0x40;
        assert_eq!(parse(&bad_offset), Err(ParseError::TcpDataOffset(4)));
        // A v4 error quoting a v6 packet.
        let inner = udp(a6(1), 1, a6(2), 2);
        let mut m = vec![3, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&inner[..48]);
        assert_eq!(
            parse(&ip(a4(2), a4(1), PROTO_ICMP, &m)),
            Err(ParseError::Quoted(Box::new(ParseError::QuotedVersion {
                outer: 4,
                quoted: 6
            })))
        );
        // An error whose quote stops inside the ports.
        let cut = icmp_error(a4(2), a4(1), 3, 1, &udp(a4(1), 1, a4(2), 2)[..22]);
        assert!(matches!(parse(&cut), Err(ParseError::Quoted(_))));
    }

    #[test]
    fn trailing_bytes_beyond_the_length_field_are_ignored() {
        let mut p = udp(a4(1), 1, a4(2), 2);
        p.extend_from_slice(&[0xff; 16]);
        assert_eq!(parse(&p).unwrap().dport, 2);
    }

    fn any_addr_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<[u8; 4]>())
                .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d))),
            (any::<[u8; 16]>(), any::<[u8; 16]>())
                .prop_map(|(s, d)| (IpAddr::from(s), IpAddr::from(d))),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        /// Garbage behind a valid-looking first byte reaches the deeper paths.
        #[test]
        fn arbitrary_headers_never_panic(
            version in prop_oneof![Just(0x45u8), Just(0x4fu8), Just(0x60u8)],
            proto in prop_oneof![Just(1u8), Just(6), Just(17), Just(58), Just(0), Just(44), any::<u8>()],
            mut bytes in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            bytes.insert(0, version);
            if bytes.len() > 9 && version >> 4 == 4 { bytes[9] = proto; }
            if bytes.len() > 6 && version >> 4 == 6 { bytes[6] = proto; }
            let _ = parse(&bytes);
        }

        #[test]
        fn tcp_and_udp_round_trip(
            (src, dst) in any_addr_pair(), sport: u16, dport: u16, flags: u8, is_tcp: bool,
        ) {
            let (p, proto, flags) = if is_tcp {
                (tcp(src, sport, dst, dport, flags), PROTO_TCP, flags)
            } else {
                (udp(src, sport, dst, dport), PROTO_UDP, 0)
            };
            let m = parse(&p).unwrap();
            prop_assert_eq!(m, PacketMeta {
                src, dst, proto, sport, dport, tcp_flags: flags, icmp_error_of: None, fragment: false,
            });
        }

        #[test]
        fn icmp_errors_round_trip(
            (src, dst) in any_addr_pair(), sport: u16, dport: u16, is_tcp: bool,
        ) {
            let original = if is_tcp {
                tcp(src, sport, dst, dport, TCP_SYN | TCP_ACK)
            } else {
                udp(src, sport, dst, dport)
            };
            let proto = if is_tcp { PROTO_TCP } else { PROTO_UDP };
            let kind = if src.is_ipv4() { 3 } else { 1 };
            let m = parse(&icmp_error(dst, src, kind, 1, &original)).unwrap();
            prop_assert_eq!(m.icmp_error_of, Some((src, dst, proto, sport, dport)));
        }
    }
}
