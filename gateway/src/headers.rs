//! Header policy: remove every client-sent identity header, inject the
//! verified identity. Plain functions over pingora's `RequestHeader`,
//! unit-tested without sockets.

use http::HeaderValue;
use oneprotect_identity::headers::{is_client_identity_header, IDENTITY_ASSERTION};
use pingora::http::RequestHeader;

use crate::conn::ConnIdentity;

/// Removes every header that [`is_client_identity_header`] names — any case,
/// any number of copies. Returns how many names were removed. Allocates only
/// when there is something to remove.
pub fn strip_client_identity_headers(req: &mut RequestHeader) -> usize {
    if !req
        .headers
        .keys()
        .any(|n| is_client_identity_header(n.as_str()))
    {
        return 0;
    }
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| is_client_identity_header(n.as_str()))
        .cloned()
        .collect();
    for n in &names {
        req.remove_header(n);
    }
    names.len()
}

/// Injects the connection's identity headers and the signed assertion.
/// Call after [`strip_client_identity_headers`].
pub fn inject_identity(
    req: &mut RequestHeader,
    conn: &ConnIdentity,
    assertion: HeaderValue,
) -> pingora::Result<()> {
    for (name, value) in conn.headers() {
        req.insert_header(*name, value.clone())?;
    }
    req.insert_header(IDENTITY_ASSERTION, assertion)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_every_copy_in_any_case_and_keeps_the_rest() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.append_header("X-OneProtect-Tenant-Id", "spoof")
            .unwrap();
        req.append_header("x-oneprotect-tenant-id", "spoof2")
            .unwrap();
        req.append_header("X-ONEPROTECT-WHATEVER", "a").unwrap();
        req.append_header("X-Forwarded-Client-Cert", "By=evil")
            .unwrap();
        req.append_header("client-cert", ":abc:").unwrap();
        req.append_header("Client-Cert-Chain", ":abc:").unwrap();
        req.append_header("Authorization", "Bearer keep").unwrap();
        req.append_header("x-forwarded-for", "1.2.3.4").unwrap();
        assert_eq!(strip_client_identity_headers(&mut req), 5);
        let mut left: Vec<_> = req.headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "x-forwarded-for"]);
        assert_eq!(strip_client_identity_headers(&mut req), 0);
    }
}
