//! The SPIFFE identity URIs carried in certificates' URI SAN.
//!
//! - agent leaf: `spiffe://<trust-domain>/tenant/<tenant_id>/agent/<agent_id>`
//! - tenant issuing CA: `spiffe://<trust-domain>/tenant/<tenant_id>`
//!
//! The parser is strict: exactly this shape, canonical UUIDs, a trust domain
//! of SPIFFE's allowed characters, and nothing else — no other scheme, no
//! userinfo, port, query, fragment, percent-encoding, empty or extra segment,
//! or trailing slash. One identity therefore has exactly one spelling.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{parse_canonical_uuid, AgentId, TenantId};

const SCHEME: &str = "spiffe://";
/// SPIFFE limits the trust domain name to 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE limits a whole SPIFFE ID to 2048 bytes.
const MAX_URI_LEN: usize = 2048;

/// Why an identity URI or trust domain did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The URI does not start with `spiffe://` (case-sensitive).
    #[error("identity URI must use the spiffe:// scheme")]
    WrongScheme,
    /// The trust domain is empty, too long, or has a character outside
    /// `[a-z0-9._-]` (this also refuses userinfo, ports and uppercase).
    #[error("invalid trust domain")]
    BadTrustDomain,
    /// The URI is longer than SPIFFE's 2048-byte limit.
    #[error("identity URI too long")]
    TooLong,
    /// The path is not `/tenant/<uuid>` (CA) or `/tenant/<uuid>/agent/<uuid>`
    /// (agent): a missing, extra, empty or misnamed segment, a trailing
    /// slash, a query or a fragment.
    #[error("identity URI path has the wrong shape")]
    BadPath,
    /// A tenant or agent segment is not a canonical lowercase UUID.
    #[error("identity URI segment is not a canonical UUID")]
    BadId,
    /// The URI names a different trust domain than the one expected.
    #[error("identity URI belongs to another trust domain")]
    ForeignTrustDomain,
}

/// A SPIFFE trust domain name, e.g. `oneprotect.local`.
///
/// Lowercase letters, digits, `.`, `-` and `_`; 1 to 255 bytes. Cheap to
/// clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TRUST_DOMAIN_LEN
            && s.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(UriError::BadTrustDomain)
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// Splits `spiffe://<td>/<path>` into the trust domain and the path segments
/// after the leading slash.
fn split_spiffe(s: &str) -> Result<(TrustDomain, std::str::Split<'_, char>), UriError> {
    if s.len() > MAX_URI_LEN {
        return Err(UriError::TooLong);
    }
    let rest = s.strip_prefix(SCHEME).ok_or(UriError::WrongScheme)?;
    let (td, path) = rest.split_once('/').ok_or(UriError::BadPath)?;
    let td: TrustDomain = td.parse()?;
    Ok((td, path.split('/')))
}

fn expect_segment(segments: &mut std::str::Split<'_, char>, literal: &str) -> Result<(), UriError> {
    match segments.next() {
        Some(s) if s == literal => Ok(()),
        _ => Err(UriError::BadPath),
    }
}

fn id_segment(segments: &mut std::str::Split<'_, char>) -> Result<uuid::Uuid, UriError> {
    let seg = segments.next().ok_or(UriError::BadPath)?;
    if seg.is_empty() || seg.contains(['?', '#']) {
        return Err(UriError::BadPath);
    }
    parse_canonical_uuid(seg).map_err(|_| UriError::BadId)
}

/// An agent's identity URI:
/// `spiffe://<trust-domain>/tenant/<tenant_id>/agent/<agent_id>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AgentUri {
    trust_domain: TrustDomain,
    tenant: TenantId,
    agent: AgentId,
}

impl AgentUri {
    /// Builds the URI for an agent of a tenant.
    pub fn new(trust_domain: TrustDomain, tenant: TenantId, agent: AgentId) -> Self {
        Self {
            trust_domain,
            tenant,
            agent,
        }
    }

