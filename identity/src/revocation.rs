//! Revocation state as the gateway reads it, and the Redis key schema.
//!
//! The store (PostgreSQL or SQLite) is the source of truth. Redis holds a
//! projection that the enroll-api writes and gateways read:
//!
//! | key | value | written when |
//! |---|---|---|
//! | `{prefix}cert:{serial}` | [`CertStatus`] as text | issue, rotation, revocation; expires at NotAfter |
//! | `{prefix}agent:{tenant}:{agent}` | [`AgentStatus`] as text | enrollment, revocation |
//! | `{prefix}revocation:seq` | integer, `INCR`ed per announcement | every change |
//! | `{prefix}projection:built_at` | unix seconds of the last full rebuild | rebuild |
//! | `{prefix}revocation` (pub/sub channel) | [`Announcement`] as JSON | every change |
//! | `{prefix}events` (stream) | lifecycle events | outbox relay |
//!
//! No other crate spells a Redis key: they all call [`KeySchema`].
//!
//! A gateway accepts a certificate only when it can confirm both the
//! certificate and its agent are `active`. A missing key is *not* active: it
//! means "unknown", and the request fails closed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, SerialNumber, TenantId};

/// The default key prefix. Tests and shared Redis deployments set their own.
pub const DEFAULT_PREFIX: &str = "oneprotect:";

/// The status of one certificate, by serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertStatus {
    /// Issued and usable.
    Active,
    /// Revoked by an admin (with its agent, or on its own).
    Revoked,
    /// Replaced by a newer certificate of the same agent after rotation; a
    /// request made with it is refused (and may indicate key theft).
    Superseded,
}

/// The status of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Enrolled and not revoked.
    Active,
    /// Revoked: no certificate of this agent is accepted any more, and the
    /// identity can never enroll or rotate again.
    Revoked,
}

/// Why a status text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(String);

impl CertStatus {
    /// The text stored in Redis.
    pub const fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "active",
            CertStatus::Revoked => "revoked",
            CertStatus::Superseded => "superseded",
        }
    }
}

impl AgentStatus {
    /// The text stored in Redis.
    pub const fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Revoked => "revoked",
        }
    }
}

impl FromStr for CertStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        match s {
            "active" => Ok(CertStatus::Active),
            "revoked" => Ok(CertStatus::Revoked),
            "superseded" => Ok(CertStatus::Superseded),
            other => Err(UnknownStatus(other.chars().take(32).collect())),
        }
    }
}

impl FromStr for AgentStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, UnknownStatus> {
        match s {
            "active" => Ok(AgentStatus::Active),
            "revoked" => Ok(AgentStatus::Revoked),
            other => Err(UnknownStatus(other.chars().take(32).collect())),
        }
    }
}

impl fmt::Display for CertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a change announcement on the revocation channel says changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// One certificate's status changed.
    Cert {
        /// The certificate.
        serial: SerialNumber,
        /// Its new status.
        status: CertStatus,
    },
    /// One agent's status changed.
    Agent {
        /// The agent's tenant.
        tenant_id: TenantId,
        /// The agent.
        agent_id: AgentId,
        /// Its new status.
        status: AgentStatus,
    },
    /// The whole projection was rebuilt: subscribers drop every cached answer.
    Resync,
}

/// One message on the revocation pub/sub channel.
///
/// `seq` comes from `INCR {prefix}revocation:seq`, so it is one monotonically
/// increasing sequence across every enroll-api replica. A subscriber that
/// sees `seq` jump by more than one has missed a message and must distrust
/// its cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The sequence number of this announcement.
    pub seq: u64,
    /// What changed.
    #[serde(flatten)]
    pub change: Change,
}

/// A gateway's report that it refused a superseded certificate: one entry
/// of the `{prefix}reports` stream (field `data`), which the enroll-api
/// turns into at most one `agent.certificate.reuse_detected` per
/// certificate and attempt window. The identity fields come from the
/// certificate the gateway verified; the enroll-api records a report only
/// when its store agrees the certificate is the tenant's agent's and
/// superseded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupersededUse {
    /// The certificate's tenant.
    pub tenant_id: TenantId,
    /// The certificate's agent.
    pub agent_id: AgentId,
    /// The superseded certificate presented.
    pub serial: SerialNumber,
    /// When the first of these uses was refused, unix milliseconds.
    pub first_seen_ms: i64,
    /// Uses the gateway folded into this report (at least 1).
    pub uses: u32,
    /// The route prefix of the first use (`none` when no route matched).
    pub route: String,
    /// The first use's source address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<std::net::IpAddr>,
}

