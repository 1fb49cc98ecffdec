//! Revocation state as the gateway reads it, and the Redis key schema.
//!
//! The store (PostgreSQL or SQLite) is the source of truth. Redis holds a
//! projection that the enroll-api writes and gateways read:
//!
//! | key | value | written when |
//! |---|---|---|
//! | `{prefix}{shard}cert:{serial}` | [`CertStatus`] as text | issue, rotation, revocation; expires at NotAfter |
//! | `{prefix}{shard}agent:{tenant}:{agent}` | [`AgentStatus`] as text | enrollment, revocation |
//! | `{prefix}{shard}revocation:seq` | integer, `INCR`ed per announcement of the shard | every change |
//! | `{prefix}{shard}revocation` (channel) | [`Announcement`] as JSON | every change |
//! | `{prefix}projection:built_at` | unix seconds of the last full rebuild | rebuild |
//! | `{prefix}projection:shards` | the shard count the projection is written with | enroll-api start, rebuild |
//! | `{prefix}gateways` (hash) | [`GatewayPresence`] per gateway | gateways |
//! | `{prefix}events` (stream) | lifecycle events | outbox relay |
//!
//! `{shard}` is empty in the default, unsharded layout (one sequence, one
//! `PUBLISH` channel: exactly the keys of a single node or Sentinel). With
//! `shards = N > 1` (a Redis Cluster, ADR-0024) it is the hash tag of the
//! tenant's shard, e.g. `{s3-1}`: every key of one tenant, and its shard's
//! counter and `SPUBLISH` channel, share one slot, and the N shards' slots
//! are spread evenly over the cluster's 16384 slots ([`KeySchema::shard_of`]).
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
    /// after it, which is as good). With a sharded projection: shard 0's.
    pub applied: u64,
    /// With a sharded projection (`shards > 1`), the cursor of every shard,
    /// by shard number; empty (and not written) when unsharded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_by_shard: Vec<u64>,
    /// Unix milliseconds until which the gateway trusts cached answers.
    pub confirmed_until_ms: i64,
}

impl GatewayPresence {
    /// The last announcement the gateway applied on `shard` (0 when it
    /// reports none there: it has confirmed nothing on that shard).
    pub fn applied_on(&self, shard: u16) -> u64 {
        if self.applied_by_shard.is_empty() {
            return if shard == 0 { self.applied } else { 0 };
        }
        self.applied_by_shard
            .get(usize::from(shard))
            .copied()
            .unwrap_or(0)
    }

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

/// The most shards a projection may have (each is one counter, one channel
/// and one subscription per gateway).
pub const MAX_SHARDS: u16 = 1024;

/// Redis Cluster's key hash: CRC16-CCITT (XMODEM), as in the cluster
/// specification.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash tag Redis Cluster hashes `key` by: the text between the first
/// `{` and the next `}`, when both are there and the text is not empty.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The Redis Cluster slot of `key` (0..16384): the CRC16 of its
/// [`hash_tag`], else of the whole key.
pub fn key_slot(key: &str) -> u16 {
    crc16(hash_tag(key).unwrap_or(key).as_bytes()) % 16384
}

/// Every Redis key and channel name, derived from one prefix and the shard
/// count.
///
/// Unsharded (`shards = 1`, the default) the keys are exactly the prefix
/// and a name. Sharded (`shards = N`, ADR-0024) every per-tenant key, and
/// each shard's sequence counter and channel, carry the shard's hash tag:
/// shard `k`'s tag is `s{k}-{i}` with the smallest `i` whose slot falls in
/// the `k`-th of N equal slices of the 16384 slots, so the shards spread
/// over every master of a cluster whose slots are split evenly (as
/// `redis-cli --cluster create` does). A tenant's shard is the CRC16 of its
/// id (hyphenated, lower case) modulo N.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchema {
    prefix: String,
    /// One hash tag (with its braces) per shard; `[""]` when unsharded.
    tags: Vec<String>,
}

