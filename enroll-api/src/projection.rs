//! The revocation projection in Redis, and the lifecycle event stream.
//!
//! The store is the source of truth; this module writes what gateways read
//! (key names from [`KeySchema`] only):
//!
//! - `{prefix}{shard}cert:{serial}` = `active` / `superseded` / `revoked`,
//!   expiring at the certificate's NotAfter (an expired certificate is
//!   refused by the chain check anyway, so its key is not kept);
//! - `{prefix}{shard}agent:{tenant}:{agent}` = `active` / `revoked` (no expiry);
//! - after each key written: `INCR {prefix}{shard}revocation:seq`, then
//!   `PUBLISH` (sharded: `SPUBLISH`) `{prefix}{shard}revocation` an
//!   [`Announcement`] carrying that number.
//!
//! `{shard}` is empty unless `redis.shards > 1` (ADR-0024): then it is the
//! hash tag of the tenant's shard ([`KeySchema::shard_of`]), so a tenant's
//! keys, its shard's counter and channel share one slot of a Redis Cluster,
//! and different tenants' shards sit on different masters.
//!
//! The write, the `INCR` and the `PUBLISH` run as one Lua script, so an
//! announcement is never published for a write that did not happen, and a
//! number is never used without its announcement. The script only ever moves
//! a status *forward* (certificate: active → superseded → revoked; agent:
//! active → revoked), as the store does: two relays racing on stale reads, or
//! a rebuild overlapping the relay, cannot turn a revoked key active again.
//! Redis is one node, a Sentinel-managed master or a Cluster, as `redis.url`
//! says ([`oneprotect_redis`]). With Sentinel, every (re)connect asks the
//! Sentinels for the master, so the relay follows a failover on its next
//! reconnect (a write to a demoted master fails, the relay reconnects). On
//! an unsharded Cluster the prefix must carry a hash tag, e.g.
//! `{oneprotect}:` (validated at startup), so the status key and the counter
//! share a slot and the scripts run on one node; `PUBLISH` from a script
//! reaches every node of the cluster. Sharded, each shard's tag does that
//! for its tenants, and `SPUBLISH` reaches the subscribers of the shard's
//! slot (every gateway subscribes to every shard).
//!
//! What the relay applies per event is not a delta but the agent's current
//! state re-read from the store ([`ProjectionConn::project_agent`]), so
//! retries and duplicates are harmless (idempotent).
//!
//! The same projection can live on an in-process
//! [`MemoryBus`](oneprotect_revocation_bus::MemoryBus) instead of Redis
//! ([`Projection::memory`]): same keys, same forward-only writes, same
//! numbered announcements; the event stream becomes the bus' bounded event
//! log. Only the one-process dev stack (`oneprotect-dev up`) uses it; the
//! service and its configuration always use Redis (ADR-0011).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use oneprotect_identity::events::{Event, Payload};
use oneprotect_identity::revocation::Change;
use oneprotect_identity::{
    AgentId, AgentStatus, CertStatus, GatewayPresence, KeySchema, SerialNumber, TenantId,
};
use oneprotect_redis::{OpenError, RedisClient, RedisConnection};
use oneprotect_revocation_bus::{LoggedEvent, MemoryBus};

use crate::store::{AnyStore, Page, Store, StoreError};

/// Redis commands give up after this long (the relay retries).
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Agents read per page during a rebuild.
const REBUILD_PAGE: u32 = 500;

