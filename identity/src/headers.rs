//! The HTTP header names the gateway removes from clients and injects for
//! upstreams.
//!
//! Every name here is lowercase (HTTP/2 requires it; HTTP/1 matching is
//! case-insensitive). Upstreams must trust only headers the gateway injected:
//! the gateway removes every client-sent copy of each name in
//! [`STRIPPED_EXACT`] and every name starting with [`PREFIX`], on every request,
//! whether or not the client presented a certificate.
//!
//! Names are compared the way CGI, WSGI, PHP and Rack upstreams see them:
//! they turn `X-OneProtect-Tenant-Id` and `x_oneprotect_tenant_id` into the
//! same `HTTP_X_ONEPROTECT_TENANT_ID`, so a client header is protected when
//! its name, lower-cased with `_` read as `-`, matches a protected name
//! ([`names_equivalent`]). The forwarding headers ([`is_forwarding_header`])
//! are protected the same way: the gateway sets its own.

/// The prefix of every header the gateway injects.
pub const PREFIX: &str = "x-oneprotect-";
/// The verified tenant id (canonical UUID).
pub const TENANT_ID: &str = "x-oneprotect-tenant-id";
/// The verified agent id (canonical UUID).
pub const AGENT_ID: &str = "x-oneprotect-agent-id";
/// The client certificate's serial number (32 lowercase hex digits; 40
/// for a serial above 128 bits, see [`crate::SerialNumber`]).
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

/// The client address headers the gateway sets itself (to the TCP peer, or
/// the address a trusted proxy reported); client-sent copies are removed.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
/// See [`X_FORWARDED_FOR`].
pub const X_REAL_IP: &str = "x-real-ip";
/// RFC 7239 `Forwarded`; see [`X_FORWARDED_FOR`].
pub const FORWARDED: &str = "forwarded";
/// The prefix of the de-facto forwarding family (`x-forwarded-host`,
/// `-proto`, `-port`, `-prefix`, ...): all removed from clients.
pub const X_FORWARDED_PREFIX: &str = "x-forwarded-";

/// One header-name byte as CGI-style upstreams read it: lower case, `_` as `-`.
const fn fold(b: u8) -> u8 {
    if b == b'_' {
        b'-'
    } else {
        b.to_ascii_lowercase()
    }
}

/// Whether two header names are the same name to a CGI, WSGI, PHP or Rack
/// upstream: equal ASCII case-insensitively with `_` and `-` equal.
/// Allocation-free.
pub fn names_equivalent(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// Whether `name` starts with `prefix` under [`names_equivalent`]'s rules.
fn starts_equivalent(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(x, y)| fold(x) == fold(y))
}

/// Whether a client-sent header of this name must be removed before the
/// request goes upstream because it could carry an identity: our prefix or
/// one of [`STRIPPED_EXACT`], compared as [`names_equivalent`] does (any
/// case, `_` for `-`). Allocation-free.
pub fn is_client_identity_header(name: &str) -> bool {
    starts_equivalent(name, PREFIX) || STRIPPED_EXACT.iter().any(|h| names_equivalent(h, name))
}

/// Whether a client-sent header of this name claims a client address or
/// the original request's scheme, host or port (`forwarded`, `x-real-ip`,
/// every `x-forwarded-*`), compared as [`names_equivalent`] does. The
/// gateway removes them and sets its own.
pub fn is_forwarding_header(name: &str) -> bool {
    names_equivalent(name, FORWARDED)
        || names_equivalent(name, X_REAL_IP)
        || starts_equivalent(name, X_FORWARDED_PREFIX)
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
            // Spellings CGI/WSGI/PHP/Rack upstreams fold into the same name.
            "x_oneprotect_tenant_id",
            "X_OneProtect_Agent_Id",
            "x-oneprotect_spiffe_id",
            "x_forwarded_client_cert",
            "client_cert",
            "CLIENT_CERT_CHAIN",
            "x_oneprotect_",
        ] {
            assert!(is_client_identity_header(name), "{name}");
        }
        for name in [
            "host",
            "x-oneprotect",
            "x-forwarded-for",
            "client-certs",
            "client_certs",
            "authorization",
            "x_oneprotect",
            "xxoneprotect-tenant-id",
        ] {
            assert!(!is_client_identity_header(name), "{name}");
        }
    }

    #[test]
    fn forwarding_headers_in_every_spelling() {
        for name in [
            "x-forwarded-for",
            "X-Forwarded-For",
            "x_forwarded_for",
            "Forwarded",
            "X-Real-IP",
            "x_real_ip",
            "X-Forwarded-Host",
            "x-forwarded-proto",
            "X_FORWARDED_PORT",
        ] {
            assert!(is_forwarding_header(name), "{name}");
        }
        for name in ["forwarded-for", "x-forwarded", "x-real-ips", "via", "host"] {
            assert!(!is_forwarding_header(name), "{name}");
        }
    }

    #[test]
    fn equivalence_is_case_and_underscore_blind_only() {
        assert!(names_equivalent("X_A-b", "x-a_B"));
        assert!(!names_equivalent("x-a", "x-ab"));
        assert!(!names_equivalent("x.a", "x-a"));
    }

    #[test]
    fn injected_names_are_lowercase_and_stripped() {
        for name in INJECTED {
            assert_eq!(name, name.to_ascii_lowercase());
            assert!(is_client_identity_header(name));
        }
    }
}
