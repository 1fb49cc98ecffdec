//! Checking one request's identity: the assertion's signature (by a key of
//! the published set), issuer, audience, lifetime, `exp`/`iat` with bounded
//! skew, and that the identity headers the request carries are the ones the
//! assertion binds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderMap;
use oneprotect_identity::assertion::DEFAULT_ISSUER;
use oneprotect_identity::problem::{self, Problem};
use oneprotect_identity::{
    headers, AgentId, AgentUri, AssertionError, AssertionVerifier, CertFingerprint, JwkSet,
    SerialNumber, TenantId,
};
use time::format_description::well_known::Rfc3339;

use crate::jwks::{JwksError, JwksSource};

/// The verified identity of the agent behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAgent {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The agent.
    pub agent_id: AgentId,
    /// The agent's SPIFFE ID.
    pub spiffe_id: AgentUri,
    /// The client certificate's serial.
    pub serial: SerialNumber,
    /// The client certificate's NotAfter, unix seconds.
    pub not_after: i64,
    /// The client certificate's SHA-256 fingerprint.
    pub cert_sha256: CertFingerprint,
    /// The key id that signed the assertion.
    pub kid: String,
    /// When the assertion expires, unix seconds.
    pub assertion_expires_at: i64,
}

/// Why a request's identity was refused. Every refusal is a 401
/// `identity_required` problem, except [`Refusal::NoLayer`] (a 500: the
/// service was built without [`crate::VerifyLayer`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `x-oneprotect-identity-assertion` header, or more than one.
    #[error("the request carries no single identity assertion")]
    Missing,
    /// The assertion does not verify.
    #[error("{0}")]
    Assertion(#[from] AssertionError),
    /// An identity header is missing, repeated, or differs from the claim
    /// the assertion makes.
    #[error("identity header {0} does not match the assertion")]
    HeaderMismatch(&'static str),
    /// The extractor ran on a route without the verifying layer.
    #[error("the identity verifier is not installed on this route")]
    NoLayer,
}

impl Refusal {
    /// The problem document this refusal answers with.
    pub fn problem(&self) -> Problem {
        match self {
            Refusal::NoLayer => Problem::new(problem::INTERNAL, None),
            other => Problem::new(problem::IDENTITY_REQUIRED, Some(other.to_string())),
        }
    }
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        let p = self.problem();
        let status =
            http::StatusCode::from_u16(p.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(http::header::CONTENT_TYPE, problem::CONTENT_TYPE)],
            p.to_json(),
        )
            .into_response()
    }
}

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The `iss` to require. Defaults to `oneprotect-gateway`.
    pub issuer: String,
    /// How long one JWKS fetch may take. Defaults to 5 s.
    pub fetch_timeout: Duration,
    /// The least time between two fetches caused by unknown key ids, so
    /// that requests naming random key ids cannot make the verifier hammer
    /// the key server. Defaults to 1 s. A request with an unknown key id
    /// waits for the next allowed fetch rather than being refused early.
    pub min_refetch: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ISSUER.into(),
            fetch_timeout: Duration::from_secs(5),
            min_refetch: Duration::from_secs(1),
        }
    }
}

/// Verifies requests' identity assertions against the published keys.
/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Verifier(Arc<Inner>);

