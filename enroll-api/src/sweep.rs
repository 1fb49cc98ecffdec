//! The rotation grace sweep: one task per replica that supersedes the
//! previous certificate of every agent whose rotation grace period ended
//! without the new certificate being seen (ADR-0010).
//!
//! Each supersede runs in its own transaction under the agent's row lock
//! and re-checks the deadline, so replicas racing on the same agent do it
//! once; its `agent.certificate.superseded` event goes through the outbox,
//! whose relay updates the Redis projection.

use std::time::Duration;

use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::store::{AnyStore, Store, StoreError};

/// Agents handled per pass.
const BATCH: u32 = 500;

/// One pass: supersedes every due previous certificate (up to
/// [`BATCH`]); returns how many.
pub async fn sweep_once(store: &AnyStore, clock: &SharedClock) -> Result<u64, StoreError> {
    let now = clock.now();
    let mut n = 0;
    for (tenant, agent) in store.list_rotations_due(now, BATCH).await? {
        if let Some(s) = store.expire_rotation(tenant, agent, now).await? {
            tracing::info!(%tenant, %agent, serial = %s.serial, by = %s.by, "rotation grace ended: previous certificate superseded");
            n += 1;
        }
    }
    Ok(n)
}

/// Runs the sweep every `interval` until `stop` turns true.
pub async fn run(
    store: AnyStore,
    clock: SharedClock,
    metrics: Metrics,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match sweep_once(&store, &clock).await {
            Ok(0) => {}
            // Each supersede's commit woke the relay (ADR-0019).
            Ok(n) => metrics.grace_expired(n),
            Err(e) => tracing::warn!(error = %e, "rotation grace sweep failed; will retry"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
