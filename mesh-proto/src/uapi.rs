//! The WireGuard cross-platform userspace API, text protocol
//! (<https://www.wireguard.com/xplatform/#configuration-protocol>): parsing and
//! formatting only. mesh-node serves it on `/var/run/wireguard/IFNAME.sock`;
//! keyd speaks it as a client to any WireGuard (mesh-node, wireguard-go).
//!
//! Requests are `get=1` or `set=1` followed by `key=value` lines and an empty
//! line. Keys are lower-case hex. A response ends with `errno=N` and an empty
//! line; `N` is 0 on success and a *negated* errno on failure (`errno=-22`),
//! as wireguard-go writes it and as `wg` reads it.

use std::fmt::{self, Write};
use std::net::SocketAddr;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::prefix::IpPrefix;

pub const EINVAL: i32 = 22;
pub const EIO: i32 = 5;
pub const EPROTO: i32 = 71;
pub const EADDRINUSE: i32 = 98;

/// The longest line a server reads (without its `\n`). The longest valid
/// one, a key, is under 100 bytes; a server refuses longer ones with
/// [`UapiError::LineTooLong`] instead of buffering them.
pub const MAX_LINE_BYTES: usize = 4096;

/// Why a request was refused; every variant names the offending line.
/// [`UapiError::errno`] is positive; [`format_errno`] negates it on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("request must start with get=1 or set=1, found `{0}`")]
    UnknownOperation(String),
    #[error("line `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    #[error("invalid value for `{key}`: `{value}`")]
    InvalidValue { key: String, value: String },
    #[error("`{0}` before any public_key=")]
    PeerKeyWithoutPeer(String),
    #[error("unsupported protocol_version `{0}`")]
    ProtocolVersion(String),
    #[error("request has no terminating empty line")]
    Unterminated,
    #[error("a line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
}

impl UapiError {
    /// The errno the protocol answers with.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::UnknownOperation(_) | UapiError::Unterminated | UapiError::LineTooLong => {
                EPROTO
            }
            _ => EINVAL,
        }
    }
}

/// A 32-byte key on the wire. Zeroized on drop; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key(pub [u8; 32]);

impl Key {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
    pub fn to_hex(&self) -> String {
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
    fn from_hex(key: &str, value: &str) -> Result<Self, UapiError> {
        let bad = || UapiError::InvalidValue {
            key: key.to_string(),
            value: if key.contains("private") || key.contains("preshared") {
                "<redacted>".to_string()
            } else {
                value.to_string()
            },
        };
        if value.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(value.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Key(out))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    Set(SetRequest),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// An all-zero key removes the private key.
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    /// 0 removes the mark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    /// An all-zero key removes the preshared key.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// 0 disables persistent keepalive.
    pub persistent_keepalive_interval: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpPrefix>,
}

impl PeerSet {
    pub fn new(public_key: Key) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// What `get=1` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive_interval: u16,
    pub allowed_ips: Vec<IpPrefix>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds and nanoseconds since the Unix epoch of the last handshake.
    pub last_handshake: Option<(u64, u32)>,
}

fn value<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    value.parse().map_err(|_| UapiError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
    })
}

fn flag(key: &str, v: &str) -> Result<bool, UapiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UapiError::InvalidValue {
            key: key.to_string(),
            value: v.to_string(),
        }),
    }
}

/// Parses one request, up to and including its terminating empty line.
/// A `set` is parsed by [`SetParser`] and its items collected, so this and
/// the streaming server read the format the same way.
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    let Some((text, _)) = text.split_once("\n\n") else {
        return match text.split('\n').next() {
            Some("get=1" | "set=1") => Err(UapiError::Unterminated),
            other => Err(UapiError::UnknownOperation(
                other.unwrap_or_default().into(),
            )),
        };
    };
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    match first {
        "get=1" => match lines.next() {
            None => Ok(Request::Get),
            Some(other) => Err(UapiError::UnknownKey(other.to_string())),
        },
        "set=1" => {
            let mut parser = SetParser::new();
            let mut req = SetRequest::default();
            for line in lines {
                if let Some(item) = parser.line(line)? {
                    collect(&mut req, item);
                }
            }
            collect(&mut req, parser.end());
            Ok(Request::Set(req))
        }
        other => Err(UapiError::UnknownOperation(other.to_string())),
    }
}

