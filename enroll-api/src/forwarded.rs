//! The client address behind a trusted gateway.
//!
//! The exchange's per-address rate limit and the request log need the
//! client's address. Directly connected, that is the TCP peer. Behind the
//! gateway, the TCP peer is the gateway; the gateway removes every
//! client-sent `X-Forwarded-For` and sets its own, holding the address of the
//! TCP peer it accepted. This service believes that header only from the
//! addresses configured in `forwarded.trusted_proxies` (default: none), and
//! then only its right-most entry — the one the trusted hop appended; entries
//! to its left could have been written by anyone. From any other peer the
//! header is ignored, so a client cannot pick its own rate-limit bucket.
//! A trusted peer that sends no usable entry is treated as the client itself
//! (its own address is then the bucket: fail closed, never unlimited).

use std::net::IpAddr;

use http::HeaderMap;

/// The header a trusted gateway sets.
pub const HEADER: &str = "x-forwarded-for";

pub use oneprotect_identity::net::Cidr;

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The peers whose `X-Forwarded-For` is believed. Empty (the default)
/// believes nobody: the TCP peer is the client.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Trusts the given ranges.
    pub fn new(ranges: Vec<Cidr>) -> Self {
        Self(ranges)
    }

    /// Whether `peer` is a trusted proxy.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(peer))
    }

    /// The client address of a request that arrived from `peer` with
    /// `headers`: the right-most `X-Forwarded-For` entry when `peer` is
    /// trusted and that entry is an IP address, else `peer` itself.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        // Several header lines are one list (RFC 9110 §5.3); the last
        // line's last element is what the trusted hop wrote.
        headers
            .get_all(HEADER)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
            .map_or(peer, canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.1")), "v4-mapped");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "::/129",
            "host",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn untrusted_peers_forged_header_is_ignored() {
        let t = TrustedProxies::new(vec!["127.0.0.1".parse().unwrap()]);
        let h = headers(&["198.51.100.7"]);
        assert_eq!(t.client_ip(ip("127.0.0.2"), &h), ip("127.0.0.2"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("127.0.0.1"), &h),
            ip("127.0.0.1"),
            "nobody is trusted by default"
        );
    }

    #[test]
    fn trusted_peer_gives_the_right_most_entry() {
        let t = TrustedProxies::new(vec!["127.0.0.1".parse().unwrap()]);
        let p = ip("127.0.0.1");
        assert_eq!(
            t.client_ip(p, &headers(&["198.51.100.7"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            t.client_ip(p, &headers(&["6.6.6.6, 198.51.100.7"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            t.client_ip(p, &headers(&["6.6.6.6", "198.51.100.8"])),
            ip("198.51.100.8")
        );
        assert_eq!(
            t.client_ip(p, &headers(&["2001:db8::1"])),
            ip("2001:db8::1")
        );
        // Nothing usable: the peer itself.
        assert_eq!(t.client_ip(p, &headers(&[])), p);
        assert_eq!(t.client_ip(p, &headers(&["198.51.100.7, junk"])), p);
        assert_eq!(t.client_ip(p, &headers(&["198.51.100.7,"])), p);
    }
}
