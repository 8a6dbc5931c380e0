//! Arbitrary request heads through the framing checks (`forwarding::normalise`): never
//! a panic; what passes is origin-form with at most one Host and one Content-Length
//! and no `_` in a field name, and passes again unchanged; a field it carries is never
//! reported absent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let (Some(method), Some(target)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = std::str::from_utf8(method) else {
        return;
    };
    let Ok(mut req) = RequestHeader::build(method, target, None) else {
        return;
    };
    if flags & 1 == 1 {
        req.set_version(http::Version::HTTP_10);
    }
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let Ok(name) = http::HeaderName::from_bytes(name) else {
            continue;
        };
        let _ = req.append_header(name, value);
    }
    let allow_underscores = flags & 2 == 2;
    let request_id = http::HeaderName::from_static("x-request-id");
    if let Ok(carried) = tollgate::forwarding::normalise(&mut req, allow_underscores, &request_id) {
        // A field the head carries is never reported absent: the pipeline would not
        // look it up.
        for (name, said) in [
            ("traceparent", carried.traceparent),
            ("tracestate", carried.tracestate),
            ("x-request-id", carried.request_id),
        ] {
            assert!(said || !req.headers.contains_key(name), "{name} carried");
        }
        let target = req.raw_path();
        assert!(target.starts_with(b"/") || target == b"*", "{target:?}");
        assert!(req.headers.get_all("host").iter().count() <= 1);
        assert!(req.headers.get_all("content-length").iter().count() <= 1);
        if !allow_underscores {
            assert!(req.headers.keys().all(|n| !n.as_str().contains('_')));
        }
        let before = format!("{:?}", req.headers);
        assert!(
            tollgate::forwarding::normalise(&mut req, allow_underscores, &request_id).is_ok(),
            "normalised head refused on a second pass"
        );
        assert_eq!(before, format!("{:?}", req.headers), "not idempotent");
    }
});
