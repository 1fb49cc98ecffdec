//! The admin listener: `/metrics`, `/healthz`, `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::revocation::Revocation;
use crate::tls::TrustStore;

/// The admin HTTP app.
pub struct AdminApp {
    metrics: Metrics,
    revocation: Arc<Revocation>,
    trust: Arc<TrustStore>,
    listening: Arc<AtomicBool>,
}

impl AdminApp {
    /// An admin app over the gateway's state.
    /// `listening` turns true once the mTLS listener's socket is bound.
    pub fn new(
        metrics: Metrics,
        revocation: Arc<Revocation>,
        trust: Arc<TrustStore>,
        listening: Arc<AtomicBool>,
    ) -> Self {
        Self {
            metrics,
            revocation,
            trust,
            listening,
        }
    }

    /// Ready when the mTLS listener is bound, a trust bundle is loaded and
    /// Redis was confirmed within `max_staleness`.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.listening.load(Ordering::Acquire) {
            return Err("mTLS listener not bound yet");
        }
        if self.trust.current().is_empty() {
            return Err("trust bundle not loaded");
        }
        if !self.revocation.is_confirmed() {
            return Err("revocation state not confirmed within max_staleness");
        }
        Ok(())
    }
}

fn text(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                self.revocation.update_gauges();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            "/healthz" => text(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => match self.ready() {
                Ok(()) => text(StatusCode::OK, "text/plain", b"ready\n".to_vec()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n").into_bytes(),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}
