//! Acknowledged revocation (ADR-0022): a revocation or supersession answers
//! once every live gateway has applied it, not merely once the store has
//! committed it.
//!
//! After the commit, [`Enforcer::enforce`]:
//!
//! 1. projects the agent's state to Redis itself (the same idempotent,
//!    forward-only writes as the outbox relay, announced on the channel),
//!    instead of waiting for the relay's turn; the relay still sends the
//!    outbox row (a duplicate announcement, harmless);
//! 2. reads the announcement counter: every announcement of this change has
//!    a number at most this target;
//! 3. reads the live set (`{prefix}gateways`, one [`GatewayPresence`] per
//!    gateway process) until every live gateway reports `applied ≥ target`,
//!    or the deadline passes. It polls the hash (first after 250 µs, the
//!    interval doubling to 5 ms); on the in-process bus it is woken by each
//!    presence change instead.
//!
//! A gateway is *live* while its `confirmed_until_ms` is in the future:
//! until then it may answer from its cache, so the revocation must wait for
//! it; after it, it refuses what it cannot confirm in Redis (which holds the
//! revocation), so nothing needs to wait for it. A gateway that does not
//! confirm by the deadline is named in the answer with the moment it fails
//! closed. Entries whose `confirmed_until_ms` passed more than
//! [`PRUNE_AFTER`] ago (a gateway that died without removing itself) are
//! deleted on the way.
//!
//! The answer is always 200 once the store committed (the revocation stands
//! whatever Redis does); [`Enforcement::outcome`] says what the gateways
//! confirmed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use oneprotect_identity::{AgentId, GatewayPresence, TenantId};

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::projection::{Projection, ProjectionConn, ProjectionError};
use crate::store::AnyStore;

/// The first poll of the live set comes this long after the projection
/// write; the interval then doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_micros(250);
/// The longest interval between two reads of the live set.
const MAX_POLL: Duration = Duration::from_millis(5);
/// The longest a read of the live set may take once the deadline is near.
const READ_GRACE: Duration = Duration::from_millis(50);
/// A presence whose `confirmed_until_ms` passed this long ago is deleted.
pub const PRUNE_AFTER: Duration = Duration::from_secs(60);

/// What the gateways confirmed about one revocation or supersession
/// (`Enforcement` in `specs/openapi.yaml`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Enforcement {
    /// `confirmed`: every live gateway applied the change (also when no
    /// gateway is live); `lagging`: the deadline passed first, see
    /// `lagging`; `unconfirmed`: the change could not be written to Redis
    /// now (the outbox relay retries it; gateways that cannot reach Redis
    /// fail closed at their `max_staleness`); `not_waited`: the caller
    /// asked for `wait=false`.
    pub outcome: &'static str,
    /// The announcement sequence number the gateways had to reach.
    pub seq: Option<u64>,
    /// Gateways live when the answer was given.
    pub gateways_live: usize,
    /// Of those, the ones that had applied `seq`.
    pub gateways_confirmed: usize,
    /// The live gateways that had not.
    pub lagging: Vec<LaggingGateway>,
    /// From the commit to the answer, milliseconds.
    pub elapsed_ms: f64,
    /// What that means, in words.
    pub detail: String,
}

/// A live gateway that had not applied the change by the deadline.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LaggingGateway {
    /// Its id in the live set.
    pub gateway_id: String,
    /// Its name.
    pub name: String,
    /// The addresses it serves agents on.
    pub addr: String,
    /// The last announcement it had applied.
    pub applied: u64,
    /// When it stops trusting its cache unless it confirms Redis again (then
    /// it refuses what it cannot confirm, and Redis holds the revocation).
    #[serde(with = "time::serde::rfc3339")]
    pub fails_closed_by: OffsetDateTime,
}

