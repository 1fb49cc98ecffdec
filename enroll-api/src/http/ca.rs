//! CA material: the tenant's issuing CA and root (admin), the public
//! trust bundle, and each tenant CA's CRL (public).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use oneprotect_identity::{problem, TenantId};

use super::{path_id, AdminAuth, ApiError, AppState};
use crate::store::Store;

/// A CRL's nextUpdate is this long after its thisUpdate.
const CRL_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3600);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/ca", get(bundle))
        .route("/api/v1/trust-bundle", get(trust_bundle))
        .route("/api/v1/tenants/{tenant_id}/crl", get(crl))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CrlQuery {
    format: Option<String>,
}

/// The tenant CA's CRL, made from the store at each request: always current
/// (a revocation shows in the next response), signed by the tenant CA.
/// Public: a CRL holds only serials and dates.
async fn crl(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    q: Result<Query<CrlQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let tenant: TenantId = path_id(&tenant)?;
    let pem = match q {
        Ok(Query(CrlQuery { format: None })) => false,
        Ok(Query(CrlQuery { format: Some(f) })) if f == "der" => false,
        Ok(Query(CrlQuery { format: Some(f) })) if f == "pem" => true,
        _ => return Err(ApiError::invalid("format must be der or pem")),
    };
    if state.store.fetch_tenant(tenant).await?.is_none() {
        return Err(ApiError::new(problem::NOT_FOUND));
    }
    let revoked = state
        .store
        .list_revoked_certificates(tenant, state.clock.now())
        .await?;
    let ca = state.ca.clone();
    let der =
        tokio::task::spawn_blocking(move || ca.tenant_crl_der(tenant, &revoked, CRL_VALIDITY))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    let cache = [(CACHE_CONTROL, "public, max-age=60")];
    Ok(if pem {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let mut text = String::from("-----BEGIN X509 CRL-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            text.push_str(&String::from_utf8_lossy(chunk));
            text.push('\n');
        }
        text.push_str("-----END X509 CRL-----\n");
        (cache, [(CONTENT_TYPE, "application/x-pem-file")], text).into_response()
    } else {
        (cache, [(CONTENT_TYPE, "application/pkix-crl")], der).into_response()
    })
}