/// Why a projection step failed. Every variant but [`ProjectionError::Url`]
/// is retried by the relay.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// `redis.url` is unusable (refused at startup).
    #[error("redis.url: {0}")]
    Url(#[from] OpenError),
    /// Redis refused, timed out or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An announcement did not serialise (a bug).
    #[error("announcement: {0}")]
    Encode(#[from] serde_json::Error),
    /// Fewer replicas than `redis.wait_replicas` confirmed a write in time.
    #[error("redis: {acked} of {wanted} replicas confirmed the write within the wait timeout")]
    NotReplicated {
        /// Replicas that confirmed.
        acked: u32,
        /// Replicas asked for.
        wanted: u32,
    },
}

// KEYS[1] status key, KEYS[2] sequence counter (same slot). ARGV[1] new
// status, ARGV[2] EXAT unix seconds or "" (no expiry), ARGV[3] channel,
// ARGV[4] the announcement JSON without its opening `{` and without `seq`,
// ARGV[5] "1" to announce, ARGV[6] PUBLISH or SPUBLISH. Returns -1 when a
// later status is already there (nothing written), else the announcement's
// seq (0 when not announcing).
const SET_STATUS: &str = r#"
local rank = { active = 1, superseded = 2, revoked = 3 }
local cur = redis.call('GET', KEYS[1])
if cur and rank[cur] and rank[cur] > rank[ARGV[1]] then
  return -1
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[5] ~= '1' then
  return 0
end
local seq = redis.call('INCR', KEYS[2])
redis.call(ARGV[6], ARGV[3], '{"seq":' .. seq .. ',' .. ARGV[4])
return seq
"#;

// KEYS[1] counter. ARGV[1] channel, ARGV[2] announcement tail as above,
// ARGV[3] PUBLISH or SPUBLISH.
const ANNOUNCE: &str = r#"
local seq = redis.call('INCR', KEYS[1])
redis.call(ARGV[3], ARGV[1], '{"seq":' .. seq .. ',' .. ARGV[2])
return seq
"#;

/// The announcement JSON after its `{`, without `seq` (the script prepends
/// `{"seq":N,`). [`oneprotect_identity::Announcement`] flattens the change,
/// so the result parses as one.
fn announcement_tail(change: &Change) -> Result<String, serde_json::Error> {
    let json = serde_json::to_string(change)?;
    Ok(json.strip_prefix('{').unwrap_or(&json).to_owned())
}

/// How announcements are sent: `SPUBLISH` on a sharded projection, else
/// `PUBLISH`.
fn publish_command(keys: &KeySchema) -> &'static str {
    if keys.is_sharded() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

/// Where the projection lives: a Redis client (connects lazily) or an
/// in-process bus, and the key schema. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Projection {
    backend: Backend,
    keys: KeySchema,
}

#[derive(Debug, Clone)]
enum Backend {
    Redis(Arc<RedisClient>),
    Memory(MemoryBus),
}

impl Projection {
    /// A projection at `url` (one node, `redis+sentinel://` or
    /// `redis+cluster://`) under `prefix`, in `shards` shards (1:
    /// unsharded; more only on a Cluster, as the configuration validates).
    /// Does not connect.
    pub fn new(url: &str, prefix: &str, shards: u16) -> Result<Self, ProjectionError> {
        Ok(Self {
            backend: Backend::Redis(Arc::new(RedisClient::open(url, REDIS_TIMEOUT)?)),
            keys: KeySchema::sharded(prefix, shards),
        })
    }

    /// A projection on an in-process bus under `prefix` (the one-process dev
    /// stack; gateways in the same process read the same bus).
    pub fn memory(bus: MemoryBus, prefix: &str) -> Self {
        Self {
            backend: Backend::Memory(bus),
            keys: KeySchema::new(prefix),
        }
    }

    /// The key schema.
    pub fn keys(&self) -> &KeySchema {
        &self.keys
    }

    /// The in-process bus, if the projection lives on one.
    pub(crate) fn bus(&self) -> Option<&MemoryBus> {
        match &self.backend {
            Backend::Redis(_) => None,
            Backend::Memory(bus) => Some(bus),
        }
    }

