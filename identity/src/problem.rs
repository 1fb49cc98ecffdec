//! RFC 9457 problem details, shared by every HTTP edge (enroll-api, gateway).
//!
//! Every error answer is `application/problem+json` with a stable
//! machine-readable `code`. The catalogue below is the one list of codes;
//! `specs/openapi.yaml` documents each and the contract tests check that the
//! two agree.

use serde::{Deserialize, Serialize};

/// The media type of a problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";
/// The base of every problem `type` URI; the code is appended.
pub const TYPE_BASE: &str = "https://oneprotect.dev/problems/";

/// One kind of error answer: its stable code, HTTP status and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemKind {
    /// Stable machine-readable code (snake_case). Never changes once published.
    pub code: &'static str,
    /// The HTTP status it is sent with.
    pub status: u16,
    /// A short human-readable summary that does not vary between occurrences.
    pub title: &'static str,
}

macro_rules! kinds {
    ($($(#[$m:meta])* $name:ident = ($code:literal, $status:literal, $title:literal);)*) => {
        $( $(#[$m])* pub const $name: ProblemKind = ProblemKind { code: $code, status: $status, title: $title }; )*
        /// Every problem kind, for the contract tests and documentation.
        pub const ALL: &[ProblemKind] = &[$($name),*];
    };
}

kinds! {
    /// The body is not syntactically valid JSON.
    INVALID_JSON = ("invalid_json", 400, "Request body is not valid JSON");
    /// The request is not valid HTTP (RFC 9112 framing: no or several
    /// `Host` headers, a malformed chunk, a request line or header the
    /// gateway's parser refuses). The gateway's answer; never forwarded.
    BAD_REQUEST = ("bad_request", 400, "Request is not valid HTTP");
    /// The body is JSON but a field is missing, unknown or out of range.
    INVALID_REQUEST = ("invalid_request", 422, "Request fields are missing or invalid");
    /// The request's Content-Type is not `application/json`.
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, "Content-Type must be application/json");
    /// The body exceeds the configured limit.
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "Request body is too large");
    /// The request head (request line and headers) did not arrive in time
    /// (the gateway's `listener.header_timeout_ms`, counted from its first byte).
    REQUEST_HEADER_TIMEOUT = ("request_header_timeout", 408, "Request header was not received in time");
    /// The request body did not arrive in time (the enroll-api's
    /// `limits.body_read_timeout_ms`, counted from the end of the head).
    REQUEST_BODY_TIMEOUT = ("request_body_timeout", 408, "Request body was not received in time");
    /// The request asks to turn the connection into a tunnel (`Upgrade`,
    /// `Connection: upgrade`, or `CONNECT`): a tunnel would escape the
    /// gateway's per-request revocation check, so the gateway refuses it.
    UPGRADE_NOT_ALLOWED = ("upgrade_not_allowed", 400, "Protocol upgrades and tunnels are not allowed");
    /// The request head is larger than the gateway accepts (`listener.max_header_bytes`).
    REQUEST_HEADER_TOO_LARGE = ("request_header_too_large", 431, "Request header is too large");
    /// The CSR is not a PEM-encoded PKCS#10 request.
    INVALID_CSR = ("invalid_csr", 400, "CSR is not a valid PEM-encoded PKCS#10 request");
    /// The CSR's self-signature does not verify (no proof of possession).
    CSR_SIGNATURE_INVALID = ("csr_signature_invalid", 400, "CSR signature does not verify");
    /// The CSR's key or signature algorithm is not accepted.
    UNSUPPORTED_KEY = ("unsupported_key", 400, "Key or signature algorithm is not accepted");
    /// The CSR's RSA key is shorter than 2048 bits.
    WEAK_KEY = ("weak_key", 400, "Key is too weak");
    /// The enrollment token is unknown, expired, used up or revoked (one answer for all).
    INVALID_TOKEN = ("invalid_token", 401, "Enrollment token is not valid");
    /// The admin bearer key is missing or not valid.
    UNAUTHORIZED = ("unauthorized", 401, "Missing or invalid credentials");
    /// The agent endpoint was called without a valid gateway identity assertion.
    IDENTITY_REQUIRED = ("identity_required", 401, "A verified agent identity is required");
    /// The asserted identity may not act on this resource.
    IDENTITY_MISMATCH = ("identity_mismatch", 403, "Identity does not match the resource");
    /// The agent is revoked.
    AGENT_REVOKED = ("agent_revoked", 403, "Agent is revoked");
    /// The certificate is revoked.
    CERTIFICATE_REVOKED = ("certificate_revoked", 403, "Certificate is revoked");
    /// The certificate has been replaced by a newer one (possible key theft).
    CERTIFICATE_SUPERSEDED = ("certificate_superseded", 403, "Certificate has been superseded");
    /// The resource does not exist in the caller's tenant.
    NOT_FOUND = ("not_found", 404, "Resource not found");
    /// No route matches the path.
    ROUTE_NOT_FOUND = ("route_not_found", 404, "No route for this path");
    /// The method is not allowed on this path.
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "Method not allowed");
    /// The request conflicts with the resource's state.
    CONFLICT = ("conflict", 409, "Request conflicts with the current state");
    /// Too many requests; retry after the given delay.
    RATE_LIMITED = ("rate_limited", 429, "Too many requests");
    /// An unexpected error; details are in the server log.
    INTERNAL = ("internal", 500, "Internal error");
    /// The upstream failed or answered with garbage.
    BAD_GATEWAY = ("bad_gateway", 502, "Upstream failed");
    /// The storage backend is unavailable; retry after the given delay.
    STORAGE_UNAVAILABLE = ("storage_unavailable", 503, "Storage is unavailable");
    /// Revocation state cannot be confirmed (fail closed); retry later.
    REVOCATION_UNAVAILABLE = ("revocation_unavailable", 503, "Revocation state cannot be confirmed");
    /// No healthy upstream is available.
    UPSTREAM_UNAVAILABLE = ("upstream_unavailable", 503, "No healthy upstream");
    /// The upstream did not answer in time.
    GATEWAY_TIMEOUT = ("gateway_timeout", 504, "Upstream timed out");
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI naming the problem type: [`TYPE_BASE`] + code.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// The kind's fixed title.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// The stable machine-readable code.
    pub code: String,
    /// A human-readable explanation of this occurrence. Never contains a
    /// secret or an internal cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Problem {
    /// A problem of `kind` with an optional detail.
    pub fn new(kind: ProblemKind, detail: Option<String>) -> Self {
        Self {
            type_uri: format!("{TYPE_BASE}{}", kind.code),
            title: kind.title.to_owned(),
            status: kind.status,
            code: kind.code.to_owned(),
            detail,
        }
    }

    /// The document as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and an integer always serialises.
        serde_json::to_vec(self).expect("problem serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_statuses_are_errors() {
        let mut seen = std::collections::HashSet::new();
        for k in ALL {
            assert!(seen.insert(k.code), "duplicate {}", k.code);
            assert!(k.code.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'));
            assert!((400..600).contains(&k.status));
        }
    }

    #[test]
    fn problem_json_shape() {
        let p = Problem::new(INVALID_TOKEN, None);
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["type"], "https://oneprotect.dev/problems/invalid_token");
        assert_eq!(v["status"], 401);
        assert_eq!(v["code"], "invalid_token");
        assert!(v.get("detail").is_none());
    }
}
