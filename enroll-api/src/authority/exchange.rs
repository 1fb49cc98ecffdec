//! The token + CSR exchange: the one unauthenticated write.
//!
//! Order of checks: rate limit by source address; free text and CSR size;
//! token shape; token and tenant look-up by keyed hash (the pre-tenant
//! narrow path; [`TokenCache`] for a second); rate limit by token id; token
//! state (never refused on a cached row); CSR policy and proof of possession;
//! then the leaf is signed outside any transaction, and one transaction
//! consumes a use and writes agent, certificate and event. If the consume
//! loses (a concurrent exchange took the last use), the signed leaf is
//! dropped unseen.
//!
//! Every token failure — malformed, unknown, expired, used up, revoked — is
//! the one [`ExchangeError::InvalidToken`]; the tenant's audit (outbox)
//! records which, when the token is known.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, EnrollmentFailure, Event, Payload};
use oneprotect_identity::{AgentId, AgentStatus, TenantId, TokenId, TokenSecret};

use super::{leaf_lifetime, new_certificate};
use crate::ca::{check_csr, CaError, CsrError, IssuedLeaf};
use crate::http::Inner;
use crate::store::{
    AgentRecord, EnrollOutcome, Enrollment, Store, StoreError, Tenant, TokenRecord,
};
use crate::text::{self, TextError};
use crate::token::{self, TokenRefusal};

/// How long [`TokenCache`] reuses a token's row for the pre-checks.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(1);
/// Most tokens [`TokenCache`] holds; when full it starts over.
const TOKEN_CACHE_MAX: usize = 4096;

/// The pre-checks' reads of recently used tokens, by keyed hash, for
/// [`TOKEN_CACHE_TTL`]: a fleet's agents share one token, and the read would
/// otherwise cost every exchange a round trip to the store.
///
/// A cached row can only be more permissive than the store's (uses only
/// grow, revocation is final, the expiry never changes), and the write's
/// conditional `UPDATE` decides, so a stale row never lets an exchange
/// through that the store refuses: at worst a leaf is signed and dropped.
/// A refusal is never decided on a cached row: the row is read again
/// first, and a refused token is forgotten. Unknown hashes are not cached.
#[derive(Default)]
pub struct TokenCache(std::sync::Mutex<std::collections::HashMap<Vec<u8>, CachedToken>>);

// The entries (keyed hashes, token rows) stay out of debug output.
impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("TokenCache").field("tokens", &n).finish()
    }
}

#[derive(Debug)]
struct CachedToken {
    read_at: Instant,
    token: TokenRecord,
    tenant: Option<Tenant>,
}

impl TokenCache {
    fn get(&self, hash: &[u8], now: Instant) -> Option<(TokenRecord, Option<Tenant>)> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(hash)
            .filter(|c| now.saturating_duration_since(c.read_at) < TOKEN_CACHE_TTL)
            .map(|c| (c.token.clone(), c.tenant.clone()))
    }

    fn put(&self, hash: &[u8], token: &TokenRecord, tenant: &Option<Tenant>, now: Instant) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= TOKEN_CACHE_MAX && !map.contains_key(hash) {
            map.clear();
        }
        map.insert(
            hash.to_vec(),
            CachedToken {
                read_at: now,
                token: token.clone(),
                tenant: tenant.clone(),
            },
        );
    }

    fn forget(&self, hash: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(hash);
    }
}

/// Why the token with keyed hash `hash` is refused at `now`, from the store
/// (the cached row is forgotten): a refusal is never decided on a cached
/// row, which may be older than a revocation.
async fn current_refusal(
    state: &Inner,
    hash: &[u8],
    now: OffsetDateTime,
) -> Result<Option<TokenRefusal>, StoreError> {
    state.token_cache.forget(hash);
    let fresh = state.store.fetch_token_by_hash(hash).await?;
    Ok(TokenRefusal::of(fresh.as_ref().map(|(t, _)| t), now))
}

/// What the agent sends.
#[derive(Debug)]
pub struct ExchangeRequest<'a> {
    /// The enrollment token (redacting).
    pub token: &'a TokenSecret,
    /// The CSR, PEM.
    pub csr_pem: &'a str,
    /// The agent's reported hostname.
    pub hostname: &'a str,
    /// Its operating system.
    pub os: &'a str,
    /// Its version.
    pub agent_version: &'a str,
    /// The client's address, when served over a socket (behind a trusted
    /// gateway, the address it forwarded).
    pub client: Option<IpAddr>,
}