/// Adds one streamed item to a whole request. A continuation is merged
/// into its peer as applying it would: its values win, and its own
/// `replace_allowed_ips=true` drops the prefixes of the earlier parts.
fn collect(req: &mut SetRequest, item: SetItem) {
    match item {
        SetItem::Device(d) => {
            req.private_key = d.private_key;
            req.listen_port = d.listen_port;
            req.fwmark = d.fwmark;
            req.replace_peers = d.replace_peers;
        }
        SetItem::Peer(p) => req.peers.push(p),
        SetItem::PeerContinued(more) => {
            let Some(p) = req.peers.last_mut() else {
                // SetParser never continues a peer it has not emitted.
                req.peers.push(more);
                return;
            };
            p.remove |= more.remove;
            p.update_only |= more.update_only;
            if more.preshared_key.is_some() {
                p.preshared_key = more.preshared_key;
            }
            p.endpoint = more.endpoint.or(p.endpoint);
            p.persistent_keepalive_interval = more
                .persistent_keepalive_interval
                .or(p.persistent_keepalive_interval);
            if more.replace_allowed_ips {
                p.replace_allowed_ips = true;
                p.allowed_ips.clear();
            }
            p.allowed_ips.extend_from_slice(&more.allowed_ips);
        }
    }
}

/// The device-level part of a `set=1`: the lines before the first
/// `public_key=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet {
    /// An all-zero key removes the private key.
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    /// 0 removes the mark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
}

/// One unit of a streamed `set=1`, in request order: exactly one
/// [`SetItem::Device`] first, then the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetItem {
    Device(DeviceSet),
    /// A peer's lines, up to [`MAX_ALLOWED_IPS_PER_ITEM`] prefixes.
    Peer(PeerSet),
    /// More lines of the peer emitted just before, after it reached
    /// [`MAX_ALLOWED_IPS_PER_ITEM`] prefixes. Applied on top of it: it never
    /// creates the peer nor resets what it does not name, and its own
    /// `replace_allowed_ips=true` clears the prefixes of the earlier parts.
    PeerContinued(PeerSet),
}

/// Prefixes one [`SetItem`] holds at most, so that a peer with a million
/// `allowed_ip=` lines costs the parser no more than any other peer.
pub const MAX_ALLOWED_IPS_PER_ITEM: usize = 1024;

/// A `set=1` request parsed line by line, holding at most one peer: feed it
/// the lines after `set=1` (without their `\n`) with [`SetParser::line`]
/// and call [`SetParser::end`] at the terminating empty line. Memory is
/// bounded by one item, whatever the size of the request.
#[derive(Debug, Default)]
pub struct SetParser {
    /// The device lines, until the first `public_key=` emits them.
    device: DeviceSet,
    device_sent: bool,
    /// The peer being read, emitted at the next `public_key=` or the end.
    peer: Option<PeerSet>,
    /// `peer` continues one already emitted.
    continued: bool,
}