    /// `redis` or `memory` (the in-process bus).
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        }
    }

    /// Opens a connection (connect and response timeouts of 5 s).
    /// (An in-process bus needs no connection.)
    pub async fn connect(&self) -> Result<ProjectionConn, ProjectionError> {
        let conn = match &self.backend {
            Backend::Redis(client) => Conn::Redis(client.connect().await?),
            Backend::Memory(bus) => Conn::Memory(bus.clone()),
        };
        Ok(ProjectionConn {
            conn,
            keys: self.keys.clone(),
        })
    }
}

/// What a rebuild wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildStats {
    /// Tenants visited.
    pub tenants: usize,
    /// Agent keys written.
    pub agents: usize,
    /// Certificate keys written (unexpired certificates only).
    pub certificates: usize,
    /// The sequence number of the `resync` announcement (shard 0's when
    /// sharded: every shard announces one).
    pub seq: i64,
}

/// What [`ProjectionConn::status`] read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProjectionState {
    /// When the projection was last fully rebuilt, unix seconds.
    pub built_at: Option<i64>,
    /// The shard count it was built with (`{prefix}projection:shards`).
    pub built_shards: Option<u16>,
    /// The last announcement sequence of each shard (one when unsharded).
    pub sequences: Vec<Option<u64>>,
}

/// One connection to the projection's Redis (or a handle on the bus).
/// Cloning shares the multiplexed connection.
#[derive(Clone)]
pub struct ProjectionConn {
    conn: Conn,
    keys: KeySchema,
}

#[derive(Clone)]
enum Conn {
    Redis(RedisConnection),
    Memory(MemoryBus),
}

impl std::fmt::Debug for ProjectionConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionConn")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

/// One status key to write (forward only) and the change announced for it.
struct StatusWrite {
    key: String,
    status: &'static str,
    expires_at: Option<OffsetDateTime>,
    change: Change,
}

impl ProjectionConn {
    /// Writes one agent's status and each unexpired certificate's (forward
    /// only), in one pipeline on the tenant's shard; with `announce`,
    /// announces each key written. On revocation the agent key first: one
    /// announcement stops every certificate of the agent at the gateways.
    /// Otherwise the certificates first, so the agent never looks active
    /// with an unknown certificate for longer than needed. Returns how many
    /// keys were written.
    async fn write_agent_state(
        &mut self,
        tenant: TenantId,
        agent: AgentId,
        status: AgentStatus,
        certs: impl IntoIterator<Item = (SerialNumber, CertStatus, OffsetDateTime)>,
        now: OffsetDateTime,
        announce: bool,
    ) -> Result<usize, ProjectionError> {
        let agent_write = StatusWrite {
            key: self.keys.agent_status(&tenant, &agent),
            status: status.as_str(),
            expires_at: None,
            change: Change::Agent {
                tenant_id: tenant,
                agent_id: agent,
                status,
            },
        };
        let cert_writes = certs
            .into_iter()
            .filter(|(_, _, not_after)| *not_after > now)
            .map(|(serial, status, not_after)| StatusWrite {
                key: self.keys.cert_status(&tenant, &serial),
                status: status.as_str(),
                expires_at: Some(not_after),
                change: Change::Cert { serial, status },
            });
        let writes: Vec<StatusWrite> = if status == AgentStatus::Revoked {
            std::iter::once(agent_write).chain(cert_writes).collect()
        } else {
            cert_writes.chain(std::iter::once(agent_write)).collect()
        };
        self.write_statuses(self.keys.shard_of(&tenant), &writes, announce)
            .await
    }

