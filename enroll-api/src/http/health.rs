//! `/healthz` (the process answers) and `/readyz` (storage answers).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::store::{Store, StoreError};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
