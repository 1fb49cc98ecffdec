//! `GET /api/v1/projection`: the state of the revocation projection the
//! gateways read, as this replica sees it. For operators: an admin key from
//! a loopback client (on the enroll-api's host, or through an SSH tunnel),
//! like `/metrics`; anyone else gets 404 `route_not_found`. The figures are
//! deployment-wide (every tenant's outbox rows, the Redis error text), which
//! a tenant admin elsewhere has no business seeing.
//!
//! Which backend it is, whether it answers, when it was last built (and in
//! how many shards), the last announcement sequence written per shard, and
//! the outbox rows not yet relayed (and
//! how old the oldest is). The same figures as the metrics, for an operator
//! with an admin key rather than a Prometheus. Whatever the projection's
//! state, the answer is 200: this endpoint reports, it does not probe
//! readiness (`/readyz` does).

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use oneprotect_identity::problem;

use super::{AdminAuth, ApiError, AppState, ClientAddr};
use crate::store::Store;

/// How long the projection and the outbox may take to answer.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The outbox rows counted at most.
const OUTBOX_COUNT_CAP: u32 = 1000;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/projection", get(status))
}

/// `ProjectionStatus`.
#[derive(Debug, Serialize)]
struct ProjectionStatus {
    /// `redis`, `memory` (the dev stack's in-process bus) or `none`.
    backend: &'static str,
    /// The projection answered within the read timeout (`None` without one).
    reachable: Option<bool>,
    /// Why it did not (no secret, no address).
    error: Option<String>,
    /// When it was last fully built, unix seconds.
    built_at: Option<i64>,
    /// The last revocation announcement's sequence number (shard 0's when
    /// sharded).
    sequence: Option<u64>,
    /// The shards this replica writes (`redis.shards`; 1 for the in-process
    /// bus and without a projection).
    shards: u16,
    /// The shard count recorded with the last build
    /// (`{prefix}projection:shards`); gateways compare theirs with it.
    built_shards: Option<u16>,
    /// Every shard's last announcement sequence, by shard (one entry when
    /// unsharded; empty when unreadable or without a projection).
    shard_sequences: Vec<Option<u64>>,
    /// Outbox rows not yet relayed (counted up to 1000).
    outbox_pending: Option<u64>,
    /// Age of the oldest of them, seconds (0 when there is none).
    outbox_oldest_pending_seconds: Option<i64>,
}

async fn status(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    auth: Result<AdminAuth, ApiError>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    // The client, not merely the TCP peer (a trusted gateway's forwarded
    // request from elsewhere is not a loopback caller); checked before the
    // key, so the route does not exist for anyone else.
    if !client.is_some_and(|c| c.is_loopback()) {
        return Err(ApiError::new(problem::ROUTE_NOT_FOUND));
    }
    auth?;
    let mut out = ProjectionStatus {
        backend: "none",
        reachable: None,
        error: None,
        built_at: None,
        sequence: None,
        shards: 1,
        built_shards: None,
        shard_sequences: Vec::new(),
        outbox_pending: None,
        outbox_oldest_pending_seconds: None,
    };
    if let Some(p) = &state.projection {
        out.backend = p.backend_name();
        out.shards = p.keys().shards();
        let read =
            tokio::time::timeout(READ_TIMEOUT, async { p.connect().await?.status().await }).await;
        match read {
            Ok(Ok(st)) => {
                out.reachable = Some(true);
                out.built_at = st.built_at;
                out.built_shards = st.built_shards;
                out.sequence = st.sequences.first().copied().flatten();
                out.shard_sequences = st.sequences;
            }
            Ok(Err(e)) => {
                out.reachable = Some(false);
                out.error = Some(e.to_string());
            }
            Err(_) => {
                out.reachable = Some(false);
                out.error = Some(format!("no answer within {READ_TIMEOUT:?}"));
            }
        }
    }
    if let Ok(Ok(rows)) = tokio::time::timeout(
        READ_TIMEOUT,
        state.store.list_pending_events(OUTBOX_COUNT_CAP),
    )
    .await
    {
        let now = state.clock.now();
        out.outbox_pending = Some(rows.len() as u64);
        out.outbox_oldest_pending_seconds = Some(
            rows.first()
                .map_or(0, |r| (now - r.event.occurred_at).whole_seconds().max(0)),
        );
    }
    Ok(Json(out))
}