    /// Applies `writes` of one tenant's shard in order, each forward only
    /// (one `SET_STATUS` script each, all in one pipeline: one round trip;
    /// they share the shard's slot); with `announce`, announces each key
    /// written. Returns how many were written.
    async fn write_statuses(
        &mut self,
        shard: u16,
        writes: &[StatusWrite],
        announce: bool,
    ) -> Result<usize, ProjectionError> {
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => {
                return Ok(writes
                    .iter()
                    .filter(|w| {
                        let exat = w.expires_at.map(OffsetDateTime::unix_timestamp);
                        bus.set_status(&w.key, w.status, exat, &w.change, announce)
                            .is_some()
                    })
                    .count());
            }
        };
        if writes.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for w in writes {
            // Plain EVAL (the scripts are a few hundred bytes; the `script`
            // feature's EVALSHA cache would pull in another SHA-1 crate).
            pipe.cmd("EVAL")
                .arg(SET_STATUS)
                .arg(2)
                .arg(&w.key)
                .arg(self.keys.revocation_seq_of(shard))
                .arg(w.status)
                .arg(
                    w.expires_at
                        .map(|t| t.unix_timestamp().to_string())
                        .unwrap_or_default(),
                )
                .arg(self.keys.revocation_channel_of(shard))
                .arg(announcement_tail(&w.change)?)
                .arg(if announce { "1" } else { "0" })
                .arg(publish_command(&self.keys));
        }
        let seqs: Vec<i64> = pipe.query_async(conn).await?;
        Ok(seqs.iter().filter(|seq| **seq >= 0).count())
    }

    /// Writes one agent's status and its unexpired certificates' statuses as
    /// the store has them now; with `announce`, announces each key written.
    /// Returns the number of keys written. An agent unknown to the store
    /// writes nothing.
    pub async fn project_agent(
        &mut self,
        store: &AnyStore,
        tenant: TenantId,
        agent: AgentId,
        now: OffsetDateTime,
        announce: bool,
    ) -> Result<usize, ProjectionError> {
        // One read transaction for both (the relay and every revocation
        // call this).
        let Some((record, certs)) = store.fetch_agent_projection(tenant, agent).await? else {
            return Ok(0);
        };
        self.write_agent_state(
            tenant,
            agent,
            record.status,
            certs.iter().map(|c| (c.serial, c.status, c.not_after)),
            now,
            announce,
        )
        .await
    }

    /// Projects an `agent.enrolled` event from its payload alone: the new
    /// certificate and the agent `active`, announced. No store read: both
    /// are the lowest status, and the scripts only move a status forward,
    /// so this write can never undo a later one (a revocation or rotation
    /// that overtook it is already in Redis, or is projected from the
    /// store's state when its own event is relayed). Returns the number of
    /// keys written.
    pub async fn project_enrolled(
        &mut self,
        tenant: TenantId,
        agent: AgentId,
        serial: SerialNumber,
        not_after: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<usize, ProjectionError> {
        self.write_agent_state(
            tenant,
            agent,
            AgentStatus::Active,
            [(serial, CertStatus::Active, not_after)],
            now,
            true,
        )
        .await
    }

    /// Applies one relayed event's projection effect, announced: an
    /// `agent.enrolled` from its payload ([`Self::project_enrolled`]), any
    /// other event that changes an agent ([`affected_agent`]) from the
    /// store's current state; other events write nothing.
    pub async fn project_event(
        &mut self,
        store: &AnyStore,
        event: &Event,
        now: OffsetDateTime,
    ) -> Result<usize, ProjectionError> {
        match &event.payload {
            Payload::Enrolled {
                agent_id,
                serial,
                not_after,
                ..
            } => {
                self.project_enrolled(event.tenant_id, *agent_id, *serial, *not_after, now)
                    .await
            }
            _ => match affected_agent(event) {
                Some(agent) => {
                    self.project_agent(store, event.tenant_id, agent, now, true)
                        .await
                }
                None => Ok(0),
            },
        }
    }

    /// Rewrites every agent's and unexpired certificate's status from the
    /// store (without per-key announcements), records
    /// `{prefix}projection:built_at` and `{prefix}projection:shards`, then
    /// announces one `resync` on every shard.
    pub async fn rebuild(
        &mut self,
        store: &AnyStore,
        now: OffsetDateTime,
    ) -> Result<RebuildStats, ProjectionError> {
        let mut stats = RebuildStats::default();
        for tenant in store.list_tenant_ids().await? {
            stats.tenants += 1;
            let mut after = None;
            loop {
                let page = store
                    .list_agents(
                        tenant,
                        None,
                        Page {
                            limit: REBUILD_PAGE,
                            after,
                        },
                    )
                    .await?;
                for a in &page {
                    let n = self.project_agent(store, tenant, a.id, now, false).await?;
                    if n > 0 {
                        stats.agents += 1;
                        stats.certificates += n - 1;
                    }
                }
                match page.last() {
                    Some(last) if page.len() == REBUILD_PAGE as usize => {
                        after = Some(*last.id.as_uuid());
                    }
                    _ => break,
                }
            }
        }
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => {
                bus.mark_built(now.unix_timestamp());
                stats.seq = i64::try_from(bus.announce(&Change::Resync)).unwrap_or(i64::MAX);
                return Ok(stats);
            }
        };
        // The shard count first: a gateway checks it before trusting the
        // keys, and the keys are all written.
        redis::cmd("SET")
            .arg(self.keys.projection_shards())
            .arg(self.keys.shards())
            .query_async::<()>(&mut *conn)
            .await?;
        redis::cmd("SET")
            .arg(self.keys.projection_built_at())
            .arg(now.unix_timestamp())
            .query_async::<()>(&mut *conn)
            .await?;
        let publish = publish_command(&self.keys);
        let tail = announcement_tail(&Change::Resync)?;
        for shard in (0..self.keys.shards()).rev() {
            stats.seq = redis::cmd("EVAL")
                .arg(ANNOUNCE)
                .arg(1)
                .arg(self.keys.revocation_seq_of(shard))
                .arg(self.keys.revocation_channel_of(shard))
                .arg(&tail)
                .arg(publish)
                .query_async(&mut *conn)
                .await?;
        }
        Ok(stats)
    }

    /// When the projection was last built (unix seconds), the shard count
    /// it was built with and every shard's last announcement sequence:
    /// `{prefix}projection:built_at`, `{prefix}projection:shards` and each
    /// `{prefix}{shard}revocation:seq`, one `GET` each (different slots on
    /// a sharded Cluster).
    pub async fn status(&mut self) -> Result<ProjectionState, ProjectionError> {
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => {
                return Ok(ProjectionState {
                    built_at: bus.built_at(),
                    built_shards: bus.is_built().then_some(1),
                    sequences: vec![bus.seq()],
                })
            }
        };
        let built_at: Option<i64> = redis::cmd("GET")
            .arg(self.keys.projection_built_at())
            .query_async(&mut *conn)
            .await?;
        let built_shards: Option<u16> = redis::cmd("GET")
            .arg(self.keys.projection_shards())
            .query_async(&mut *conn)
            .await?;
        let mut sequences = Vec::with_capacity(usize::from(self.keys.shards()));
        for shard in 0..self.keys.shards() {
            sequences.push(
                redis::cmd("GET")
                    .arg(self.keys.revocation_seq_of(shard))
                    .query_async::<Option<u64>>(&mut *conn)
                    .await?,
            );
        }
        Ok(ProjectionState {
            built_at,
            built_shards,
            sequences,
        })
    }

    /// The last announcement sequence of `shard` (`None`: none yet).
    pub async fn shard_seq(&mut self, shard: u16) -> Result<Option<u64>, ProjectionError> {
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => return Ok(bus.seq()),
        };
        Ok(redis::cmd("GET")
            .arg(self.keys.revocation_seq_of(shard))
            .query_async(conn)
            .await?)
    }

    /// Whether the projection is built in this layout: both
    /// `{prefix}projection:built_at` and `{prefix}projection:shards` exist,
    /// and the latter is this projection's shard count (a flushed or new
    /// Redis has neither; a changed `redis.shards` moves every key). Else
    /// it must be rebuilt.
    pub async fn is_built(&mut self) -> Result<bool, ProjectionError> {
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => return Ok(bus.is_built()),
        };
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.keys.projection_built_at())
            .query_async(&mut *conn)
            .await?;
        let shards: Option<u16> = redis::cmd("GET")
            .arg(self.keys.projection_shards())
            .query_async(&mut *conn)
            .await?;
        Ok(n > 0 && shards == Some(self.keys.shards()))
    }

    /// Appends `events` to the lifecycle stream in order, each as `XADD
    /// {prefix}events * event_id <uuid> type <type> data <json>` (see
    /// `specs/asyncapi.yaml`), all in one pipeline (one key: one round
    /// trip); on the in-process bus, to its bounded event log.
    pub async fn publish_events(&mut self, events: &[&Event]) -> Result<(), ProjectionError> {
        let conn = match &mut self.conn {
            Conn::Redis(c) => c,
            Conn::Memory(bus) => {
                for event in events {
                    bus.append_event(LoggedEvent {
                        event_id: event.event_id.to_string(),
                        event_type: event.payload.event_type().to_owned(),
                        data: serde_json::to_string(event)?,
                    });
                }
                return Ok(());
            }
        };
        if events.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for event in events {
            pipe.cmd("XADD")
                .arg(self.keys.events_stream())
                .arg("*")
                .arg("event_id")
                .arg(event.event_id.to_string())
                .arg("type")
                .arg(event.payload.event_type())
                .arg("data")
                .arg(serde_json::to_string(event)?)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }
}