/// One gateway's entry in the live set (`{prefix}gateways`, a hash: field =
/// [`GatewayPresence::gateway_id`], value = this as JSON), written by the
/// gateway after it applies announcements and on every confirmed heartbeat
/// (ADR-0022). The enroll-api reads it to learn which gateways hold a
/// revocation before it answers.
///
/// `confirmed_until_ms` is when the gateway stops trusting its cached
/// answers unless it confirms Redis again (its last confirmation plus its
/// `max_staleness`): a gateway past it is not live, and refuses what it
/// cannot confirm, so nothing needs to wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPresence {
    /// Unique per gateway process (a random UUID chosen at start).
    pub gateway_id: String,
    /// The gateway's name: `revocation.gateway_name`, else the host name.
    pub name: String,
    /// The addresses it serves agents on.
    pub addr: String,
    /// The last announcement sequence number the gateway has applied: every
    /// announcement up to it is in its cache (or its cache was distrusted
    /// after it, which is as good).
    pub applied: u64,
    /// Unix milliseconds until which the gateway trusts cached answers.
    pub confirmed_until_ms: i64,
}

impl GatewayPresence {
    /// Whether the gateway is live at `now_ms` (unix milliseconds): it may
    /// still answer from its cache, so a revocation must wait for it.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.confirmed_until_ms > now_ms
    }
}

/// Unix milliseconds now, on the wall clock: the clock of
/// [`GatewayPresence::confirmed_until_ms`], which gateways write and the
/// enroll-api compares across processes (not a service's injectable clock).
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Every Redis key and channel name, derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchema {
    prefix: String,
}

impl Default for KeySchema {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl KeySchema {
    /// A schema whose keys all start with `prefix` (conventionally ending in
    /// `:`). Tests use a unique prefix per test so they can share one Redis.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key holding a certificate's [`CertStatus`].
    pub fn cert_status(&self, serial: &SerialNumber) -> String {
        format!("{}cert:{serial}", self.prefix)
    }

    /// The key holding an agent's [`AgentStatus`].
    pub fn agent_status(&self, tenant: &TenantId, agent: &AgentId) -> String {
        format!("{}agent:{tenant}:{agent}", self.prefix)
    }

    /// The pub/sub channel carrying [`Announcement`]s.
    pub fn revocation_channel(&self) -> String {
        format!("{}revocation", self.prefix)
    }

    /// The counter that numbers announcements.
    pub fn revocation_seq(&self) -> String {
        format!("{}revocation:seq", self.prefix)
    }

    /// The key recording when the projection was last fully rebuilt.
    pub fn projection_built_at(&self) -> String {
        format!("{}projection:built_at", self.prefix)
    }

    /// The Redis Stream carrying lifecycle events (see `specs/asyncapi.yaml`).
    pub fn events_stream(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The Redis Stream carrying gateways' [`SupersededUse`] reports to the
    /// enroll-api (consumer group `enroll-api`).
    pub fn reports_stream(&self) -> String {
        format!("{}reports", self.prefix)
    }

    /// The hash of live gateways: field = gateway id, value = a
    /// [`GatewayPresence`] as JSON.
    pub fn gateways(&self) -> String {
        format!("{}gateways", self.prefix)
    }

    /// A pattern matching every key of this schema (for `SCAN` in tests and
    /// rebuilds). Glob metacharacters in the prefix are escaped.
    pub fn all_keys_pattern(&self) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('*');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_derived_from_the_prefix() {
        let k = KeySchema::new("t1:");
        let serial: SerialNumber = "0a".parse().unwrap();
        let tenant: TenantId = "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10".parse().unwrap();
        let agent: AgentId = "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".parse().unwrap();
        assert_eq!(
            k.cert_status(&serial),
            "t1:cert:0000000000000000000000000000000a"
        );
        assert_eq!(
            k.agent_status(&tenant, &agent),
            "t1:agent:6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10:0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b"
        );
        assert_eq!(k.revocation_channel(), "t1:revocation");
        assert_eq!(k.events_stream(), "t1:events");
        assert_eq!(KeySchema::new("a*[b]:").all_keys_pattern(), "a\\*\\[b\\]:*");
        assert_eq!(KeySchema::default().prefix(), DEFAULT_PREFIX);
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in [
            CertStatus::Active,
            CertStatus::Revoked,
            CertStatus::Superseded,
        ] {
            assert_eq!(s.as_str().parse::<CertStatus>().unwrap(), s);
        }
        for s in [AgentStatus::Active, AgentStatus::Revoked] {
            assert_eq!(s.as_str().parse::<AgentStatus>().unwrap(), s);
        }
        assert!("Active".parse::<CertStatus>().is_err());
        assert!("superseded".parse::<AgentStatus>().is_err());
    }

    #[test]
    fn announcements_round_trip_as_json() {
        let a = Announcement {
            seq: 7,
            change: Change::Cert {
                serial: "ff".parse().unwrap(),
                status: CertStatus::Revoked,
            },
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"seq":7,"kind":"cert","serial":"000000000000000000000000000000ff","status":"revoked"}"#
        );
        assert_eq!(serde_json::from_str::<Announcement>(&json).unwrap(), a);
        let r: Announcement = serde_json::from_str(r#"{"seq":9,"kind":"resync"}"#).unwrap();
        assert_eq!(r.change, Change::Resync);
        assert!(serde_json::from_str::<Announcement>(r#"{"seq":9,"kind":"nope"}"#).is_err());
    }
}
