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
//! 2. reads the announcement counter of the tenant's shard (ADR-0024; the
//!    only one when unsharded): every announcement of this change has a
//!    number at most this target;
//! 3. reads the live set (`{prefix}gateways`, one [`GatewayPresence`] per
//!    gateway process) until every live gateway reports, for that shard,
//!    `applied ≥ target`,
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
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use oneprotect_identity::revocation::unix_ms_now;
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

/// What the gateways confirmed (`Enforcement.outcome` in
/// `specs/openapi.yaml`; the `outcome` label of
/// `revocation_enforcements_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every live gateway applied the change (also when none is live).
    Confirmed,
    /// The deadline passed first; see [`Enforcement::lagging`].
    Lagging,
    /// The change could not be written to Redis, or the live set read, now
    /// (the outbox relay retries; gateways that cannot reach Redis fail
    /// closed at their `max_staleness`).
    Unconfirmed,
    /// The caller asked for `wait=false`.
    NotWaited,
}

impl Outcome {
    /// Every outcome, in spec order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Confirmed,
        Outcome::Lagging,
        Outcome::Unconfirmed,
        Outcome::NotWaited,
    ];

    /// The wire and label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Confirmed => "confirmed",
            Outcome::Lagging => "lagging",
            Outcome::Unconfirmed => "unconfirmed",
            Outcome::NotWaited => "not_waited",
        }
    }
}

/// What the gateways confirmed about one revocation or supersession
/// (`Enforcement` in `specs/openapi.yaml`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Enforcement {
    /// What happened.
    pub outcome: Outcome,
    /// The announcement sequence number the gateways had to reach.
    pub seq: Option<u64>,
    /// The shard whose sequence `seq` is (0 when unsharded); `None` when
    /// the answer did not wait.
    pub shard: Option<u16>,
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
    /// The last announcement it had applied on the change's shard.
    pub applied: u64,
    /// When it stops trusting its cache unless it confirms Redis again (then
    /// it refuses what it cannot confirm, and Redis holds the revocation).
    #[serde(with = "time::serde::rfc3339")]
    pub fails_closed_by: OffsetDateTime,
}

impl LaggingGateway {
    fn new(p: GatewayPresence, shard: u16) -> Self {
        Self {
            applied: p.applied_on(shard),
            fails_closed_by: OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(p.confirmed_until_ms) * 1_000_000,
            )
            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            gateway_id: p.gateway_id,
            name: p.name,
            addr: p.addr,
        }
    }
}

/// Splits the live set at `now_ms` into (live, to prune) and counts the
/// live gateways that applied `seq` on `shard`. Pure; the unit tests pin it.
pub fn assess(
    presences: Vec<GatewayPresence>,
    shard: u16,
    seq: u64,
    now_ms: i64,
) -> (Vec<GatewayPresence>, usize, Vec<String>) {
    let prune_ms = i64::try_from(PRUNE_AFTER.as_millis()).unwrap_or(i64::MAX);
    let mut live = Vec::new();
    let mut prune = Vec::new();
    for p in presences {
        if p.is_live(now_ms) {
            live.push(p);
        } else if p.confirmed_until_ms.saturating_add(prune_ms) < now_ms {
            prune.push(p.gateway_id);
        }
    }
    let confirmed = live.iter().filter(|p| p.applied_on(shard) >= seq).count();
    (live, confirmed, prune)
}

/// Waits for the gateways after revocations and supersessions.
#[derive(Debug)]
pub struct Enforcer {
    projection: Option<Projection>,
    deadline: Duration,
    /// One multiplexed connection, reconnected after a failure.
    conn: Mutex<Option<ProjectionConn>>,
}

/// One answer under construction: the commit instant and the deadline.
struct Wait {
    committed: Instant,
    until: Instant,
    deadline: Duration,
}

