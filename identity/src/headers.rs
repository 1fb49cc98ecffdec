//! The HTTP header names the gateway removes from clients and injects for
//! upstreams.
//!
//! Every name here is lowercase (HTTP/2 requires it; HTTP/1 matching is
//! case-insensitive). Upstreams must trust only headers the gateway injected:
//! the gateway removes every client-sent copy of each name in
//! [`STRIPPED_EXACT`] and every name starting with [`PREFIX`], on every request,
//! whether or not the client presented a certificate.

/// The prefix of every header the gateway injects.
pub const PREFIX: &str = "x-oneprotect-";
/// The verified tenant id (canonical UUID).
pub const TENANT_ID: &str = "x-oneprotect-tenant-id";
/// The verified agent id (canonical UUID).
pub const AGENT_ID: &str = "x-oneprotect-agent-id";
/// The client certificate's serial number (32 lowercase hex digits).
pub const CERT_SERIAL: &str = "x-oneprotect-cert-serial";
/// The client certificate's NotAfter, RFC 3339 UTC.
pub const CERT_NOT_AFTER: &str = "x-oneprotect-cert-not-after";
/// The agent's SPIFFE identity URI.
pub const SPIFFE_ID: &str = "x-oneprotect-spiffe-id";
/// The short-lived signed identity assertion (compact EdDSA JWT); see
/// [`crate::assertion`].
pub const IDENTITY_ASSERTION: &str = "x-oneprotect-identity-assertion";
/// Envoy's client-certificate header; injected only when enabled.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Identity-bearing headers of other conventions, always removed from client
/// requests (in addition to everything starting with [`PREFIX`]).
pub const STRIPPED_EXACT: [&str; 3] = [XFCC, "client-cert", "client-cert-chain"];

/// Every header the gateway may inject, in the order it injects them.
pub const INJECTED: [&str; 6] = [
    TENANT_ID,
    AGENT_ID,
    CERT_SERIAL,
    CERT_NOT_AFTER,
    SPIFFE_ID,
    IDENTITY_ASSERTION,
];

/// Whether a client-sent header of this name must be removed before the
/// request goes upstream. Case-insensitive; allocation-free.
pub fn is_client_identity_header(name: &str) -> bool {
    let b = name.as_bytes();
    (b.len() >= PREFIX.len() && b[..PREFIX.len()].eq_ignore_ascii_case(PREFIX.as_bytes()))
        || STRIPPED_EXACT.iter().any(|h| h.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_our_prefix_and_foreign_identity_headers_in_any_case() {
        for name in [
            "x-oneprotect-tenant-id",
            "X-OneProtect-Agent-Id",
            "X-ONEPROTECT-ANYTHING",
            "x-oneprotect-",
            "X-Forwarded-Client-Cert",
            "client-cert",
            "Client-Cert-Chain",
        ] {
            assert!(is_client_identity_header(name), "{name}");
        }
        for name in [
            "host",
            "x-oneprotect",
            "x-forwarded-for",
            "client-certs",
            "authorization",
        ] {
            assert!(!is_client_identity_header(name), "{name}");
        }
    }

    #[test]
    fn injected_names_are_lowercase_and_stripped() {
        for name in INJECTED {
            assert_eq!(name, name.to_ascii_lowercase());
            assert!(is_client_identity_header(name));
        }
    }
}