impl Default for KeySchema {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl KeySchema {
    /// An unsharded schema whose keys all start with `prefix`
    /// (conventionally ending in `:`). Tests use a unique prefix per test so
    /// they can share one Redis.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            tags: vec![String::new()],
        }
    }

    /// A schema with `shards` shards (1 = [`KeySchema::new`]); `shards` is
    /// clamped to `1..=`[`MAX_SHARDS`] (configurations are validated
    /// before).
    pub fn sharded(prefix: impl Into<String>, shards: u16) -> Self {
        let n = shards.clamp(1, MAX_SHARDS);
        if n == 1 {
            return Self::new(prefix);
        }
        let tags = (0..n)
            .map(|k| {
                let (lo, hi) = (
                    u32::from(k) * 16384 / u32::from(n),
                    (u32::from(k) + 1) * 16384 / u32::from(n),
                );
                // A slice is at least 16 slots wide: found within a few
                // thousand tries at worst.
                (0u32..)
                    .map(|i| format!("s{k}-{i}"))
                    .find(|tag| (lo..hi).contains(&u32::from(crc16(tag.as_bytes()) % 16384)))
                    .map(|tag| format!("{{{tag}}}"))
                    .unwrap_or_default()
            })
            .collect();
        Self {
            prefix: prefix.into(),
            tags,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The number of shards (1 when unsharded).
    pub fn shards(&self) -> u16 {
        self.tags.len() as u16
    }

    /// Whether the projection is sharded (`shards > 1`): announcements go
    /// over sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`).
    pub fn is_sharded(&self) -> bool {
        self.tags.len() > 1
    }

    /// The shard holding `tenant`'s keys.
    pub fn shard_of(&self, tenant: &TenantId) -> u16 {
        if self.tags.len() == 1 {
            return 0;
        }
        let id = tenant.to_string();
        crc16(id.as_bytes()) % self.shards()
    }

    fn tag(&self, shard: u16) -> &str {
        self.tags.get(usize::from(shard)).map_or("", String::as_str)
    }

    /// The key holding a certificate's [`CertStatus`] (in its tenant's
    /// shard).
    pub fn cert_status(&self, tenant: &TenantId, serial: &SerialNumber) -> String {
        format!(
            "{}{}cert:{serial}",
            self.prefix,
            self.tag(self.shard_of(tenant))
        )
    }

    /// The key holding an agent's [`AgentStatus`].
    pub fn agent_status(&self, tenant: &TenantId, agent: &AgentId) -> String {
        format!(
            "{}{}agent:{tenant}:{agent}",
            self.prefix,
            self.tag(self.shard_of(tenant))
        )
    }

    /// The channel carrying shard 0's [`Announcement`]s (the only one when
    /// unsharded).
    pub fn revocation_channel(&self) -> String {
        self.revocation_channel_of(0)
    }

    /// The channel carrying `shard`'s [`Announcement`]s (`PUBLISH` when
    /// unsharded, `SPUBLISH` when sharded).
    pub fn revocation_channel_of(&self, shard: u16) -> String {
        format!("{}{}revocation", self.prefix, self.tag(shard))
    }

    /// The counter that numbers shard 0's announcements (the only one when
    /// unsharded).
    pub fn revocation_seq(&self) -> String {
        self.revocation_seq_of(0)
    }

    /// The counter that numbers `shard`'s announcements.
    pub fn revocation_seq_of(&self, shard: u16) -> String {
        format!("{}{}revocation:seq", self.prefix, self.tag(shard))
    }

    /// The key recording when the projection was last fully rebuilt.
    pub fn projection_built_at(&self) -> String {
        format!("{}projection:built_at", self.prefix)
    }

    /// The key recording the shard count the projection is written with
    /// (the enroll-api sets it; a gateway configured otherwise refuses to
    /// confirm, so fails closed, and says why).
    pub fn projection_shards(&self) -> String {
        format!("{}projection:shards", self.prefix)
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
            k.cert_status(&tenant, &serial),
            "t1:cert:0000000000000000000000000000000a"
        );
        assert_eq!(
            k.agent_status(&tenant, &agent),
            "t1:agent:6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10:0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b"
        );
        assert_eq!(k.revocation_channel(), "t1:revocation");
        assert_eq!(k.revocation_seq(), "t1:revocation:seq");
        assert_eq!(k.shards(), 1);
        assert!(!k.is_sharded());
        assert_eq!(k.shard_of(&tenant), 0);
        assert_eq!(KeySchema::sharded("t1:", 1), k);
        assert_eq!(k.events_stream(), "t1:events");
        assert_eq!(KeySchema::new("a*[b]:").all_keys_pattern(), "a\\*\\[b\\]:*");
        assert_eq!(KeySchema::default().prefix(), DEFAULT_PREFIX);
    }

    #[test]
    fn crc16_and_slots_match_redis() {
        // The cluster specification's check value, and slots Redis reports
        // (`CLUSTER KEYSLOT foo` = 12182, `bar` = 5061).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("x{foo}y"), 12182);
        assert_eq!(key_slot("{}foo"), key_slot("{}foo"));
        assert_ne!(key_slot("{}foo"), key_slot("foo"));
        assert_eq!(key_slot("a{bar}{foo}"), 5061);
    }

    #[test]
    fn sharded_keys_put_a_tenant_in_one_slot_and_spread_shards_evenly() {
        let n = 12u16;
        let k = KeySchema::sharded("op:", n);
        assert_eq!(k.shards(), n);
        assert!(k.is_sharded());
        // Shard k's tag hashes into the k-th slice of the slot space.
        for shard in 0..n {
            let slot = u32::from(key_slot(&k.revocation_seq_of(shard)));
            let (lo, hi) = (
                u32::from(shard) * 16384 / u32::from(n),
                (u32::from(shard) + 1) * 16384 / u32::from(n),
            );
            assert!((lo..hi).contains(&slot), "shard {shard}: slot {slot}");
            assert_eq!(
                key_slot(&k.revocation_channel_of(shard)),
                slot as u16,
                "the channel shares the counter's slot"
            );
        }
        assert_eq!(k.revocation_seq(), k.revocation_seq_of(0));
        let serial: SerialNumber = "0a".parse().unwrap();
        let mut used = std::collections::HashSet::new();
        for _ in 0..400 {
            let t = TenantId::random();
            let shard = k.shard_of(&t);
            assert_eq!(shard, crc16(t.to_string().as_bytes()) % n);
            used.insert(shard);
            let a = AgentId::random();
            let slot = key_slot(&k.revocation_seq_of(shard));
            assert_eq!(key_slot(&k.cert_status(&t, &serial)), slot);
            assert_eq!(key_slot(&k.agent_status(&t, &a)), slot);
            assert!(k.agent_status(&t, &a).starts_with("op:{s"));
        }
        assert_eq!(used.len(), usize::from(n), "400 tenants use every shard");
        // The global keys carry no shard tag.
        assert_eq!(k.gateways(), "op:gateways");
        assert_eq!(k.projection_shards(), "op:projection:shards");
        // Deterministic: every process derives the same tags.
        assert_eq!(KeySchema::sharded("op:", n), k);
        assert_eq!(KeySchema::sharded("op:", 5000).shards(), MAX_SHARDS);
    }

    #[test]
    fn presences_report_per_shard_cursors() {
        let mut p = GatewayPresence {
            gateway_id: "g".into(),
            name: "n".into(),
            addr: String::new(),
            applied: 7,
            applied_by_shard: Vec::new(),
            confirmed_until_ms: 1,
        };
        assert_eq!(p.applied_on(0), 7);
        assert_eq!(p.applied_on(1), 0);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("applied_by_shard"), "{json}");
        p.applied_by_shard = vec![7, 3];
        assert_eq!(p.applied_on(1), 3);
        assert_eq!(p.applied_on(2), 0);
        let back: GatewayPresence =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
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