impl SetParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// One non-empty line. Returns an item when this line completes one
    /// (the device part at the first `public_key=`, a peer at the next).
    /// After an error the request is refused; stop feeding the parser.
    pub fn line(&mut self, line: &str) -> Result<Option<SetItem>, UapiError> {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| UapiError::NotKeyValue(line.to_string()))?;
        if k == "public_key" {
            let next = PeerSet::new(Key::from_hex(k, v)?);
            let done = self.take();
            self.peer = Some(next);
            return Ok(done);
        }
        let Some(peer) = self.peer.as_mut() else {
            let req = &mut self.device;
            match k {
                "private_key" => req.private_key = Some(Key::from_hex(k, v)?),
                "listen_port" => req.listen_port = Some(value(k, v)?),
                "fwmark" => req.fwmark = Some(value(k, v)?),
                "replace_peers" => req.replace_peers = flag(k, v)?,
                "preshared_key"
                | "endpoint"
                | "allowed_ip"
                | "remove"
                | "update_only"
                | "persistent_keepalive_interval"
                | "replace_allowed_ips" => {
                    return Err(UapiError::PeerKeyWithoutPeer(k.to_string()));
                }
                "protocol_version" => check_version(v)?,
                _ => return Err(UapiError::UnknownKey(k.to_string())),
            }
            return Ok(None);
        };
        match k {
            "remove" => peer.remove = flag(k, v)?,
            "update_only" => peer.update_only = flag(k, v)?,
            "preshared_key" => peer.preshared_key = Some(Key::from_hex(k, v)?),
            "endpoint" => peer.endpoint = Some(value(k, v)?),
            "persistent_keepalive_interval" => {
                peer.persistent_keepalive_interval = Some(value(k, v)?)
            }
            "replace_allowed_ips" => peer.replace_allowed_ips = flag(k, v)?,
            "allowed_ip" => {
                let prefix: IpPrefix = value(k, v)?;
                if peer.allowed_ips.len() < MAX_ALLOWED_IPS_PER_ITEM {
                    peer.allowed_ips.push(prefix);
                    return Ok(None);
                }
                let mut more = PeerSet::new(peer.public_key.clone());
                more.allowed_ips.push(prefix);
                let done = self.take();
                self.peer = Some(more);
                self.continued = true;
                return Ok(done);
            }
            "protocol_version" => check_version(v)?,
            _ => return Err(UapiError::UnknownKey(k.to_string())),
        }
        Ok(None)
    }

    /// The terminating empty line: the last item (the device part when the
    /// request names no peer).
    pub fn end(mut self) -> SetItem {
        self.take()
            .unwrap_or_else(|| SetItem::Device(DeviceSet::default()))
    }

    /// The item held: the device part first, then the peer being read.
    fn take(&mut self) -> Option<SetItem> {
        if !self.device_sent {
            self.device_sent = true;
            return Some(SetItem::Device(std::mem::take(&mut self.device)));
        }
        let peer = self.peer.take()?;
        Some(if std::mem::take(&mut self.continued) {
            SetItem::PeerContinued(peer)
        } else {
            SetItem::Peer(peer)
        })
    }
}

fn check_version(v: &str) -> Result<(), UapiError> {
    if v == "1" {
        Ok(())
    } else {
        Err(UapiError::ProtocolVersion(v.to_string()))
    }
}

/// The response to `get=1`, with its `errno=0` trailer.
pub fn format_get_response(info: &DeviceInfo) -> String {
    let mut s = String::new();
    if let Some(k) = &info.private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex());
    }
    let _ = writeln!(s, "listen_port={}", info.listen_port);
    if let Some(m) = info.fwmark.filter(|m| *m != 0) {
        let _ = writeln!(s, "fwmark={m}");
    }
    for p in &info.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", psk.to_hex());
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive_interval
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let (sec, nsec) = p.last_handshake.unwrap_or((0, 0));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n\n");
    s
}

/// A bare `errno=-N` response for a positive errno `N` (0: success).
pub fn format_errno(errno: i32) -> String {
    format!("errno={}\n\n", -errno.abs())
}

/// Formats a `set=1` request (keyd's side).
pub fn format_set_request(req: &SetRequest) -> String {
    let mut s = String::from("set=1\n");
    if let Some(k) = &req.private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex());
    }
    if let Some(p) = req.listen_port {
        let _ = writeln!(s, "listen_port={p}");
    }
    if let Some(m) = req.fwmark {
        let _ = writeln!(s, "fwmark={m}");
    }
    if req.replace_peers {
        s.push_str("replace_peers=true\n");
    }
    for p in &req.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if p.remove {
            s.push_str("remove=true\n");
            continue;
        }
        if p.update_only {
            s.push_str("update_only=true\n");
        }
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", k.to_hex());
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        if let Some(k) = p.persistent_keepalive_interval {
            let _ = writeln!(s, "persistent_keepalive_interval={k}");
        }
        if p.replace_allowed_ips {
            s.push_str("replace_allowed_ips=true\n");
        }
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push('\n');
    s
}

