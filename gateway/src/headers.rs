//! Header policy: remove every client-sent identity and forwarding header
//! (and, by default, every header whose name contains `_`), set the
//! gateway's own forwarding headers, inject the verified identity. Plain
//! functions over pingora's `RequestHeader`, unit-tested without sockets.

use http::HeaderValue;
use oneprotect_identity::headers::{
    is_client_identity_header, is_forwarding_header, FORWARDED, IDENTITY_ASSERTION,
    X_FORWARDED_FOR, X_REAL_IP,
};
use pingora::http::RequestHeader;

use crate::conn::{ConnIdentity, Forwarding};

/// What [`strip_client_headers`] removes beyond the identity and forwarding
/// headers, which it always removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripPolicy {
    /// Remove every header whose name contains `_` (nginx's default,
    /// `underscores_in_headers off`): CGI, WSGI, PHP and Rack upstreams read
    /// `_` as `-`, so such a name can shadow a header the gateway vouches
    /// for. `headers.allow_underscores = true` keeps them (identity and
    /// forwarding names in any spelling are removed regardless).
    pub drop_underscored: bool,
}

impl Default for StripPolicy {
    fn default() -> Self {
        Self {
            drop_underscored: true,
        }
    }
}

impl StripPolicy {
    /// Whether a client header of this name is removed.
    pub fn removes(&self, name: &str) -> bool {
        is_client_identity_header(name)
            || is_forwarding_header(name)
            || (self.drop_underscored && name.as_bytes().contains(&b'_'))
    }
}

/// Removes every client header that `policy` names — any case, any
/// spelling, any number of copies. Returns how many names were removed.
/// Allocates only when there is something to remove.
pub fn strip_client_headers(req: &mut RequestHeader, policy: StripPolicy) -> usize {
    if !req.headers.keys().any(|n| policy.removes(n.as_str())) {
        return 0;
    }
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| policy.removes(n.as_str()))
        .cloned()
        .collect();
    for n in &names {
        req.remove_header(n);
    }
    names.len()
}

/// Sets the gateway's own forwarding headers. Call after
/// [`strip_client_headers`], which removed the client's copies.
pub fn set_forwarding(req: &mut RequestHeader, f: &Forwarding) -> pingora::Result<()> {
    req.insert_header(X_FORWARDED_FOR, f.address().clone())?;
    req.insert_header(X_REAL_IP, f.address().clone())?;
    req.insert_header(FORWARDED, f.forwarded().clone())?;
    Ok(())
}

/// Injects the connection's identity headers and the signed assertion.
/// Call after [`strip_client_headers`].
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

    fn left(req: &RequestHeader) -> Vec<String> {
        let mut left: Vec<_> = req.headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        left
    }

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
        req.append_header("Forwarded", "for=1.2.3.4").unwrap();
        req.append_header("X-Real-IP", "1.2.3.4").unwrap();
        req.append_header("X-Forwarded-Host", "evil").unwrap();
        let policy = StripPolicy::default();
        assert_eq!(strip_client_headers(&mut req, policy), 9);
        assert_eq!(left(&req), ["authorization"]);
        assert_eq!(strip_client_headers(&mut req, policy), 0);
    }

    #[test]
    fn underscored_names_are_dropped_unless_allowed_but_protected_ones_always() {
        let build = || {
            let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
            for (n, v) in [
                ("x_oneprotect_tenant_id", "spoof"),
                ("X_OneProtect_Agent_Id", "spoof"),
                ("x-oneprotect_spiffe_id", "spoof"),
                ("x_forwarded_client_cert", "spoof"),
                ("client_cert", "spoof"),
                ("x_forwarded_for", "1.2.3.4"),
                ("x_real_ip", "1.2.3.4"),
                ("x_custom_thing", "kept only when allowed"),
                ("x-plain", "kept"),
            ] {
                req.append_header(n, v).unwrap();
            }
            req
        };
        let mut req = build();
        assert_eq!(strip_client_headers(&mut req, StripPolicy::default()), 8);
        assert_eq!(left(&req), ["x-plain"]);
        let mut req = build();
        let allow = StripPolicy {
            drop_underscored: false,
        };
        assert_eq!(strip_client_headers(&mut req, allow), 7);
        assert_eq!(left(&req), ["x-plain", "x_custom_thing"]);
    }

    #[test]
    fn forwarding_headers_name_the_client() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        set_forwarding(&mut req, &Forwarding::new("192.0.2.7".parse().unwrap())).unwrap();
        assert_eq!(req.headers[X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(req.headers[X_REAL_IP], "192.0.2.7");
        assert_eq!(req.headers[FORWARDED], "for=192.0.2.7");
        set_forwarding(&mut req, &Forwarding::new("2001:db8::1".parse().unwrap())).unwrap();
        assert_eq!(req.headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(req.headers[X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(req.headers[FORWARDED], "for=\"[2001:db8::1]\"");
    }
}
