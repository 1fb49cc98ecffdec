//! The client address behind a TCP (L4) load balancer: the trusted-proxy
//! list (`listener.trusted_proxies`) and PROXY protocol version 2.
//!
//! The gateway names the client to upstreams by its TCP peer address
//! (`x-forwarded-for`, `x-real-ip`, `forwarded`); client-sent forwarding
//! headers are never trusted. Behind an L4 balancer that does not preserve
//! source addresses, the TCP peer is the balancer: list its addresses in
//! `listener.trusted_proxies` and enable PROXY protocol v2 on it. A
//! connection from a listed address must then start with a v2 header
//! (binary, before the TLS ClientHello); its source address becomes the
//! connection's client address. A `LOCAL` header (the balancer's own health
//! check) keeps the TCP peer. Connections from other addresses are never
//! read for a header (a header there fails the TLS handshake). PROXY v1
//! (text) is not accepted.
//!
//! The source address is never identity: it is what upstreams log and
//! rate-limit on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

pub use oneprotect_identity::net::Cidr;

/// The PROXY protocol v2 signature (12 bytes).
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The largest address-and-TLV block accepted, bytes (the header's length
/// field allows 65535; balancers send far less).
pub const MAX_BLOCK: usize = 4096;

/// Why a PROXY v2 header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection did not start with the v2 signature and version.
    #[error("no PROXY protocol v2 header")]
    Missing,
    /// The command, family or length is not valid.
    #[error("malformed PROXY protocol v2 header: {0}")]
    Malformed(&'static str),
    /// The connection ended or failed while reading the header.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a PROXY protocol v2 header from the start of `stream` (exactly the
/// header's bytes, nothing after them). Returns the source address it
/// reports, or `None` for a `LOCAL` header or an unspecified/UNIX family
/// (keep the TCP peer).
pub async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await?;
    if head[..12] != SIGNATURE || head[12] >> 4 != 2 {
        return Err(ProxyHeaderError::Missing);
    }
    let command = head[12] & 0x0f;
    let family = head[13];
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > MAX_BLOCK {
        return Err(ProxyHeaderError::Malformed("address block too long"));
    }
    let mut block = vec![0u8; len];
    stream.read_exact(&mut block).await?;
    match command {
        0 => return Ok(None), // LOCAL
        1 => {}               // PROXY
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    }
    match family {
        // TCP over IPv4: src, dst, sport, dport.
        0x11 => {
            if len < 12 {
                return Err(ProxyHeaderError::Malformed("short IPv4 address block"));
            }
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            let port = u16::from_be_bytes([block[8], block[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // TCP over IPv6.
        0x21 => {
            if len < 36 {
                return Err(ProxyHeaderError::Malformed("short IPv6 address block"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            let port = u16::from_be_bytes([block[32], block[33]]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port,
            )))
        }
        // UNSPEC: keep the TCP peer, as the specification says.
        0x00 => Ok(None),
        _ => Err(ProxyHeaderError::Malformed(
            "only TCP over IPv4 or IPv6 is accepted",
        )),
    }
}

/// Encodes a v2 `PROXY` header for a TCP connection from `src` to `dst`
/// (both of one family). For tests and tools.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v2_headers_round_trip_and_bad_ones_are_refused() {
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let mut bytes = encode_v2(src, dst);
        bytes.extend_from_slice(b"\x16\x03\x01rest");
        let mut r = bytes.as_slice();
        assert_eq!(read_v2(&mut r).await.unwrap(), Some(src));
        assert_eq!(r, b"\x16\x03\x01rest", "only the header is consumed");

        let src6: SocketAddr = "[2001:db8::7]:1".parse().unwrap();
        let dst6: SocketAddr = "[::1]:2".parse().unwrap();
        let bytes = encode_v2(src6, dst6);
        assert_eq!(read_v2(&mut bytes.as_slice()).await.unwrap(), Some(src6));

        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read_v2(&mut local.as_slice()).await.unwrap(), None);

        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03aaaaaaaaaaaa".to_vec();
        assert!(matches!(
            read_v2(&mut tls_hello.as_slice()).await,
            Err(ProxyHeaderError::Missing)
        ));
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        assert!(read_v2(&mut v1.as_slice()).await.is_err());
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read_v2(&mut long.as_slice()).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut short = encode_v2(src, dst);
        short.truncate(20);
        assert!(matches!(
            read_v2(&mut short.as_slice()).await,
            Err(ProxyHeaderError::Io(_))
        ));
    }
}