/// Parses a `get=1` response (keyd's side, and tests). Returns the device
/// or the errno the server answered with.
pub fn parse_get_response(text: &str) -> Result<Result<DeviceInfo, i32>, UapiError> {
    let mut info = DeviceInfo::default();
    for line in text.split('\n') {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| UapiError::NotKeyValue(line.to_string()))?;
        if k == "errno" {
            let errno: i32 = value(k, v)?;
            let errno = errno.checked_abs().ok_or_else(|| UapiError::InvalidValue {
                key: k.to_string(),
                value: v.to_string(),
            })?;
            return Ok(if errno == 0 { Ok(info) } else { Err(errno) });
        }
        if k == "public_key" {
            info.peers.push(PeerInfo {
                public_key: Key::from_hex(k, v)?,
                preshared_key: None,
                endpoint: None,
                persistent_keepalive_interval: 0,
                allowed_ips: Vec::new(),
                rx_bytes: 0,
                tx_bytes: 0,
                last_handshake: None,
            });
            continue;
        }
        match (info.peers.last_mut(), k) {
            (None, "private_key") => info.private_key = Some(Key::from_hex(k, v)?),
            (None, "listen_port") => info.listen_port = value(k, v)?,
            (None, "fwmark") => info.fwmark = Some(value(k, v)?),
            (Some(p), "preshared_key") => {
                let key = Key::from_hex(k, v)?;
                p.preshared_key = (!key.is_zero()).then_some(key);
            }
            (Some(p), "endpoint") => p.endpoint = Some(value(k, v)?),
            (Some(p), "persistent_keepalive_interval") => {
                p.persistent_keepalive_interval = value(k, v)?
            }
            (Some(p), "allowed_ip") => p.allowed_ips.push(value(k, v)?),
            (Some(p), "rx_bytes") => p.rx_bytes = value(k, v)?,
            (Some(p), "tx_bytes") => p.tx_bytes = value(k, v)?,
            (Some(p), "last_handshake_time_sec") => {
                let sec: u64 = value(k, v)?;
                let nsec = p.last_handshake.map_or(0, |(_, n)| n);
                p.last_handshake = (sec != 0).then_some((sec, nsec));
            }
            (Some(p), "last_handshake_time_nsec") => {
                let nsec: u32 = value(k, v)?;
                if let Some((_, n)) = p.last_handshake.as_mut() {
                    *n = nsec;
                }
            }
            (_, "protocol_version") => {}
            _ => return Err(UapiError::UnknownKey(k.to_string())),
        }
    }
    Err(UapiError::Unterminated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_errno_the_server_sends_is_an_answer_not_a_panic() {
        assert_eq!(parse_get_response("errno=-22\n\n"), Ok(Err(22)));
        // i32::MIN has no positive counterpart: refused as a value.
        assert!(matches!(
            parse_get_response("errno=-2147483648\n\n"),
            Err(UapiError::InvalidValue { .. })
        ));
    }
    use proptest::prelude::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    #[test]
    fn parses_what_wg_set_sends() {
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=[fd00::1]:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.99.0.2/32\nallowed_ip=fd99::2/128\n\
             public_key={}\nremove=true\n\n",
            key(1).to_hex(),
            key(2).to_hex(),
            key(3).to_hex(),
            key(4).to_hex()
        );
        let Request::Set(set) = parse_request(&text).unwrap() else {
            panic!("set")
        };
        assert_eq!(set.private_key, Some(key(1)));
        assert_eq!(set.listen_port, Some(51820));
        assert!(set.replace_peers);
        assert_eq!(set.peers.len(), 2);
        let p = &set.peers[0];
        assert_eq!(p.public_key, key(2));
        assert_eq!(p.preshared_key, Some(key(3)));
        assert_eq!(p.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive_interval, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(set.peers[1].remove);
        // keyd's formatter produces what the parser reads back.
        assert_eq!(
            parse_request(&format_set_request(&set)).unwrap(),
            Request::Set(set)
        );
    }

    #[test]
    fn get_round_trip() {
        assert_eq!(parse_request("get=1\n\n").unwrap(), Request::Get);
        let info = DeviceInfo {
            private_key: Some(key(1)),
            listen_port: 51820,
            fwmark: None,
            peers: vec![PeerInfo {
                public_key: key(2),
                preshared_key: Some(key(3)),
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                persistent_keepalive_interval: 0,
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                rx_bytes: 10,
                tx_bytes: 20,
                last_handshake: Some((1_800_000_000, 5)),
            }],
        };
        let text = format_get_response(&info);
        assert!(text.ends_with("errno=0\n\n"));
        assert_eq!(parse_get_response(&text).unwrap(), Ok(info));
        assert_eq!(parse_get_response("errno=-22\n\n").unwrap(), Err(22));
        assert_eq!(format_errno(EINVAL), "errno=-22\n\n");
    }

    #[test]
    fn refusals_are_specific_and_never_echo_secrets() {
        let cases = [
            ("bogus=1\n\n", EPROTO),
            ("set=1\nlisten_port=99999\n\n", EINVAL),
            ("set=1\nendpoint=1.2.3.4:5\n\n", EINVAL),
            ("set=1\nnonsense\n\n", EINVAL),
            ("set=1\nwat=1\n\n", EINVAL),
            ("set=1\nprotocol_version=2\n\n", EINVAL),
            ("set=1\nlisten_port=1\n", EPROTO),
        ];
        for (text, errno) in cases {
            let err = parse_request(text).unwrap_err();
            assert_eq!(err.errno(), errno, "{text:?}: {err}");
        }
        let secret = "ab".repeat(31) + "zz";
        let err = parse_request(&format!("set=1\nprivate_key={secret}\n\n")).unwrap_err();
        assert!(!err.to_string().contains(&secret[..20]), "{err}");
    }

    fn items(lines: &[String]) -> Result<Vec<SetItem>, UapiError> {
        let mut parser = SetParser::new();
        let mut out = Vec::new();
        for l in lines {
            out.extend(parser.line(l)?);
        }
        out.push(parser.end());
        Ok(out)
    }

    #[test]
    fn the_stream_emits_the_device_part_first_then_each_peer_at_the_next_key() {
        let lines = [
            format!("private_key={}", key(1).to_hex()),
            "replace_peers=true".into(),
            format!("public_key={}", key(2).to_hex()),
            "allowed_ip=10.0.0.2/32".into(),
            format!("public_key={}", key(3).to_hex()),
            "remove=true".into(),
        ];
        let mut parser = SetParser::new();
        assert_eq!(parser.line(&lines[0]), Ok(None));
        assert_eq!(parser.line(&lines[1]), Ok(None));
        let Ok(Some(SetItem::Device(d))) = parser.line(&lines[2]) else {
            panic!("the first public_key= emits the device part")
        };
        assert_eq!(d.private_key, Some(key(1)));
        assert!(d.replace_peers);
        assert_eq!(parser.line(&lines[3]), Ok(None));
        let Ok(Some(SetItem::Peer(p))) = parser.line(&lines[4]) else {
            panic!("the next public_key= emits the peer before it")
        };
        assert_eq!((p.public_key, p.allowed_ips.len()), (key(2), 1));
        assert_eq!(parser.line(&lines[5]), Ok(None));
        let SetItem::Peer(last) = parser.end() else {
            panic!("the end emits the last peer")
        };
        assert!(last.remove);
        // No peer at all: the end emits the device part.
        let mut parser = SetParser::new();
        assert_eq!(parser.line("listen_port=7"), Ok(None));
        assert_eq!(
            parser.end(),
            SetItem::Device(DeviceSet {
                listen_port: Some(7),
                ..DeviceSet::default()
            })
        );
    }

    #[test]
    fn a_peer_with_many_prefixes_is_emitted_in_bounded_parts_and_reads_back_whole() {
        let n = 2 * MAX_ALLOWED_IPS_PER_ITEM + 5;
        let prefixes: Vec<IpPrefix> = (0..n)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap())
            .collect();
        let mut peer = PeerSet::new(key(2));
        peer.replace_allowed_ips = true;
        peer.endpoint = Some("192.0.2.1:1".parse().unwrap());
        peer.allowed_ips = prefixes.clone();
        let req = SetRequest {
            peers: vec![peer.clone(), PeerSet::new(key(3))],
            ..SetRequest::default()
        };
        let text = format_set_request(&req);
        let lines: Vec<String> = text.trim_end().lines().skip(1).map(String::from).collect();
        let got = items(&lines).unwrap();
        // Device, 3 parts of the first peer, the second peer.
        assert_eq!(got.len(), 5, "{:?}", &got[..1]);
        let SetItem::Peer(first) = &got[1] else {
            panic!("first part")
        };
        assert_eq!(first.allowed_ips.len(), MAX_ALLOWED_IPS_PER_ITEM);
        assert!(first.replace_allowed_ips && first.endpoint.is_some());
        for part in &got[2..4] {
            let SetItem::PeerContinued(more) = part else {
                panic!("continuation: {part:?}")
            };
            assert_eq!(more.public_key, key(2));
            assert!(more.allowed_ips.len() <= MAX_ALLOWED_IPS_PER_ITEM);
            assert!(!more.replace_allowed_ips && more.endpoint.is_none());
        }
        assert!(matches!(&got[4], SetItem::Peer(p) if p.public_key == key(3)));
        assert_eq!(parse_request(&text), Ok(Request::Set(req)));
    }

    #[test]
    fn replace_allowed_ips_in_a_continuation_drops_the_earlier_parts() {
        let mut text = format!("set=1\npublic_key={}\n", key(2).to_hex());
        for i in 0..=MAX_ALLOWED_IPS_PER_ITEM {
            text += &format!("allowed_ip=10.0.{}.{}/32\n", i / 256, i % 256);
        }
        text += "replace_allowed_ips=true\nallowed_ip=10.9.9.9/32\n\n";
        let Ok(Request::Set(set)) = parse_request(&text) else {
            panic!("parses")
        };
        let p = &set.peers[0];
        assert!(p.replace_allowed_ips);
        let want: Vec<IpPrefix> = ["10.0.4.0/32", "10.9.9.9/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(p.allowed_ips, want);
    }

    #[test]
    fn an_error_mid_stream_names_its_line_after_the_items_before_it() {
        let lines = [
            format!("public_key={}", key(2).to_hex()),
            format!("public_key={}", key(3).to_hex()),
            "allowed_ip=10.0.0.300/32".into(),
        ];
        let mut parser = SetParser::new();
        assert!(matches!(
            parser.line(&lines[0]),
            Ok(Some(SetItem::Device(_)))
        ));
        assert!(matches!(parser.line(&lines[1]), Ok(Some(SetItem::Peer(_)))));
        let err = parser.line(&lines[2]).unwrap_err();
        assert_eq!(err.errno(), EINVAL);
        assert!(err.to_string().contains("10.0.0.300"), "{err}");
        assert_eq!(
            parser.line(""),
            Err(UapiError::NotKeyValue(String::new())),
            "the empty line is `end`, not a line"
        );
    }

    proptest! {
        /// Whatever the lines, each item holds at most one peer's worth of
        /// prefixes, and the device part comes first, exactly once.
        #[test]
        fn items_are_bounded_and_ordered(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just(format!("public_key={}", "11".repeat(32))),
                    Just(format!("public_key={}", "22".repeat(32))),
                    (0u8..=255).prop_map(|b| format!("allowed_ip=10.0.0.{b}/32")),
                    Just("listen_port=5".to_string()),
                    Just("remove=true".to_string()),
                    Just("replace_allowed_ips=true".to_string()),
                ],
                0..3000,
            )
        ) {
            if let Ok(got) = items(&lines) {
                prop_assert!(matches!(got[0], SetItem::Device(_)));
                for item in &got[1..] {
                    match item {
                        SetItem::Device(_) => prop_assert!(false, "device part twice"),
                        SetItem::Peer(p) | SetItem::PeerContinued(p) => {
                            prop_assert!(p.allowed_ips.len() <= MAX_ALLOWED_IPS_PER_ITEM)
                        }
                    }
                }
            }
        }

        #[test]
        fn garbage_never_panics(text in "\\PC{0,300}") {
            let _ = parse_request(&text);
            let _ = parse_get_response(&text);
        }
    }
}
