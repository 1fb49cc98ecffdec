//! The per-connection identity: everything derived from the verified client
//! certificate that requests need, computed once per connection.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use oneprotect_identity::{headers, AgentIdentity, KeySchema};
use time::format_description::well_known::Rfc3339;

use crate::assertion::{AssertionService, SignedAssertion};

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
            cert_key: ctx.keys.cert_status(&identity.serial()),
            agent_key: ctx.keys.agent_status(&identity.tenant(), &identity.agent()),
            identity,
            headers,
            assertion: ArcSwapOption::empty(),
        }
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

    /// A current signed assertion (re-signed shortly before expiry).
    pub fn assertion(&self, service: &AssertionService, now: i64) -> HeaderValue {
        let current = self.assertion.load();
        if let Some(a) = current.as_ref() {
            if now < a.refresh_at {
                return a.value.clone();
            }
        }
        let fresh = service.get(&self.identity, now);
        let value = fresh.value.clone();
        self.assertion.store(Some(fresh));
        value
    }
}

/// An Envoy `x-forwarded-client-cert` element: `By=..;Hash=..;URI=..`.
pub fn xfcc_element(by: &str, hash_hex: &str, uri: &str) -> String {
    format!("By={by};Hash={hash_hex};URI={uri}")
}