impl ProjectionConn {
    /// Every gateway presence in the live set (`HGETALL {prefix}gateways`);
    /// an entry that does not parse is skipped (and logged): it names no
    /// gateway that could be waited for.
    pub async fn gateways(&mut self) -> Result<Vec<GatewayPresence>, ProjectionError> {
        let raw: Vec<(String, String)> = match &mut self.conn {
            Conn::Memory(bus) => bus
                .gateways()
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect(),
            Conn::Redis(c) => {
                redis::cmd("HGETALL")
                    .arg(self.keys.gateways())
                    .query_async(c)
                    .await?
            }
        };
        Ok(raw
            .into_iter()
            .filter_map(
                |(id, json)| match serde_json::from_str::<GatewayPresence>(&json) {
                    Ok(p) if p.gateway_id == id => Some(p),
                    _ => {
                        tracing::warn!(gateway_id = %id, "unreadable gateway presence skipped");
                        None
                    }
                },
            )
            .collect())
    }

    /// Removes gateways from the live set (`HDEL`).
    pub async fn remove_gateways(&mut self, ids: &[String]) -> Result<(), ProjectionError> {
        match &mut self.conn {
            Conn::Memory(bus) => {
                for id in ids {
                    bus.remove_gateway(id);
                }
            }
            Conn::Redis(c) => {
                redis::cmd("HDEL")
                    .arg(self.keys.gateways())
                    .arg(ids)
                    .query_async::<i64>(c)
                    .await?;
            }
        }
        Ok(())
    }