impl Wait {
    /// The answer with `outcome`, `detail` and what the live set showed.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        outcome: Outcome,
        detail: String,
        shard: Option<u16>,
        seq: Option<u64>,
        live: usize,
        confirmed: usize,
        lagging: Vec<LaggingGateway>,
    ) -> Enforcement {
        Enforcement {
            outcome,
            seq,
            shard,
            gateways_live: live,
            gateways_confirmed: confirmed,
            lagging,
            elapsed_ms: (self.committed.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            detail,
        }
    }

    /// `unconfirmed`, with `detail`.
    fn unconfirmed(&self, detail: &str, shard: u16, seq: Option<u64>) -> Enforcement {
        self.answer(
            Outcome::Unconfirmed,
            detail.into(),
            Some(shard),
            seq,
            0,
            0,
            Vec::new(),
        )
    }

    /// The answer from one read of the live set: `confirmed` or `lagging`.
    fn settle(
        &self,
        shard: u16,
        seq: u64,
        live: Vec<GatewayPresence>,
        confirmed: usize,
    ) -> Enforcement {
        let n = live.len();
        let lagging: Vec<LaggingGateway> = live
            .into_iter()
            .filter(|p| p.applied_on(shard) < seq)
            .map(|p| LaggingGateway::new(p, shard))
            .collect();
        let (outcome, detail) = match (lagging.is_empty(), n) {
            (true, 0) => (
                Outcome::Confirmed,
                "no gateway is live: none can serve from a cache that predates the revocation"
                    .to_owned(),
            ),
            (true, _) => (
                Outcome::Confirmed,
                format!(
                    "every live gateway ({n}) applied the change: each refuses the revoked \
                     certificate on its next request"
                ),
            ),
            (false, _) => (
                Outcome::Lagging,
                format!(
                    "{confirmed} of {n} live gateways confirmed within {} ms; each lagging \
                     gateway refuses every request it cannot confirm in Redis (which holds \
                     the revocation) by its fails_closed_by",
                    self.deadline.as_millis()
                ),
            ),
        };
        self.answer(
            outcome,
            detail,
            Some(shard),
            Some(seq),
            n,
            confirmed,
            lagging,
        )
    }
}

const NOT_PROJECTED: &str = "committed, but the revocation state could not be written to \
     Redis now: the outbox relay retries it; a gateway that cannot reach Redis refuses every \
     request once its max_staleness passes";
