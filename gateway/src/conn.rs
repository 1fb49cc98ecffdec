//! The per-connection identity: everything derived from the verified client
//! certificate that requests need, computed once per connection.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use oneprotect_identity::{headers, AgentIdentity, KeySchema};
use time::format_description::well_known::Rfc3339;

use crate::assertion::{AssertionService, SignedAssertion};
use crate::routes::Route;

/// What the handshake callback needs to build a [`ConnIdentity`].
#[derive(Debug)]
pub struct IdentityContext {
    /// The Redis key schema.
    pub keys: KeySchema,
    /// The assertion signer.
    pub assertions: Arc<AssertionService>,
    /// The XFCC `By` value when XFCC injection is on.
    pub xfcc_by: Option<String>,
}

/// The verified identity of one connection, with its header values and Redis
/// keys prepared once.
#[derive(Debug)]
pub struct ConnIdentity {
    identity: Arc<AgentIdentity>,
    headers: Vec<(&'static str, HeaderValue)>,
    cert_key: String,
    agent_key: String,
    assertion: ArcSwapOption<SignedAssertion>,
    /// Signalled when an upstream switched this connection to a tunnel.
    tunnel: tokio::sync::Notify,
    /// The forwarding header values of the connection's client, formatted
    /// on its first request.
    forwarding: std::sync::OnceLock<Forwarding>,
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("identity strings are visible ASCII")
}

impl ConnIdentity {
    /// Prepares the connection's identity.
    pub fn new(identity: Arc<AgentIdentity>, ctx: &IdentityContext) -> Self {
        let not_after = time::OffsetDateTime::from_unix_timestamp(identity.not_after())
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let mut headers = vec![
            (headers::TENANT_ID, hv(&identity.tenant().to_string())),
            (headers::AGENT_ID, hv(&identity.agent().to_string())),
            (headers::CERT_SERIAL, hv(&identity.serial().to_string())),
            (headers::CERT_NOT_AFTER, hv(&not_after)),
            (headers::SPIFFE_ID, hv(&identity.uri().to_string())),
        ];
        if let Some(by) = &ctx.xfcc_by {
            headers.push((
                headers::XFCC,
                hv(&xfcc_element(
                    by,
                    &identity.fingerprint().to_string(),
                    &identity.uri().to_string(),
                )),
            ));
        }
        Self {
            cert_key: ctx.keys.cert_status(&identity.tenant(), &identity.serial()),
            agent_key: ctx.keys.agent_status(&identity.tenant(), &identity.agent()),
            identity,
            headers,
            assertion: ArcSwapOption::empty(),
            tunnel: tokio::sync::Notify::new(),
            forwarding: std::sync::OnceLock::new(),
        }
    }

    /// Marks the connection a tunnel (the upstream answered 101): wakes
    /// [`Self::await_tunnel`], now or when it is next awaited.
    pub fn tunnel_opened(&self) {
        self.tunnel.notify_one();
    }

    /// The forwarding header values for `client`, the connection's client
    /// address: formatted once (a connection has one client; a different
    /// address, which cannot happen, is formatted afresh).
    pub fn forwarding(&self, client: IpAddr) -> std::borrow::Cow<'_, Forwarding> {
        let f = self.forwarding.get_or_init(|| Forwarding::new(client));
        if f.client() == client {
            std::borrow::Cow::Borrowed(f)
        } else {
            std::borrow::Cow::Owned(Forwarding::new(client))
        }
    }

    /// Resolves once the connection became a tunnel.
    pub async fn await_tunnel(&self) {
        self.tunnel.notified().await;
    }

    /// The verified identity.
    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    /// The identity headers other than the assertion, in injection order.
    pub fn headers(&self) -> &[(&'static str, HeaderValue)] {
        &self.headers
    }

    /// The Redis keys of the certificate and agent status.
    pub fn redis_keys(&self) -> [&str; 2] {
        [&self.cert_key, &self.agent_key]
    }

    /// A current signed assertion for `route` (re-signed shortly before
    /// expiry, for another route, or after a signing key change).
    pub fn assertion(&self, service: &AssertionService, route: &Route, now: i64) -> HeaderValue {
        let current = self.assertion.load();
        if let Some(a) = current.as_ref() {
            if now < a.refresh_at && a.route == route.index && a.generation == service.generation()
            {
                return a.value.clone();
            }
        }
        let fresh = service.get(&self.identity, route.index, &route.audience, now);
        let value = fresh.value.clone();
        self.assertion.store(Some(fresh));
        value
    }
}

/// The gateway's own forwarding header values for one client address:
/// `x-forwarded-for` and `x-real-ip` (the bare address) and RFC 7239
/// `forwarded: for=...` (IPv6 quoted and bracketed). Formatted once per
/// connection ([`ConnIdentity::forwarding`]); set by
/// [`crate::headers::set_forwarding`]; cloning a value is a
/// reference count.
#[derive(Debug, Clone)]
pub struct Forwarding {
    client: IpAddr,
    address: HeaderValue,
    forwarded: HeaderValue,
}

impl Forwarding {
    /// The values for `client`.
    pub fn new(client: IpAddr) -> Self {
        let ip = client.to_string();
        let forwarded = match client {
            IpAddr::V4(_) => format!("for={ip}"),
            IpAddr::V6(_) => format!("for=\"[{ip}]\""),
        };
        Self {
            client,
            address: hv(&ip),
            forwarded: hv(&forwarded),
        }
    }