    /// The Redis connection, unless this is the in-process bus.
    pub(crate) fn redis(&mut self) -> Option<&mut RedisConnection> {
        match &mut self.conn {
            Conn::Redis(c) => Some(c),
            Conn::Memory(_) => None,
        }
    }

    /// The in-process bus, if this is it.
    pub(crate) fn bus(&self) -> Option<&MemoryBus> {
        match &self.conn {
            Conn::Redis(_) => None,
            Conn::Memory(bus) => Some(bus),
        }
    }

    /// Waits until `replicas` replicas have every write made on this
    /// connection so far (Redis `WAIT`), at most `timeout`. The in-process
    /// bus has no replicas and passes at once.
    pub async fn wait_replicated(
        &mut self,
        replicas: u32,
        timeout: std::time::Duration,
    ) -> Result<(), ProjectionError> {
        let Conn::Redis(conn) = &mut self.conn else {
            return Ok(());
        };
        let acked: i64 = redis::cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis().max(1) as u64)
            .query_async(conn)
            .await?;
        let acked = u32::try_from(acked).unwrap_or(0);
        if acked < replicas {
            return Err(ProjectionError::NotReplicated {
                acked,
                wanted: replicas,
            });
        }
        Ok(())
    }
}

/// The agent whose projection an event changes, if any.
pub fn affected_agent(event: &Event) -> Option<AgentId> {
    match &event.payload {
        Payload::Enrolled { agent_id, .. }
        | Payload::CertificateRotated { agent_id, .. }
        | Payload::CertificateSuperseded { agent_id, .. }
        | Payload::Revoked { agent_id, .. } => Some(*agent_id),
        Payload::CertificateReuseDetected { .. }
        | Payload::TokenIssued { .. }
        | Payload::TokenRevoked { .. }
        | Payload::EnrollmentFailed { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::{Announcement, CertStatus, SerialNumber};

    /// `agent.enrolled` from its payload: the certificate then the agent,
    /// both `active` and announced; an expired certificate is not written;
    /// and a duplicate relayed after the agent's revocation (at-least-once)
    /// changes nothing: `active` never replaces a later status.
    #[tokio::test]
    async fn an_enrolled_event_projects_active_and_never_undoes_a_revocation() {
        let bus = MemoryBus::new();
        let projection = Projection::memory(bus.clone(), "t:");
        let mut conn = projection.connect().await.unwrap();
        let keys = projection.keys().clone();
        let (tenant, agent) = (TenantId::random(), AgentId::random());
        let serial: SerialNumber = "0a1b".parse().unwrap();
        let now = OffsetDateTime::now_utc();
        let not_after = now + time::Duration::hours(1);
        let cert_key = keys.cert_status(&tenant, &serial);
        let agent_key = keys.agent_status(&tenant, &agent);

        let before = bus.seq().unwrap_or(0);
        let n = conn
            .project_enrolled(tenant, agent, serial, not_after, now)
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(bus.seq(), Some(before + 2), "each key announced");
        assert_eq!(
            bus.get(&[&cert_key, &agent_key]),
            [Some("active".to_owned()), Some("active".to_owned())]
        );

        let revoked = conn
            .write_agent_state(
                tenant,
                agent,
                AgentStatus::Revoked,
                [(serial, CertStatus::Revoked, not_after)],
                now,
                true,
            )
            .await
            .unwrap();
        assert_eq!(revoked, 2);
        let n = conn
            .project_enrolled(tenant, agent, serial, not_after, now)
            .await
            .unwrap();
        assert_eq!(n, 0, "a late duplicate wrote something");
        assert_eq!(
            bus.get(&[&cert_key, &agent_key]),
            [Some("revoked".to_owned()), Some("revoked".to_owned())]
        );

        let (other, old) = (AgentId::random(), "0c".parse().unwrap());
        let n = conn
            .project_enrolled(tenant, other, old, now - time::Duration::seconds(1), now)
            .await
            .unwrap();
        assert_eq!(n, 1, "only the agent: the certificate has expired");
        assert_eq!(bus.get(&[&keys.cert_status(&tenant, &old)]), [None]);
    }

    #[test]
    fn the_script_announcement_parses_as_an_announcement() {
        for change in [
            Change::Resync,
            Change::Cert {
                serial: "0a".parse().unwrap(),
                status: CertStatus::Revoked,
            },
            Change::Agent {
                tenant_id: TenantId::random(),
                agent_id: AgentId::random(),
                status: AgentStatus::Revoked,
            },
        ] {
            let text = format!("{{\"seq\":42,{}", announcement_tail(&change).unwrap());
            let a: Announcement = serde_json::from_str(&text).unwrap();
            assert_eq!(a.seq, 42);
            assert_eq!(a.change, change);
        }
    }
}