    /// Parses `s` and requires it to belong to `expected` trust domain.
    pub fn parse_in(s: &str, expected: &TrustDomain) -> Result<Self, UriError> {
        let uri: Self = s.parse()?;
        if &uri.trust_domain != expected {
            return Err(UriError::ForeignTrustDomain);
        }
        Ok(uri)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The tenant the agent belongs to.
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The agent.
    pub fn agent(&self) -> AgentId {
        self.agent
    }

    /// The URI of the tenant CA that may issue this agent's certificate.
    pub fn tenant_ca(&self) -> TenantCaUri {
        TenantCaUri::new(self.trust_domain.clone(), self.tenant)
    }
}

impl FromStr for AgentUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        let (trust_domain, mut segs) = split_spiffe(s)?;
        expect_segment(&mut segs, "tenant")?;
        let tenant = TenantId::from_uuid(id_segment(&mut segs)?);
        expect_segment(&mut segs, "agent")?;
        let agent = AgentId::from_uuid(id_segment(&mut segs)?);
        if segs.next().is_some() {
            return Err(UriError::BadPath);
        }
        Ok(Self {
            trust_domain,
            tenant,
            agent,
        })
    }
}

impl fmt::Display for AgentUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/tenant/{}/agent/{}",
            self.trust_domain, self.tenant, self.agent
        )
    }
}

impl fmt::Debug for AgentUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentUri({self})")
    }
}

/// A tenant issuing CA's identity URI: `spiffe://<trust-domain>/tenant/<tenant_id>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TenantCaUri {
    trust_domain: TrustDomain,
    tenant: TenantId,
}

impl TenantCaUri {
    /// Builds the URI for a tenant's issuing CA.
    pub fn new(trust_domain: TrustDomain, tenant: TenantId) -> Self {
        Self {
            trust_domain,
            tenant,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The tenant.
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }
}

impl FromStr for TenantCaUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        let (trust_domain, mut segs) = split_spiffe(s)?;
        expect_segment(&mut segs, "tenant")?;
        let tenant = TenantId::from_uuid(id_segment(&mut segs)?);
        if segs.next().is_some() {
            return Err(UriError::BadPath);
        }
        Ok(Self {
            trust_domain,
            tenant,
        })
    }
}

impl fmt::Display for TenantCaUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/tenant/{}", self.trust_domain, self.tenant)
    }
}

impl fmt::Debug for TenantCaUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantCaUri({self})")
    }
}

