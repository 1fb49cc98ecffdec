//! The gateway's HTTP/1.1 fast path (ADR-0023): its request-head parser,
//! head rewriter, response-head parser and chunked-body scan. Never panics;
//! what the fast path takes, the `http` crate (pingora's types) reads the
//! same way; what it writes parses back whole; the chunked scan gives the
//! same end however the body is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oneprotect_gateway::conn::Forwarding;
use oneprotect_gateway::fast::{
    parse_head, parse_request, write_upstream_head, ChunkedScan, Framing,
};
use oneprotect_gateway::headers::StripPolicy;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        // Differential: pingora builds its request from the http crate's
        // types; the fast path must take nothing they would not.
        assert!(http::Method::from_bytes(req.method.as_bytes()).is_ok());
        let uri: http::Uri = req
            .target
            .parse()
            .expect("a target the fast path takes is a URI");
        assert_eq!(uri.path(), req.path(), "routes by the same path");
        for h in req.headers() {
            assert!(http::HeaderName::from_bytes(h.name.as_bytes()).is_ok());
            assert!(http::HeaderValue::from_bytes(h.value).is_ok());
        }
        assert!(req.head_len <= data.len());
        let fwd = Forwarding::new("192.0.2.1".parse().unwrap());
        let assertion = http::HeaderValue::from_static("a.b.c");
        let mut out = Vec::new();
        write_upstream_head(
            &mut out,
            &req,
            StripPolicy::default(),
            &fwd,
            &[],
            &assertion,
        );
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut back = httparse::Request::new(&mut headers);
        assert_eq!(back.parse(&out), Ok(httparse::Status::Complete(out.len())));
        let policy = StripPolicy::default();
        let spoofed = back
            .headers
            .iter()
            .filter(|h| policy.removes(h.name))
            .count();
        // Only the gateway's own forwarding headers and assertion remain.
        assert_eq!(spoofed, 4, "{}", String::from_utf8_lossy(&out));
    }
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok(Some(head)) = parse_head(data) {
        let mut out = Vec::new();
        let rechunk = head
            .facts(head_request)
            .is_ok_and(|r| r.framing == Framing::UntilClose);
        head.write_for_client(&mut out, true, rechunk);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut back = httparse::Response::new(&mut headers);
        assert_eq!(back.parse(&out), Ok(httparse::Status::Complete(out.len())));
    }
    let whole = ChunkedScan::default().feed(data);
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut scan = ChunkedScan::default();
    let pieces = match scan.feed(&data[..cut]) {
        Ok(None) => scan.feed(&data[cut..]).map(|e| e.map(|e| e + cut)),
        other => other,
    };
    assert_eq!(whole, pieces, "cut at {cut}");
    // The decoder's view (the HTTP/2 relay, ADR-0028): the same data runs
    // whole and cut, each inside what the scan took.
    let mut decoded_whole = Vec::new();
    let end = ChunkedScan::default().feed_with(data, |r| decoded_whole.extend_from_slice(&data[r]));
    let mut decoded_cut = Vec::new();
    let mut scan = ChunkedScan::default();
    let first = scan.feed_with(&data[..cut], |r| decoded_cut.extend_from_slice(&data[r]));
    if let Ok(None) = first {
        let rest = &data[cut..];
        let _ = scan.feed_with(rest, |r| decoded_cut.extend_from_slice(&rest[r]));
    }
    if let (Ok(_), Ok(_)) = (&end, &pieces) {
        assert_eq!(decoded_whole, decoded_cut, "decoded, cut at {cut}");
    }
    if let Ok(Some(n)) = end {
        assert!(decoded_whole.len() < n.max(1), "data runs lie inside the body");
    }
});
