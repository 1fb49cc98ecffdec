//! CA material: the tenant's issuing CA and root (admin), the public
//! trust bundle, each tenant CA's CRL, the root's CRL, and per tenant the
//! combined CRL file (tenant + root) that verifiers checking every CA of the
//! chain (nginx `ssl_crl`, Envoy `crl`) need (all public).

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
        .route("/api/v1/crl", get(root_crl))
        .route("/api/v1/tenants/{tenant_id}/crl-chain", get(crl_chain))
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
    let issuing_ca_pem = tokio::task::spawn_blocking(move || ca.tenant_ca_pem(tenant)).await??;
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

/// `?format=der|pem`; DER when absent.
fn wants_pem(q: Result<Query<CrlQuery>, QueryRejection>) -> Result<bool, ApiError> {
    match q {
        Ok(Query(CrlQuery { format: None })) => Ok(false),
        Ok(Query(CrlQuery { format: Some(f) })) if f == "der" => Ok(false),
        Ok(Query(CrlQuery { format: Some(f) })) if f == "pem" => Ok(true),
        _ => Err(ApiError::invalid("format must be der or pem")),
    }
}

fn crl_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = String::from("-----BEGIN X509 CRL-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(chunk));
        text.push('\n');
    }
    text.push_str("-----END X509 CRL-----\n");
    text
}

/// CRLs may be cached briefly; each is valid for [`CRL_VALIDITY`].
const CRL_CACHE: &str = "public, max-age=60";

fn crl_answer(der: Vec<u8>, pem: bool) -> axum::response::Response {
    if pem {
        (
            [
                (CACHE_CONTROL, CRL_CACHE),
                (CONTENT_TYPE, "application/x-pem-file"),
            ],
            crl_pem(&der),
        )
            .into_response()
    } else {
        (
            [
                (CACHE_CONTROL, CRL_CACHE),
                (CONTENT_TYPE, "application/pkix-crl"),
            ],
            der,
        )
            .into_response()
    }
}

/// The tenant CA's CRL (DER), made from the store; 404 for an unknown tenant.
async fn tenant_crl_der(state: &AppState, tenant: TenantId) -> Result<Vec<u8>, ApiError> {
    if state.store.fetch_tenant(tenant).await?.is_none() {
        return Err(ApiError::new(problem::NOT_FOUND));
    }
    let revoked = state
        .store
        .list_revoked_certificates(tenant, state.clock.now())
        .await?;
    let ca = state.ca.clone();
    tokio::task::spawn_blocking(move || ca.tenant_crl_der(tenant, &revoked, CRL_VALIDITY))
        .await?
        .map_err(ApiError::from)
}

/// The root's CRL (DER). No tenant CA is ever revoked yet: empty.
async fn root_crl_der(state: &AppState) -> Result<Vec<u8>, ApiError> {
    let ca = state.ca.clone();
    tokio::task::spawn_blocking(move || ca.root_crl_der(&[], CRL_VALIDITY))
        .await?
        .map_err(ApiError::from)
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
    let pem = wants_pem(q)?;
    Ok(crl_answer(tenant_crl_der(&state, tenant).await?, pem))
}

/// The platform root's CRL (it revokes tenant CAs), signed by the root.
async fn root_crl(
    State(state): State<AppState>,
    q: Result<Query<CrlQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let pem = wants_pem(q)?;
    Ok(crl_answer(root_crl_der(&state).await?, pem))
}

/// One PEM file with the tenant CA's CRL and then the root's: what nginx's
/// `ssl_crl` and Envoy's `crl` load to check every CA of an agent's chain.
/// No query parameters.
async fn crl_chain(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    q: Result<Query<std::collections::BTreeMap<String, String>>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let tenant: TenantId = path_id(&tenant)?;
    if !q.is_ok_and(|Query(q)| q.is_empty()) {
        return Err(ApiError::invalid("no query parameters are accepted"));
    }
    let tenant_der = tenant_crl_der(&state, tenant).await?;
    let root_der = root_crl_der(&state).await?;
    let text = format!("{}{}", crl_pem(&tenant_der), crl_pem(&root_der));
    Ok((
        [
            (CACHE_CONTROL, CRL_CACHE),
            (CONTENT_TYPE, "application/x-pem-file"),
        ],
        text,
    )
        .into_response())
}
