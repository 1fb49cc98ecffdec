//! Enrollment tokens: the secret's shape, a token's status at a time, and
//! why one is refused — the token concept in one place, used by the store,
//! the exchange and the token API.
//!
//! A token is `opet_` + 32 random bytes base64url ([`crate::secrets`] makes
//! and hashes them). Its status is decided in one order — revoked, used up,
//! expired, else active — here ([`TokenRecord::status`]) and, for listing
//! filters, in the SQL of `store/sql.rs`. Every refusal is the same answer
//! to the client (401 `invalid_token`); [`TokenRefusal`] is the precise
//! reason for the tenant's audit.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::events::EnrollmentFailure;
use oneprotect_identity::TokenSecret;

use crate::secrets::SecretError;
use crate::store::TokenRecord;

/// Prefix of an enrollment token secret.
pub const TOKEN_PREFIX: &str = "opet_";

/// A new enrollment token secret.
pub fn new_secret() -> Result<TokenSecret, SecretError> {
    crate::secrets::generate(TOKEN_PREFIX).map(TokenSecret::new)
}

/// Whether `s` has the shape of a token secret (cheap pre-check before
/// hashing and a database round trip).
pub fn well_formed(s: &str) -> bool {
    crate::secrets::well_formed(s, TOKEN_PREFIX)
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable.
    Active,
    /// Revoked by an admin.
    Revoked,
    /// Past its expiry time.
    Expired,
    /// Every use consumed.
    UsedUp,
}

impl TokenRecord {
    /// The status at `now`: revoked, then used up, then expired, else active.
    pub fn status(&self, now: OffsetDateTime) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.uses >= self.max_uses {
            TokenStatus::UsedUp
        } else if self.expires_at <= now {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// Why a token was not consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token (or the hash does not match).
    Unknown,
    /// Expired.
    Expired,
    /// No uses left.
    UsedUp,
    /// Revoked.
    Revoked,
}

impl TokenRefusal {
    /// Why `token` (as read at `now`; `None`: not found) cannot be used, or
    /// `None` when it is active. The exchange's pre-check and the store's
    /// answer to a lost consume both decide here.
    pub fn of(token: Option<&TokenRecord>, now: OffsetDateTime) -> Option<Self> {
        match token.map(|t| t.status(now)) {
            None => Some(Self::Unknown),
            Some(TokenStatus::Revoked) => Some(Self::Revoked),
            Some(TokenStatus::UsedUp) => Some(Self::UsedUp),
            Some(TokenStatus::Expired) => Some(Self::Expired),
            Some(TokenStatus::Active) => None,
        }
    }

    /// The audit reason of `agent.enrollment.failed`; `None` for an unknown
    /// token (there is no tenant to tell).
    pub fn failure(self) -> Option<EnrollmentFailure> {
        match self {
            Self::Unknown => None,
            Self::Expired => Some(EnrollmentFailure::TokenExpired),
            Self::UsedUp => Some(EnrollmentFailure::TokenUsedUp),
            Self::Revoked => Some(EnrollmentFailure::TokenRevoked),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use oneprotect_identity::{TenantId, TokenId};

    use super::*;

    fn record(uses: u32, expires_in: i64, revoked: bool) -> TokenRecord {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        TokenRecord {
            id: TokenId::random(),
            tenant_id: TenantId::random(),
            max_uses: 1,
            uses,
            expires_at: now + time::Duration::seconds(expires_in),
            created_at: now,
            revoked_at: revoked.then_some(now),
            description: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn refusal_follows_status_in_order() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let cases = [
            (None, Some(TokenRefusal::Unknown)),
            (Some(record(0, 60, false)), None),
            (Some(record(0, 0, false)), Some(TokenRefusal::Expired)),
            (Some(record(1, 0, false)), Some(TokenRefusal::UsedUp)),
            (Some(record(1, 0, true)), Some(TokenRefusal::Revoked)),
        ];
        for (t, want) in cases {
            assert_eq!(TokenRefusal::of(t.as_ref(), now), want, "{t:?}");
        }
        assert_eq!(TokenRefusal::Unknown.failure(), None);
        assert_eq!(
            TokenRefusal::Revoked.failure(),
            Some(EnrollmentFailure::TokenRevoked)
        );
    }

    #[test]
    fn secrets_have_the_token_shape() {
        let t = new_secret().unwrap();
        assert!(well_formed(t.expose_secret()));
        assert_eq!(t.expose_secret().len(), TOKEN_PREFIX.len() + 43);
        assert!(!well_formed("opet_short"));
    }
}
