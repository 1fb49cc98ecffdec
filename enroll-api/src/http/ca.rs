//! CA material: the tenant's issuing CA and root (admin), and the public
//! trust bundle.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use oneprotect_identity::TenantId;

use super::{AdminAuth, ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/ca", get(bundle))
        .route("/api/v1/trust-bundle", get(trust_bundle))
}

/// `CaBundle`.
#[derive(Serialize)]
struct CaBundle {
    tenant_id: TenantId,
    issuing_ca_pem: String,
    root_pem: String,
}

async fn bundle(
    State(state): State<AppState>,
    auth: AdminAuth,
) -> Result<Json<CaBundle>, ApiError> {
    let ca = state.ca.clone();
    let tenant = auth.tenant;
    // Creating a tenant CA touches the disk; keep it off the async workers.
    let issuing_ca_pem = tokio::task::spawn_blocking(move || ca.tenant_ca_pem(tenant))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(CaBundle {
        tenant_id: auth.tenant,
        issuing_ca_pem,
        root_pem: state.ca.trust_bundle_pem().to_owned(),
    }))
}

async fn trust_bundle(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/x-pem-file")],
        state.ca.trust_bundle_pem().to_owned(),
    )
}