/// A new agent and its first certificate.
#[derive(Debug)]
pub struct Enrolled {
    /// The agent's tenant.
    pub tenant: TenantId,
    /// The new agent.
    pub agent: AgentId,
    /// Its certificate.
    pub leaf: IssuedLeaf,
}

/// Why an exchange was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Too many exchanges from this address or with this token; retry after.
    #[error("rate limited")]
    RateLimited(Duration),
    /// A free-text field of the agent breaks [`crate::text`]'s rule.
    #[error(transparent)]
    InvalidText(#[from] TextError),
    /// The CSR is longer than [`crate::ca::MAX_CSR_PEM_LEN`].
    #[error("CSR too large")]
    CsrTooLarge,
    /// The token is malformed, unknown, expired, used up or revoked (one
    /// answer for all).
    #[error("invalid token")]
    InvalidToken,
    /// The CSR was refused.
    #[error("CSR refused")]
    Csr(#[source] CsrError),
    /// The token's tenant is not in the store (a broken store).
    #[error("tenant {0} of a token is missing")]
    TenantMissing(TenantId),
    /// The CA could not sign the leaf.
    #[error("issuing the leaf failed")]
    Issue(#[source] CaError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn csr_failure(e: &CsrError) -> EnrollmentFailure {
    match e {
        CsrError::Malformed => EnrollmentFailure::CsrInvalid,
        CsrError::SignatureInvalid => EnrollmentFailure::CsrSignatureInvalid,
        CsrError::UnsupportedKey | CsrError::WeakKey(_) => EnrollmentFailure::KeyRejected,
    }
}

/// Writes `agent.enrollment.failed`; the answer does not depend on it.
async fn record_failure(
    state: &Inner,
    tenant: TenantId,
    token_id: TokenId,
    reason: EnrollmentFailure,
    now: OffsetDateTime,
) {
    let event = Event::new(
        tenant,
        Actor::EnrollmentToken(token_id),
        now,
        Payload::EnrollmentFailed {
            token_id,
            reason_code: reason,
        },
    );
    if let Err(e) = state.store.create_event(&event).await {
        tracing::warn!(error = %e, %tenant, %token_id, "could not record failed enrollment");
    }
}

/// Records a token refusal (when the token is known) and answers it.
async fn refuse_token(
    state: &Inner,
    tenant: TenantId,
    token_id: TokenId,
    refusal: TokenRefusal,
    now: OffsetDateTime,
) -> ExchangeError {
    if let Some(reason) = refusal.failure() {
        record_failure(state, tenant, token_id, reason, now).await;
    }
    ExchangeError::InvalidToken
}

/// Runs the exchange: on success the agent, its certificate and
/// `agent.enrolled` are committed.
pub async fn exchange(state: &Inner, req: ExchangeRequest<'_>) -> Result<Enrolled, ExchangeError> {
    let started = Instant::now();
    if let Some(client) = req.client {
        state
            .per_address
            .check(&client.to_string(), started)
            .map_err(|wait| {
                tracing::info!(%client, "exchange refused: rate limited by address");
                ExchangeError::RateLimited(wait)
            })?;
    }
    text::check("agent.hostname", req.hostname, 1, 253)?;
    text::check("agent.os", req.os, 1, 64)?;
    text::check("agent.agent_version", req.agent_version, 1, 64)?;
    if req.csr_pem.len() > crate::ca::MAX_CSR_PEM_LEN {
        return Err(ExchangeError::CsrTooLarge);
    }

    let secret = req.token.expose_secret();
    if !token::well_formed(secret) {
        tracing::info!("exchange refused: malformed token");
        return Err(ExchangeError::InvalidToken);
    }
    let token_hash = state.pepper.hash(secret);
    // The token and its tenant in one read (or from the cache): a pre-check
    // for a precise audit reason and to spare the CA work; the conditional
    // update of the write is what decides.
    let cached = state.token_cache.get(&token_hash, started);
    let from_cache = cached.is_some();
    let looked_up = match cached {
        Some(hit) => Some(hit),
        None => {
            let found = state.store.fetch_token_by_hash(&token_hash).await?;
            if let Some((token, tenant)) = &found {
                state.token_cache.put(&token_hash, token, tenant, started);
            }
            found
        }
    };
    let Some((found, tenant_record)) = looked_up else {
        tracing::info!("exchange refused: unknown token");
        return Err(ExchangeError::InvalidToken);
    };
    let (token_id, tenant) = (found.id, found.tenant_id);
    state
        .per_token
        .check(&token_id.to_string(), started)
        .map_err(ExchangeError::RateLimited)?;

    let now = state.clock.now();
    let refusal = match TokenRefusal::of(Some(&found), now) {
        Some(_) if from_cache => current_refusal(state, &token_hash, now).await?,
        refusal => refusal,
    };
    if let Some(refusal) = refusal {
        state.token_cache.forget(&token_hash);
        tracing::info!(%tenant, %token_id, ?refusal, "exchange refused: token not usable");
        return Err(refuse_token(state, tenant, token_id, refusal, now).await);
    }

    let csr = match check_csr(req.csr_pem) {
        Ok(csr) => csr,
        Err(e) => {
            // The token's state answers first (the documented order): a
            // cached row may be older than a revocation.
            if from_cache {
                if let Some(refusal) = current_refusal(state, &token_hash, now).await? {
                    tracing::info!(%tenant, %token_id, ?refusal, "exchange refused: token not usable");
                    return Err(refuse_token(state, tenant, token_id, refusal, now).await);
                }
            }
            record_failure(state, tenant, token_id, csr_failure(&e), now).await;
            tracing::info!(%tenant, %token_id, error = %e, "exchange refused: CSR");
            return Err(ExchangeError::Csr(e));
        }
    };

    let lifetime = tenant_record
        .as_ref()
        .map(leaf_lifetime)
        .ok_or(ExchangeError::TenantMissing(tenant))?;
    let agent_id = AgentId::random();
    let leaf = state
        .ca
        .issue_leaf(tenant, agent_id, &csr, lifetime)
        .map_err(ExchangeError::Issue)?;

    let agent = AgentRecord {
        id: agent_id,
        tenant_id: tenant,
        spiffe_id: leaf.uri.to_string(),
        status: AgentStatus::Active,
        hostname: req.hostname.to_owned(),
        os: req.os.to_owned(),
        agent_version: req.agent_version.to_owned(),
        token_id,
        enrolled_at: now,
        current_serial: leaf.serial,
        certificate_not_after: leaf.not_after,
        revoked_at: None,
        revocation_reason: None,
        previous_serial: None,
        previous_valid_until: None,
    };
    let event = Event::new(
        tenant,
        Actor::EnrollmentToken(token_id),
        now,
        Payload::Enrolled {
            agent_id,
            token_id,
            spiffe_id: leaf.uri.clone(),
            serial: leaf.serial,
            not_after: leaf.not_after,
            hostname: agent.hostname.clone(),
            os: agent.os.clone(),
            agent_version: agent.agent_version.clone(),
        },
    );
    let enrollment = Enrollment {
        token_id,
        token_hash,
        agent,
        certificate: new_certificate(&leaf),
        event,
        now,
    };
    if let EnrollOutcome::Refused(refusal) = state.store.enroll(&enrollment).await? {
        state.token_cache.forget(&enrollment.token_hash);
        tracing::info!(%tenant, %token_id, ?refusal, "exchange refused: token consumed concurrently");
        return Err(refuse_token(state, tenant, token_id, refusal, now).await);
    }
    tracing::info!(%tenant, %token_id, agent = %agent_id, serial = %leaf.serial, "agent enrolled");
    Ok(Enrolled {
        tenant,
        agent: agent_id,
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TokenRecord {
        let now = OffsetDateTime::now_utc();
        TokenRecord {
            id: TokenId::random(),
            tenant_id: TenantId::random(),
            max_uses: 2,
            uses: 0,
            expires_at: now + time::Duration::hours(1),
            created_at: now,
            revoked_at: None,
            description: Some("fleet rollout".into()),
            labels: Default::default(),
        }
    }

    /// A row is reused within the TTL and not after it; forgetting drops
    /// it; debug output shows how many, never a hash or a row.
    #[test]
    fn the_token_cache_expires_forgets_and_keeps_entries_out_of_debug_output() {
        let cache = TokenCache::default();
        let (hash, token) = (b"keyed-hash-of-a-secret".to_vec(), record());
        let t0 = Instant::now();
        assert!(cache.get(&hash, t0).is_none());
        cache.put(&hash, &token, &None, t0);
        assert_eq!(cache.get(&hash, t0), Some((token, None)));
        assert!(
            cache.get(&hash, t0 + TOKEN_CACHE_TTL).is_none(),
            "outlived its TTL"
        );
        let shown = format!("{cache:?}");
        assert_eq!(shown, "TokenCache { tokens: 1 }");
        assert!(!shown.contains("fleet rollout") && !shown.contains("107"));
        cache.forget(&hash);
        assert!(cache.get(&hash, t0).is_none());
    }
}
