//! `/healthz` (the process answers), `/readyz` (storage answers) and
//! `/metrics` (Prometheus text; loopback clients only, 404 to anyone else).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use oneprotect_identity::problem;

use super::{ApiError, AppState, ClientAddr};
use crate::store::{Store, StoreError};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn metrics(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
) -> Result<impl IntoResponse, ApiError> {
    // The client, not merely the TCP peer: a remote client's request that a
    // trusted gateway forwards is not a loopback caller.
    if !client.is_some_and(|c| c.is_loopback()) {
        return Err(ApiError::new(problem::ROUTE_NOT_FOUND));
    }
    state
        .metrics
        .update_outbox(&state.store, state.clock.now())
        .await;
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    ))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(json!({"status": "ready"}))),
        // Whatever the cause, not ready means "retry later".
        Err(StoreError::Unavailable(e) | StoreError::Database(e)) => {
            Err(ApiError::Store(StoreError::Unavailable(e)))
        }
        Err(e) => Err(e.into()),
    }
}