struct Inner {
    keys: ArcSwap<AssertionVerifier>,
    source: Option<JwksSource>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
    fetches: AtomicU64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("audience", &self.0.keys.load().audience())
            .field("source", &self.0.source)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `audience` whose keys come from `jwks_url` (the
    /// enroll-api's `/.well-known/jwks.json`). Fetches once now and fails
    /// when that fetch fails: an upstream that cannot know the keys must
    /// not start accepting requests. `ca_file` verifies an https server.
    pub async fn from_jwks_url(
        jwks_url: &str,
        ca_file: Option<&std::path::Path>,
        audience: &str,
        options: Options,
    ) -> Result<Self, JwksError> {
        let source = JwksSource::new(jwks_url, ca_file, options.fetch_timeout)?;
        let set = source.fetch().await?;
        let keys = template(audience, &options.issuer)
            .add_jwks(&set)
            .map_err(|source| JwksError::Document {
                url: jwks_url.to_owned(),
                source,
            })?;
        Ok(Self(Arc::new(Inner {
            keys: ArcSwap::from_pointee(keys),
            source: Some(source),
            last_fetch: tokio::sync::Mutex::new(Some(Instant::now())),
            min_refetch: options.min_refetch,
            fetches: AtomicU64::new(1),
        })))
    }

    /// A verifier over a fixed key set (no fetching).
    pub fn with_keys(
        set: &JwkSet,
        audience: &str,
        options: Options,
    ) -> Result<Self, oneprotect_identity::JwkError> {
        let keys = template(audience, &options.issuer).add_jwks(set)?;
        Ok(Self(Arc::new(Inner {
            keys: ArcSwap::from_pointee(keys),
            source: None,
            last_fetch: tokio::sync::Mutex::new(None),
            min_refetch: options.min_refetch,
            fetches: AtomicU64::new(0),
        })))
    }

    /// How many times the key set was fetched (the first one included).
    pub fn fetches(&self) -> u64 {
        self.0.fetches.load(Ordering::Relaxed)
    }

    /// Fetches the key set again and uses it from now on. On failure the
    /// keys in use stay.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let mut last = self.0.last_fetch.lock().await;
        self.fetch_locked(&mut last).await
    }

    async fn fetch_locked(&self, last: &mut Option<Instant>) -> Result<(), JwksError> {
        let Some(source) = &self.0.source else {
            return Ok(());
        };
        *last = Some(Instant::now());
        self.0.fetches.fetch_add(1, Ordering::Relaxed);
        let set = source.fetch().await?;
        let keys = set
            .ed25519_keys()
            .map_err(|source_err| JwksError::Document {
                url: source.url().to_owned(),
                source: source_err,
            })?;
        let mut next = AssertionVerifier::clone(&self.0.keys.load());
        next.set_keys(keys);
        self.0.keys.store(Arc::new(next));
        Ok(())
    }

    /// Refreshes the key set every `every` in the background (keys that
    /// were retired disappear; new ones are also fetched at once on first
    /// use). The task ends when every clone of the verifier is dropped.
    pub fn spawn_refresh(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = Verifier(inner).refresh().await {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys in use");
                }
            }
        })
    }

    /// Verifies the identity of a request from its headers, at the current
    /// time.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<VerifiedAgent, Refusal> {
        self.verify_at(headers, unix_now()).await
    }

    /// [`Self::verify`] at `now` (unix seconds).
    pub async fn verify_at(&self, headers: &HeaderMap, now: i64) -> Result<VerifiedAgent, Refusal> {
        let token = single(headers, headers::IDENTITY_ASSERTION).ok_or(Refusal::Missing)?;
        let verified = match self.0.keys.load().verify(token, now) {
            Err(AssertionError::UnknownKey) if self.0.source.is_some() => {
                self.refetch_for_unknown_key(token, now).await?
            }
            other => other?,
        };
        let c = verified.claims;
        bind(headers, headers::TENANT_ID, &c.tenant_id.to_string())?;
        bind(headers, headers::AGENT_ID, &c.agent_id.to_string())?;
        bind(headers, headers::CERT_SERIAL, &c.serial.to_string())?;
        bind(headers, headers::SPIFFE_ID, &c.sub.to_string())?;
        let not_after = single(headers, headers::CERT_NOT_AFTER)
            .and_then(|v| time::OffsetDateTime::parse(v, &Rfc3339).ok())
            .map(|t| t.unix_timestamp());
        if not_after != Some(c.cert_not_after) {
            return Err(Refusal::HeaderMismatch(headers::CERT_NOT_AFTER));
        }
        Ok(VerifiedAgent {
            tenant_id: c.tenant_id,
            agent_id: c.agent_id,
            spiffe_id: c.sub,
            serial: c.serial,
            not_after: c.cert_not_after,
            cert_sha256: c.cert_sha256,
            kid: verified.kid,
            assertion_expires_at: c.exp,
        })
    }

    /// A key id nobody knew: fetch the set again (at most once per
    /// `min_refetch`; a caller inside that window waits for it) unless
    /// another request already brought the key in.
    async fn refetch_for_unknown_key(
        &self,
        token: &str,
        now: i64,
    ) -> Result<oneprotect_identity::VerifiedAssertion, AssertionError> {
        let arrived = Instant::now();
        let mut last = self.0.last_fetch.lock().await;
        match self.0.keys.load().verify(token, now) {
            Err(AssertionError::UnknownKey) => {}
            other => return other,
        }
        // Requests that queued behind a fetch started after they arrived
        // take its answer: a burst of unknown key ids costs one fetch.
        if last.is_some_and(|at| at >= arrived) {
            drop(last);
            return self.0.keys.load().verify(token, now);
        }
        if let Some(at) = *last {
            let wait = self.0.min_refetch.saturating_sub(at.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if let Err(e) = self.fetch_locked(&mut last).await {
            tracing::warn!(error = %e, "JWKS fetch for an unknown key id failed");
        }
        drop(last);
        self.0.keys.load().verify(token, now)
    }
}

fn template(audience: &str, issuer: &str) -> AssertionVerifier {
    AssertionVerifier::new(audience).with_issuer(issuer)
}

/// The one value of header `name`, as text.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok(),
        _ => None,
    }
}

