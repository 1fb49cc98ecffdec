//! The outbox relay: one task per replica that publishes committed outbox
//! rows to Redis and keeps the revocation projection in step.
//!
//! For a batch of pending rows, oldest first: apply each row's projection
//! effect (re-read the agent from the store and write its statuses,
//! announcing each; an `agent.enrolled` is written from its payload, see
//! [`ProjectionConn::project_enrolled`]), then `XADD` the batch's events to
//! `{prefix}events` in order (one pipeline); then mark the whole batch sent
//! in one statement. A failure at any step leaves the batch's rows pending
//! (those already written are written again: at least once) and the relay
//! retries after a backoff
//! (in order: later rows wait), so a Redis outage delays the projection and
//! the stream but loses nothing. A crash between the Redis writes and the
//! mark gives a duplicate on restart: delivery is at least once, consumers
//! de-duplicate on `event_id`, and the projection writes are idempotent.
//!
//! The store wakes the relay after every commit that wrote an outbox row
//! ([`AnyStore::relay_waker`], ADR-0019), so a revocation reaches Redis at
//! once; a poll interval covers other replicas' rows and missed wake-ups. On every pass (so at start and within one poll
//! interval of a Redis that restarted empty or was flushed), before any row,
//! the relay rebuilds the projection when `{prefix}projection:built_at` is
//! missing. That `EXISTS` also finds a dead connection when there are no rows
//! to send, so the relay reconnects as soon as Redis is back.
//!
//! Several replicas may relay the same row concurrently; that is one more
//! duplicate, not an inconsistency (statuses only move forward).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use oneprotect_identity::events::Event;

use crate::clock::SharedClock;
use crate::projection::{Projection, ProjectionConn, ProjectionError};
use crate::store::{AnyStore, Store};

/// Rows read per batch.
const BATCH: u32 = 100;
/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Wakes the relay after a commit. The store owns one and wakes it after
/// each commit that wrote an outbox row; cloning shares the same relay.
#[derive(Debug, Clone, Default)]
pub struct RelayWaker(Arc<Notify>);

impl RelayWaker {
    /// A waker with no relay attached yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the relay to look for pending rows now (cheap; never blocks).
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.0.notified().await;
    }
}

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// How often to look for pending rows without a wake-up.
    pub poll_interval: Duration,
    /// Rebuild the projection whenever it is missing (never built, flushed,
    /// or Redis restarted empty); checked on every pass.
    pub rebuild_if_missing: bool,
    /// Replicas that must confirm each event's writes before it is marked
    /// sent (`redis.wait_replicas`, 0: none), and how long to wait.
    pub wait_replicas: u32,
    /// The longest one wait may take.
    pub wait_timeout: Duration,
}

/// Runs the relay until `stop` turns true, woken by `store`'s commits.
pub async fn run(
    store: AnyStore,
    projection: Projection,
    clock: SharedClock,
    settings: RelaySettings,
    mut stop: watch::Receiver<bool>,
) {
    let waker = store.relay_waker().clone();
    let mut conn: Option<ProjectionConn> = None;
    let mut backoff = MIN_BACKOFF;
    loop {
        if *stop.borrow() {
            return;
        }
        let pass = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(projection.connect().await?),
            };
            // Checked on every pass, not only at start: a Redis that restarted
            // empty while this service runs would otherwise leave every gateway
            // failing closed (missing keys) until someone ran `projection
            // rebuild` or the next state change touched Redis.
            if settings.rebuild_if_missing && !c.is_built().await? {
                tracing::warn!(
                    prefix = projection.keys().prefix(),
                    "revocation projection missing (new or flushed Redis, or a fresh in-process bus); rebuilding from the store"
                );
                let stats = c.rebuild(&store, clock.now()).await?;
                tracing::info!(?stats, "revocation projection rebuilt");
            }
            drain(&store, c, &clock, &settings).await
        };
        let wait = match pass.await {
            Ok(()) => {
                backoff = MIN_BACKOFF;
                settings.poll_interval
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay: will retry");
                conn = None;
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                w
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = waker.woken() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Publishes every pending row, in order, stopping at the first failure.
pub async fn drain(
    store: &AnyStore,
    conn: &mut ProjectionConn,
    clock: &SharedClock,
    settings: &RelaySettings,
) -> Result<(), ProjectionError> {
    loop {
        let rows = store.list_pending_events(BATCH).await?;
        if rows.is_empty() {
            return Ok(());
        }
        for row in &rows {
            let e = &row.event;
            conn.project_event(store, e, clock.now()).await?;
            tracing::debug!(seq = row.seq, event_id = %e.event_id, r#type = e.payload.event_type(), "event projected");
        }
        // The stream after the batch's projection, in order, in one
        // pipeline.
        let events: Vec<&Event> = rows.iter().map(|r| &r.event).collect();
        conn.publish_events(&events).await?;
        if settings.wait_replicas > 0 {
            // The whole batch is on the master, so gateways see it now; it is
            // marked sent only once the replicas have it too. Without them it
            // stays pending and is written again on the next pass (delivery is
            // at least once), so a failover cannot lose a row marked sent.
            conn.wait_replicated(settings.wait_replicas, settings.wait_timeout)
                .await?;
        }
        // The whole batch in one statement. A failure before it leaves the
        // batch pending: written again on the next pass (at least once).
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        store.mark_events_sent(&seqs, clock.now()).await?;
        if rows.len() < BATCH as usize {
            return Ok(());
        }
    }
}