/// Splits the live set at `now_ms` into (live, to prune) and counts the
/// live gateways that applied `seq`. Pure; the unit tests pin it.
pub fn assess(
    presences: Vec<GatewayPresence>,
    seq: u64,
    now_ms: i64,
) -> (Vec<GatewayPresence>, usize, Vec<String>) {
    let prune_ms = i64::try_from(PRUNE_AFTER.as_millis()).unwrap_or(i64::MAX);
    let mut live = Vec::new();
    let mut prune = Vec::new();
    for p in presences {
        if p.confirmed_until_ms > now_ms {
            live.push(p);
        } else if p.confirmed_until_ms.saturating_add(prune_ms) < now_ms {
            prune.push(p.gateway_id);
        }
    }
    let confirmed = live.iter().filter(|p| p.applied >= seq).count();
    (live, confirmed, prune)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Waits for the gateways after revocations and supersessions.
#[derive(Debug)]
pub struct Enforcer {
    projection: Option<Projection>,
    deadline: Duration,
    /// One multiplexed connection, reconnected after a failure.
    conn: Mutex<Option<ProjectionConn>>,
}

impl Enforcer {
    /// An enforcer over `projection` (none: Redis not configured) waiting at
    /// most `deadline` for the gateways.
    pub fn new(projection: Option<Projection>, deadline: Duration) -> Self {
        Self {
            projection,
            deadline,
            conn: Mutex::new(None),
        }
    }

    /// The longest wait for the gateways.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    async fn connection(&self) -> Result<ProjectionConn, ProjectionError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let projection = self
            .projection
            .as_ref()
            .ok_or(ProjectionError::NotConfigured)?;
        let c = projection.connect().await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn forget_connection(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// After `agent`'s revocation or supersession committed at `committed`:
    /// projects it and, with `wait`, waits until every live gateway applied
    /// it or the deadline passed. Never fails: what happened is the
    /// [`Enforcement`].
    pub async fn enforce(
        &self,
        store: &AnyStore,
        clock: &SharedClock,
        metrics: &Metrics,
        tenant: TenantId,
        agent: AgentId,
        wait: bool,
    ) -> Enforcement {
        let committed = Instant::now();
        let e = self
            .enforce_inner(store, clock, tenant, agent, wait, committed)
            .await;
        metrics.enforcement(e.outcome, committed.elapsed(), e.lagging.len());
        e
    }

    async fn enforce_inner(
        &self,
        store: &AnyStore,
        clock: &SharedClock,
        tenant: TenantId,
        agent: AgentId,
        wait: bool,
        committed: Instant,
    ) -> Enforcement {
        let mut e = Enforcement {
            outcome: "not_waited",
            seq: None,
            gateways_live: 0,
            gateways_confirmed: 0,
            lagging: Vec::new(),
            elapsed_ms: 0.0,
            detail: String::new(),
        };
        if !wait {
            e.detail = "wait=false: answered at commit; the outbox relay announces the change \
                        and every gateway refuses it within its propagation bound"
                .into();
            return finish(e, committed);
        }
        if self.projection.is_none() {
            e.outcome = "unconfirmed";
            e.detail = "committed, but no revocation projection is configured (redis.url): no \
                        gateway can learn of it until one is"
                .into();
            return finish(e, committed);
        }
        // Every Redis step is bounded by the deadline too: an unreachable
        // Redis (connect timeout 5 s) must not hold the answer longer.
        let until = tokio::time::Instant::from_std(committed + self.deadline);
        let seq = match tokio::time::timeout_at(until, self.project(store, clock, tenant, agent))
            .await
        {
            Ok(Ok(seq)) => seq,
            failed => {
                self.forget_connection();
                let why = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("no answer within {} ms", self.deadline.as_millis()),
                };
                tracing::warn!(error = %why, %tenant, %agent, "revocation committed but not yet projected; the outbox relay retries");
                e.outcome = "unconfirmed";
                e.detail = "committed, but the revocation state could not be written to Redis \
                            now: the outbox relay retries it; a gateway that cannot reach Redis \
                            refuses every request once its max_staleness passes"
                    .into();
                return finish(e, committed);
            }
        };
        e.seq = Some(seq);
        let until_std = committed + self.deadline;
        let mut poll = FIRST_POLL;
        loop {
            // The read at the deadline itself gets a short grace: the answer
            // is then given from it (at most READ_GRACE late when Redis is
            // slow, never Redis' 5 s timeout).
            let read_until = until.max(tokio::time::Instant::now() + READ_GRACE);
            let mut conn = match tokio::time::timeout_at(read_until, self.connection()).await {
                Ok(Ok(c)) => c,
                Ok(Err(err)) => return self.unreadable(e, &err, committed),
                Err(_) => return self.unreadable(e, &"no answer by the deadline", committed),
            };
            // On the bus, registered before the read: a change in between
            // still wakes the wait below.
            let bus = conn.bus().cloned();
            let changed = bus.as_ref().map(|b| b.gateways_changed());
            tokio::pin!(changed);
            if let Some(c) = changed.as_mut().as_pin_mut() {
                c.enable();
            }
            let presences = match tokio::time::timeout_at(read_until, conn.gateways()).await {
                Ok(Ok(p)) => p,
                Ok(Err(err)) => return self.unreadable(e, &err, committed),
                Err(_) => return self.unreadable(e, &"no answer by the deadline", committed),
            };
            let (live, confirmed, prune) = assess(presences, seq, unix_ms());
            if !prune.is_empty() {
                // Best effort: a failure leaves them for the next revocation.
                let _ = conn.remove_gateways(&prune).await;
            }
            let now = Instant::now();
            if confirmed == live.len() || now >= until_std {
                e.gateways_live = live.len();
                e.gateways_confirmed = confirmed;
                e.lagging = live
                    .into_iter()
                    .filter(|p| p.applied < seq)
                    .map(|p| LaggingGateway {
                        fails_closed_by: OffsetDateTime::from_unix_timestamp_nanos(
                            i128::from(p.confirmed_until_ms) * 1_000_000,
                        )
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                        gateway_id: p.gateway_id,
                        name: p.name,
                        addr: p.addr,
                        applied: p.applied,
                    })
                    .collect();
                if e.lagging.is_empty() {
                    e.outcome = "confirmed";
                    e.detail = if e.gateways_live == 0 {
                        "no gateway is live: none can serve from a cache that predates the \
                         revocation"
                            .into()
                    } else {
                        format!(
                            "every live gateway ({}) applied the change: each refuses the \
                             revoked certificate on its next request",
                            e.gateways_live
                        )
                    };
                } else {
                    e.outcome = "lagging";
                    e.detail = format!(
                        "{} of {} live gateways confirmed within {} ms; each lagging gateway \
                         refuses every request it cannot confirm in Redis (which holds the \
                         revocation) by its fails_closed_by",
                        e.gateways_confirmed,
                        e.gateways_live,
                        self.deadline.as_millis()
                    );
                }
                return finish(e, committed);
            }
            let left = until_std - now;
            match changed.as_mut().as_pin_mut() {
                Some(c) => {
                    let _ = tokio::time::timeout(left, c).await;
                }
                None => {
                    tokio::time::sleep(poll.min(left)).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
            }
        }
    }

    fn unreadable(
        &self,
        mut e: Enforcement,
        err: &dyn std::fmt::Display,
        committed: Instant,
    ) -> Enforcement {
        self.forget_connection();
        tracing::warn!(error = %err, "revocation projected, but the live gateway set could not be read");
        e.outcome = "unconfirmed";
        e.detail = "committed and written to Redis, but the live gateway set could not be read: \
                    gateways refuse the revoked certificate within their propagation bound"
            .into();
        finish(e, committed)
    }

    /// Writes the agent's state to Redis (announced) and returns the
    /// announcement counter after it.
    async fn project(
        &self,
        store: &AnyStore,
        clock: &SharedClock,
        tenant: TenantId,
        agent: AgentId,
    ) -> Result<u64, ProjectionError> {
        let mut conn = self.connection().await?;
        conn.project_agent(store, tenant, agent, clock.now(), true)
            .await?;
        let (_, seq) = conn.status().await?;
        Ok(seq.unwrap_or(0))
    }
}

fn finish(mut e: Enforcement, committed: Instant) -> Enforcement {
    e.elapsed_ms = (committed.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, applied: u64, until: i64) -> GatewayPresence {
        GatewayPresence {
            gateway_id: id.into(),
            name: "gw".into(),
            addr: "127.0.0.1:8443".into(),
            applied,
            confirmed_until_ms: until,
        }
    }

    #[test]
    fn live_confirmed_and_pruned_gateways() {
        let now = 1_000_000;
        let old = now - i64::try_from(PRUNE_AFTER.as_millis()).unwrap() - 1;
        let (live, confirmed, prune) = assess(
            vec![
                p("ahead", 12, now + 10),
                p("exact", 10, now + 1),
                p("behind", 9, now + 5000),
                // Expired: not live, not waited for, kept for a while.
                p("expired", 1, now),
                p("dead", 1, old),
            ],
            10,
            now,
        );
        let ids: Vec<_> = live.iter().map(|g| g.gateway_id.as_str()).collect();
        assert_eq!(ids, ["ahead", "exact", "behind"]);
        assert_eq!(confirmed, 2);
        assert_eq!(prune, ["dead"]);
    }

    #[test]
    fn no_gateway_is_trivially_confirmed() {
        let (live, confirmed, prune) = assess(vec![], 5, 0);
        assert!(live.is_empty() && prune.is_empty());
        assert_eq!(confirmed, 0);
    }
}