macro_rules! string_serde {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(TrustDomain);
string_serde!(AgentUri);
string_serde!(TenantCaUri);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10";
    const A: &str = "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b";

    fn agent(s: &str) -> Result<AgentUri, UriError> {
        s.parse()
    }

    #[test]
    fn parses_canonical_agent_and_ca_uris() {
        let s = format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}");
        let uri = agent(&s).unwrap();
        assert_eq!(uri.tenant().to_string(), T);
        assert_eq!(uri.agent().to_string(), A);
        assert_eq!(uri.to_string(), s);
        let ca = uri.tenant_ca();
        assert_eq!(
            ca.to_string(),
            format!("spiffe://oneprotect.local/tenant/{T}")
        );
        assert_eq!(ca.to_string().parse::<TenantCaUri>().unwrap(), ca);
    }

    #[test]
    fn refuses_other_schemes() {
        for s in [
            format!("https://oneprotect.local/tenant/{T}/agent/{A}"),
            format!("SPIFFE://oneprotect.local/tenant/{T}/agent/{A}"),
            format!("spiffe:/oneprotect.local/tenant/{T}/agent/{A}"),
            format!("oneprotect.local/tenant/{T}/agent/{A}"),
        ] {
            assert_eq!(agent(&s), Err(UriError::WrongScheme), "{s}");
        }
    }

    #[test]
    fn refuses_missing_extra_and_empty_segments() {
        for s in [
            format!("spiffe://oneprotect.local/tenant/{T}"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}/extra"),
            format!("spiffe://oneprotect.local/tenant//agent/{A}"),
            format!("spiffe://oneprotect.local//tenant/{T}/agent/{A}"),
            format!("spiffe://oneprotect.local/tenants/{T}/agent/{A}"),
            format!("spiffe://oneprotect.local/agent/{A}/tenant/{T}"),
            "spiffe://oneprotect.local".to_string(),
        ] {
            assert_eq!(agent(&s), Err(UriError::BadPath), "{s}");
        }
    }

    #[test]
    fn refuses_trailing_slash() {
        let s = format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}/");
        assert_eq!(agent(&s), Err(UriError::BadPath));
        let s = format!("spiffe://oneprotect.local/tenant/{T}/");
        assert_eq!(s.parse::<TenantCaUri>(), Err(UriError::BadPath));
    }

    #[test]
    fn refuses_non_uuid_and_non_canonical_ids() {
        let upper = A.to_uppercase();
        for s in [
            format!("spiffe://oneprotect.local/tenant/acme/agent/{A}"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{upper}"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{{{A}}}"),
            format!(
                "spiffe://oneprotect.local/tenant/{T}/agent/{}",
                A.replace('-', "")
            ),
        ] {
            assert_eq!(agent(&s), Err(UriError::BadId), "{s}");
        }
    }

    #[test]
    fn refuses_percent_encoding() {
        let encoded = A.replacen('0', "%30", 1);
        let s = format!("spiffe://oneprotect.local/tenant/{T}/agent/{encoded}");
        assert_eq!(agent(&s), Err(UriError::BadId));
        let s = format!("spiffe://oneprotect%2elocal/tenant/{T}/agent/{A}");
        assert_eq!(agent(&s), Err(UriError::BadTrustDomain));
    }

    #[test]
    fn refuses_query_and_fragment() {
        for s in [
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}?x=1"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}#frag"),
            format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}?"),
        ] {
            assert_eq!(agent(&s), Err(UriError::BadPath), "{s}");
        }
    }

    #[test]
    fn refuses_userinfo_and_port() {
        for s in [
            format!("spiffe://user@oneprotect.local/tenant/{T}/agent/{A}"),
            format!("spiffe://oneprotect.local:8443/tenant/{T}/agent/{A}"),
            format!("spiffe://OneProtect.local/tenant/{T}/agent/{A}"),
            format!("spiffe:///tenant/{T}/agent/{A}"),
        ] {
            assert_eq!(agent(&s), Err(UriError::BadTrustDomain), "{s}");
        }
    }

    #[test]
    fn refuses_other_trust_domain() {
        let td: TrustDomain = "oneprotect.local".parse().unwrap();
        let s = format!("spiffe://evil.example/tenant/{T}/agent/{A}");
        assert_eq!(
            AgentUri::parse_in(&s, &td),
            Err(UriError::ForeignTrustDomain)
        );
        let s = format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}");
        assert!(AgentUri::parse_in(&s, &td).is_ok());
    }

    #[test]
    fn refuses_overlong_uri() {
        let td = "a".repeat(2100);
        let s = format!("spiffe://{td}/tenant/{T}/agent/{A}");
        assert_eq!(agent(&s), Err(UriError::TooLong));
    }

    #[test]
    fn ca_uri_refuses_agent_uri() {
        let s = format!("spiffe://oneprotect.local/tenant/{T}/agent/{A}");
        assert_eq!(s.parse::<TenantCaUri>(), Err(UriError::BadPath));
    }

    fn trust_domain() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,40}"
    }

    proptest! {
        #[test]
        fn agent_uri_round_trips(td in trust_domain(), t in any::<u128>(), a in any::<u128>()) {
            let uri = AgentUri::new(
                td.parse().unwrap(),
                TenantId::from_uuid(uuid::Uuid::from_u128(t)),
                AgentId::from_uuid(uuid::Uuid::from_u128(a)),
            );
            let text = uri.to_string();
            prop_assert_eq!(text.parse::<AgentUri>().unwrap(), uri);
        }

        /// Whatever string parses is exactly the canonical spelling of the
        /// identity it parses to: no second spelling of any identity exists.
        #[test]
        fn no_other_string_parses(s in "spiffe://[a-zA-Z0-9.:@%_-]{0,12}(/[a-zA-Z0-9%?#.-]{0,40}){0,5}/?") {
            if let Ok(uri) = s.parse::<AgentUri>() {
                prop_assert_eq!(uri.to_string(), s.clone());
            }
            if let Ok(uri) = s.parse::<TenantCaUri>() {
                prop_assert_eq!(uri.to_string(), s);
            }
        }

        /// Mutating one character of a valid URI never yields a different
        /// identity that still parses unless the mutation is itself canonical.
        #[test]
        fn single_char_mutations_stay_canonical(
            t in any::<u128>(), a in any::<u128>(), pos in 0usize..120, c in any::<char>()
        ) {
            let uri = AgentUri::new(
                "oneprotect.local".parse().unwrap(),
                TenantId::from_uuid(uuid::Uuid::from_u128(t)),
                AgentId::from_uuid(uuid::Uuid::from_u128(a)),
            );
            let mut chars: Vec<char> = uri.to_string().chars().collect();
            let pos = pos % chars.len();
            chars[pos] = c;
            let mutated: String = chars.into_iter().collect();
            if let Ok(parsed) = mutated.parse::<AgentUri>() {
                prop_assert_eq!(parsed.to_string(), mutated);
            }
        }
    }
}