fn bind(headers: &HeaderMap, name: &'static str, claim: &str) -> Result<(), Refusal> {
    if single(headers, name) == Some(claim) {
        Ok(())
    } else {
        Err(Refusal::HeaderMismatch(name))
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use oneprotect_identity::{AssertionClaims, AssertionSigner, Jwk};

    const NOW: i64 = 1_800_000_000;

    fn claims(aud: &str) -> AssertionClaims {
        let sub: AgentUri = format!(
            "spiffe://oneprotect.test/tenant/{}/agent/{}",
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4()
        )
        .parse()
        .unwrap();
        AssertionClaims {
            iss: DEFAULT_ISSUER.into(),
            tenant_id: sub.tenant(),
            agent_id: sub.agent(),
            sub,
            aud: aud.into(),
            iat: NOW,
            exp: NOW + 60,
            serial: "0a1b2c".parse().unwrap(),
            cert_sha256: CertFingerprint::of_der(b"cert"),
            cert_not_after: NOW + 86_400,
        }
    }

    /// The headers the gateway sends with an assertion of `c`.
    fn headers(signer: &AssertionSigner, c: &AssertionClaims) -> HeaderMap {
        let mut h = HeaderMap::new();
        let not_after = time::OffsetDateTime::from_unix_timestamp(c.cert_not_after)
            .unwrap()
            .format(&Rfc3339)
            .unwrap();
        for (name, value) in [
            (headers::TENANT_ID, c.tenant_id.to_string()),
            (headers::AGENT_ID, c.agent_id.to_string()),
            (headers::CERT_SERIAL, c.serial.to_string()),
            (headers::CERT_NOT_AFTER, not_after),
            (headers::SPIFFE_ID, c.sub.to_string()),
            (headers::IDENTITY_ASSERTION, signer.sign(c)),
        ] {
            h.insert(name, HeaderValue::from_str(&value).unwrap());
        }
        h
    }

    fn set(signers: &[&AssertionSigner]) -> JwkSet {
        JwkSet {
            keys: signers
                .iter()
                .map(|s| Jwk::ed25519(s.kid(), &s.public_key()))
                .collect(),
        }
    }

    #[tokio::test]
    async fn accepts_a_bound_assertion_and_refuses_every_mismatch() {
        let (signer, _) = AssertionSigner::generate("k1").unwrap();
        let v = Verifier::with_keys(&set(&[&signer]), "workers", Options::default()).unwrap();
        let c = claims("workers");
        let good = headers(&signer, &c);
        let agent = v.verify_at(&good, NOW + 1).await.unwrap();
        assert_eq!((agent.tenant_id, agent.agent_id), (c.tenant_id, c.agent_id));
        assert_eq!(agent.kid, "k1");
        assert_eq!(agent.not_after, c.cert_not_after);

        // Each bound header: changed, missing, or repeated.
        for name in [
            headers::TENANT_ID,
            headers::AGENT_ID,
            headers::CERT_SERIAL,
            headers::CERT_NOT_AFTER,
            headers::SPIFFE_ID,
        ] {
            let mut h = good.clone();
            h.insert(name, HeaderValue::from_static("0"));
            assert_eq!(
                v.verify_at(&h, NOW).await,
                Err(Refusal::HeaderMismatch(name))
            );
            h.remove(name);
            assert_eq!(
                v.verify_at(&h, NOW).await,
                Err(Refusal::HeaderMismatch(name))
            );
            let mut h = good.clone();
            let same = good.get(name).unwrap().clone();
            h.append(name, same);
            assert_eq!(
                v.verify_at(&h, NOW).await,
                Err(Refusal::HeaderMismatch(name))
            );
        }
        let mut h = good.clone();
        h.remove(headers::IDENTITY_ASSERTION);
        assert_eq!(v.verify_at(&h, NOW).await, Err(Refusal::Missing));

        // Another route's audience, expired, a key nobody published.
        let other = headers(&signer, &claims("billing"));
        assert_eq!(
            v.verify_at(&other, NOW).await,
            Err(Refusal::Assertion(AssertionError::WrongAudience))
        );
        assert_eq!(
            v.verify_at(&good, NOW + 66).await,
            Err(Refusal::Assertion(AssertionError::Expired))
        );
        let (stranger, _) = AssertionSigner::generate("k2").unwrap();
        assert_eq!(
            v.verify_at(&headers(&stranger, &c), NOW).await,
            Err(Refusal::Assertion(AssertionError::UnknownKey))
        );
        let p = Refusal::Missing.problem();
        assert_eq!((p.status, p.code.as_str()), (401, "identity_required"));
    }

    /// A JWKS server on loopback whose set the test changes.
    async fn jwks_server(
        served: Arc<std::sync::Mutex<JwkSet>>,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let served = served.clone();
                async move { serde_json::to_string(&*served.lock().unwrap()).unwrap() }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, task)
    }

    #[tokio::test]
    async fn fetches_again_for_a_new_key_but_not_for_every_unknown_one() {
        let (old, _) = AssertionSigner::generate("old").unwrap();
        let (new, _) = AssertionSigner::generate("new").unwrap();
        let served = Arc::new(std::sync::Mutex::new(set(&[&old])));
        let (addr, server) = jwks_server(served.clone()).await;
        let url = format!("http://{addr}/.well-known/jwks.json");
        let options = Options {
            min_refetch: Duration::from_millis(50),
            ..Options::default()
        };
        let v = Verifier::from_jwks_url(&url, None, "workers", options)
            .await
            .unwrap();
        assert_eq!(v.fetches(), 1);
        let now = unix_now();
        let mut c = claims("workers");
        (c.iat, c.exp) = (now, now + 60);
        assert!(v.verify(&headers(&old, &c)).await.is_ok());
        assert_eq!(v.fetches(), 1, "a known key needs no fetch");

        // The rotation: the new key is published, then used.
        *served.lock().unwrap() = set(&[&old, &new]);
        let agent = v.verify(&headers(&new, &c)).await.unwrap();
        assert_eq!(agent.kid, "new");
        assert_eq!(v.fetches(), 2);

        // Key ids nobody publishes: refused, with at most one fetch per
        // min_refetch however many arrive (a burst shares one).
        let before = v.fetches();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (stranger, _) = AssertionSigner::generate(format!("x{i}")).unwrap();
            let h = headers(&stranger, &c);
            let v = v.clone();
            tasks.push(tokio::spawn(async move { v.verify(&h).await }));
        }
        for t in tasks {
            assert_eq!(
                t.await.unwrap(),
                Err(Refusal::Assertion(AssertionError::UnknownKey))
            );
        }
        let fetched = v.fetches() - before;
        let windows = started.elapsed().as_millis() as u64 / 50 + 1;
        assert!(fetched <= windows, "{fetched} fetches in {windows} windows");

        // The server gone: the keys in use stay.
        server.abort();
        let _ = server.await;
        assert!(v.refresh().await.is_err());
        assert!(v.verify(&headers(&old, &c)).await.is_ok());

        // And a verifier cannot start without its keys.
        assert!(
            Verifier::from_jwks_url(&url, None, "workers", Options::default())
                .await
                .is_err()
        );
    }
}