    /// `x-forwarded-for` and `x-real-ip`: the bare address.
    pub fn address(&self) -> &HeaderValue {
        &self.address
    }

    /// `forwarded`: `for=` the address.
    pub fn forwarded(&self) -> &HeaderValue {
        &self.forwarded
    }

    /// The client address the values name.
    pub fn client(&self) -> IpAddr {
        self.client
    }
}

/// An Envoy `x-forwarded-client-cert` element: `By=..;Hash=..;URI=..`.
pub fn xfcc_element(by: &str, hash_hex: &str, uri: &str) -> String {
    format!("By={by};Hash={hash_hex};URI={uri}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::AssertionSigner;

    #[test]
    fn header_values_are_prepared_once_with_optional_xfcc() {
        let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
        let id = Arc::new(AgentIdentity::from_chain(&leaf.cert_der, &ca.cert_der).unwrap());
        let (signer, _) = AssertionSigner::generate("k").unwrap();
        let assertions = Arc::new(AssertionService::new(
            signer,
            &crate::config::AssertionConfig::default(),
        ));
        let ctx = IdentityContext {
            keys: KeySchema::new("p:"),
            assertions: assertions.clone(),
            xfcc_by: Some("spiffe://oneprotect.test/gateway".into()),
        };
        let conn = ConnIdentity::new(id.clone(), &ctx);
        let names: Vec<&str> = conn.headers().iter().map(|(n, _)| *n).collect();
        assert_eq!(&names[..5], &headers::INJECTED[..5]);
        let xfcc = conn.headers()[5].1.to_str().unwrap().to_owned();
        assert_eq!(
            xfcc,
            format!(
                "By=spiffe://oneprotect.test/gateway;Hash={};URI={}",
                id.fingerprint(),
                id.uri()
            )
        );
        assert_eq!(conn.redis_keys()[0], format!("p:cert:{}", id.serial()));
        // Signed once per route, then reused until shortly before expiry.
        let route = |prefix: &str, index: u32| {
            let mut rc: crate::config::RouteConfig = toml::from_str(&format!(
                "prefix = \"{prefix}\"\nupstreams = [\"127.0.0.1:1\"]\nhealth_check_secs = 0"
            ))
            .unwrap();
            rc.name = Some(prefix.trim_start_matches('/').to_owned());
            crate::routes::Route::new(&rc, index, Default::default()).unwrap()
        };
        let (api, ws) = (route("/api", 0), route("/ws", 1));
        let a = conn.assertion(&assertions, &api, 1_000);
        assert_eq!(conn.assertion(&assertions, &api, 1_030), a);
        assert_ne!(conn.assertion(&assertions, &api, 1_041), a);
        let claims = |v: &HeaderValue| {
            oneprotect_identity::AssertionVerifier::new("ws")
                .add_key("k", assertions.public_key())
                .verify(v.to_str().unwrap(), 1_045)
        };
        let for_ws = conn.assertion(&assertions, &ws, 1_045);
        assert_eq!(claims(&for_ws).unwrap().claims.aud, "ws");
        let for_api = conn.assertion(&assertions, &api, 1_045);
        assert_eq!(
            claims(&for_api),
            Err(oneprotect_identity::AssertionError::WrongAudience)
        );
        // Forwarding values: formatted on first use, then the same ones.
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let first = conn.forwarding(ip);
        assert!(matches!(first, std::borrow::Cow::Borrowed(_)));
        assert_eq!(first.address(), "192.0.2.7");
        assert!(std::ptr::eq(&*first, &*conn.forwarding(ip)));
        let other = conn.forwarding("2001:db8::1".parse().unwrap());
        assert_eq!(other.forwarded(), "for=\"[2001:db8::1]\"");
    }
}
