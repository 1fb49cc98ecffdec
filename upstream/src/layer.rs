//! The tower [`VerifyLayer`] and the axum extractor [`VerifiedAgent`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse as _, Response};
use http::request::Parts;
use http::Request;

use crate::verify::{Refusal, VerifiedAgent, Verifier};

/// Verifies every request's identity before the inner service sees it:
/// refused requests get a 401 problem+json and never reach the service;
/// verified ones carry their [`VerifiedAgent`] as a request extension.
#[derive(Debug, Clone)]
pub struct VerifyLayer {
    verifier: Verifier,
}

impl VerifyLayer {
    /// A layer verifying with `verifier`.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`VerifyLayer`] wraps around an inner one.
#[derive(Debug, Clone)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Verifier,
}

impl<S, B> tower::Service<Request<B>> for VerifyService<S>
where
    S: tower::Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            match verifier.verify(req.headers()).await {
                Ok(agent) => {
                    tracing::debug!(agent = %agent.agent_id, tenant = %agent.tenant_id, "identity verified");
                    req.extensions_mut().insert(agent);
                    inner.call(req).await
                }
                Err(refusal) => {
                    tracing::info!(reason = %refusal, "identity refused");
                    Ok(refusal.into_response())
                }
            }
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for VerifiedAgent {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Refusal> {
        parts
            .extensions
            .get::<VerifiedAgent>()
            .cloned()
            .ok_or(Refusal::NoLayer)
    }
}