const UNREADABLE: &str = "committed and written to Redis, but the live gateway set could not \
     be read: gateways refuse the revoked certificate within their propagation bound";

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

    async fn connection(&self, projection: &Projection) -> Result<ProjectionConn, ProjectionError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let c = projection.connect().await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn forget_connection(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// After `agent`'s revocation or supersession committed: projects it
    /// and, with `wait`, waits until every live gateway applied it or the
    /// deadline passed. Never fails: what happened is the [`Enforcement`].
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
        let w = Wait {
            committed,
            until: committed + self.deadline,
            deadline: self.deadline,
        };
        let e = match (&self.projection, wait) {
            (_, false) => w.answer(
                Outcome::NotWaited,
                "wait=false: answered at commit; the outbox relay announces the change and \
                 every gateway refuses it within its propagation bound"
                    .into(),
                None,
                None,
                0,
                0,
                Vec::new(),
            ),
            (None, true) => w.unconfirmed(
                "committed, but no revocation projection is configured (redis.url): no \
                 gateway can learn of it until one is",
                0,
                None,
            ),
            (Some(p), true) => self.wait(p, &w, store, clock, tenant, agent).await,
        };
        metrics.enforcement(e.outcome, committed.elapsed(), e.lagging.len());
        e
    }

    /// Projects the change and reads the live set until it is confirmed or
    /// the deadline passes. Every Redis step is bounded by the deadline (the
    /// read at the deadline gets [`READ_GRACE`]): an unreachable Redis (5 s
    /// connect timeout) does not hold the answer.
    async fn wait(
        &self,
        projection: &Projection,
        w: &Wait,
        store: &AnyStore,
        clock: &SharedClock,
        tenant: TenantId,
        agent: AgentId,
    ) -> Enforcement {
        let shard = projection.keys().shard_of(&tenant);
        let projected = tokio::time::timeout_at(w.until, async {
            let mut conn = self.connection(projection).await?;
            conn.project_agent(store, tenant, agent, clock.now(), true)
                .await?;
            let seq = conn.shard_seq(shard).await?;
            Ok::<_, ProjectionError>(seq.unwrap_or(0))
        })
        .await;
        let seq = match projected {
            Ok(Ok(seq)) => seq,
            failed => {
                self.forget_connection();
                let why = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("no answer within {} ms", self.deadline.as_millis()),
                };
                tracing::warn!(error = %why, %tenant, %agent, "revocation committed but not yet projected; the outbox relay retries");
                return w.unconfirmed(NOT_PROJECTED, shard, None);
            }
        };
        let mut poll = FIRST_POLL;
        loop {
            // On the bus, registered before the read: a presence change in
            // between still wakes the wait below.
            let changed = projection.bus().map(|b| b.gateways_changed());
            tokio::pin!(changed);
            if let Some(c) = changed.as_mut().as_pin_mut() {
                c.enable();
            }
            let read_until = w.until.max(Instant::now() + READ_GRACE);
            let read = tokio::time::timeout_at(read_until, async {
                let mut conn = self.connection(projection).await?;
                let presences = conn.gateways().await?;
                Ok::<_, ProjectionError>((conn, presences))
            })
            .await;
            let (mut conn, presences) = match read {
                Ok(Ok(read)) => read,
                failed => {
                    self.forget_connection();
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "no answer by the deadline".to_owned(),
                    };
                    tracing::warn!(error = %why, "revocation projected, but the live gateway set could not be read");
                    return w.unconfirmed(UNREADABLE, shard, Some(seq));
                }
            };
            let (live, confirmed, prune) = assess(presences, shard, seq, unix_ms_now());
            if !prune.is_empty() {
                // Best effort: a failure leaves them for the next revocation.
                let _ = conn.remove_gateways(&prune).await;
            }
            let now = Instant::now();
            if confirmed == live.len() || now >= w.until {
                return w.settle(shard, seq, live, confirmed);
            }
            match changed.as_mut().as_pin_mut() {
                Some(c) => {
                    let _ = tokio::time::timeout_at(w.until, c).await;
                }
                None => {
                    tokio::time::sleep(poll.min(w.until - now)).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
            }
        }
    }
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
            applied_by_shard: Vec::new(),
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
            0,
            10,
            now,
        );
        let ids: Vec<_> = live.iter().map(|g| g.gateway_id.as_str()).collect();
        assert_eq!(ids, ["ahead", "exact", "behind"]);
        assert_eq!(confirmed, 2);
        assert_eq!(prune, ["dead"]);
    }

    #[test]
    fn a_sharded_change_waits_for_its_own_shard() {
        let now = 1_000_000;
        let mut a = p("a", 0, now + 10);
        a.applied_by_shard = vec![3, 10, 0];
        let mut b = p("b", 0, now + 10);
        b.applied_by_shard = vec![50, 9, 50];
        // An unsharded presence has applied nothing on shard 1.
        let c = p("c", 99, now + 10);
        let (live, confirmed, _) = assess(vec![a.clone(), b.clone(), c], 1, 10, now);
        assert_eq!(live.len(), 3);
        assert_eq!(confirmed, 1, "only a reached 10 on shard 1");
        let (_, confirmed, _) = assess(vec![a.clone(), b.clone()], 2, 1, now);
        assert_eq!(confirmed, 1, "only b reached 1 on shard 2");
        assert_eq!(LaggingGateway::new(b, 1).applied, 9);
        assert_eq!(LaggingGateway::new(a, 3).applied, 0);
    }

    #[test]
    fn no_gateway_is_trivially_confirmed() {
        let (live, confirmed, prune) = assess(vec![], 0, 5, 0);
        assert!(live.is_empty() && prune.is_empty());
        assert_eq!(confirmed, 0);
    }
}
