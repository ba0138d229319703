//! The WireGuard userspace-API text protocol: `parse_request` (what any
//! local client sends mesh-node) and `parse_get_response` (what a data plane
//! answers keyd). Neither may panic, and what they accept survives a round
//! trip through the matching formatter unchanged, apart from what the
//! protocol itself drops (see `normalize_*`).

#![no_main]


use libfuzzer_sys::fuzz_target;
use mesh_proto::uapi::{
    self, DeviceInfo, Request, SetRequest, format_get_response, format_set_request,
};

/// `format_set_request` writes only `public_key` and `remove` for a peer
/// being removed: the other fields of a removed peer are not sent.
fn normalize_set(mut req: SetRequest) -> SetRequest {
    for p in req.peers.iter_mut().filter(|p| p.remove) {
        *p = uapi::PeerSet {
            remove: true,
            ..uapi::PeerSet::new(p.public_key.clone())
        };
    }
    req
}

/// `format_get_response` leaves out a zero fwmark.
fn normalize_info(mut info: DeviceInfo) -> DeviceInfo {
    info.fwmark = info.fwmark.filter(|m| *m != 0);
    info
}

fuzz_target!(|data: &[u8]| {
    pqmesh_fuzz::write_seeds_if_asked("uapi");
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match uapi::parse_request(text) {
        Ok(Request::Set(req)) => {
            let wire = format_set_request(&req);
            let again = uapi::parse_request(&wire);
            assert_eq!(
                again,
                Ok(Request::Set(normalize_set(req))),
                "set request does not survive format + parse:\n{wire}"
            );
        }
        Ok(Request::Get) => {}
        Err(e) => {
            let errno = e.errno();
            assert!(errno == uapi::EINVAL || errno == uapi::EPROTO, "{e:?}");
        }
    }
    if let Ok(Ok(info)) = uapi::parse_get_response(text) {
        let wire = format_get_response(&info);
        let again = uapi::parse_get_response(&wire);
        assert_eq!(
            again,
            Ok(Ok(normalize_info(info))),
            "get response does not survive format + parse:\n{wire}"
        );
    }
});
