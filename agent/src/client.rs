//! A small HTTPS client: one TLS connection per request, HTTP/1.1, bounded
//! by a timeout. Agents talk rarely; the bench harness has its own pooled
//! load generator.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{AgentError, ApiProblem};

/// Default time allowed for connect + handshake + request + response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read (certificates and small JSON documents).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// An HTTPS server and the TLS configuration used to reach it.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint(https://{}:{})", self.host, self.port)
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Response {
    /// The body as a problem document, when the status is an error and the
    /// body parses as one.
    pub fn problem(&self) -> Option<ApiProblem> {
        if self.status.is_success() {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }

    /// Deserialises a success body, or turns an error answer into
    /// [`AgentError::Api`] / [`AgentError::Protocol`].
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, AgentError> {
        if !self.status.is_success() {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| AgentError::Protocol(format!("{}: {e}", self.status)))
    }

    /// The error this (non-success) response represents.
    pub fn error(&self) -> AgentError {
        match self.problem() {
            Some(p) => AgentError::Api(p),
            None => AgentError::Protocol(format!(
                "{} with a body that is not a problem document",
                self.status
            )),
        }
    }
}

impl Endpoint {
    /// An endpoint for `url` (`https://host[:port]`, no path) using `tls`.
    /// Plain `http://` is refused: tokens and identities travel only over TLS.
    pub fn new(url: &str, tls: Arc<ClientConfig>) -> Result<Self, AgentError> {
        let bad = |reason| AgentError::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("only https:// is supported"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
            return Err(bad(
                "expected https://host[:port] without path, query or userinfo",
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed IPv6 bracket"))?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
                None if p.is_empty() => 443,
                None => return Err(bad("invalid port")),
            };
            (h.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("invalid port"))?),
                None => (rest.to_owned(), 443),
            }
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad("invalid host"))?;
        Ok(Self {
            host,
            port,
            server_name,
            tls,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same endpoint with another TLS configuration (e.g. after rotation).
    pub fn with_tls(&self, tls: Arc<ClientConfig>) -> Self {
        Self {
            tls,
            ..self.clone()
        }
    }

    /// The same endpoint with another overall request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `https://host:port`.
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }

    /// Sends one request on a new connection and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, AgentError> {
        let addr = format!("{}:{}", self.host, self.port);
        tokio::time::timeout(
            self.timeout,
            self.request_inner(&addr, method, path, headers, body),
        )
        .await
        .map_err(|_| AgentError::Timeout(addr.clone()))?
    }

    /// Sends a JSON body with `POST`.
    pub async fn post_json<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<Response, AgentError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| AgentError::Protocol(format!("encode request: {e}")))?;
        self.request(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            Some(bytes),
        )
        .await
    }

    async fn request_inner(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, AgentError> {
        let fail = |reason: String| AgentError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });

        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{}", self.port))
            .header(
                "user-agent",
                concat!("oneprotect-agent/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            let v = HeaderValue::from_str(v)
                .map_err(|_| AgentError::Protocol(format!("invalid header value for {k}")))?;
            req = req.header(*k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Protocol(format!("build request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| fail(format!("read body: {e}")))?
            .to_bytes();
        driver.abort();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Arc<ClientConfig> {
        crate::tls::server_only(rustls::RootCertStore::empty()).unwrap()
    }

    #[test]
    fn parses_https_urls_and_refuses_others() {
        let e = Endpoint::new("https://127.0.0.1:8443", tls()).unwrap();
        assert_eq!(e.url(), "https://127.0.0.1:8443");
        let e = Endpoint::new("https://gateway.example/", tls()).unwrap();
        assert_eq!(e.url(), "https://gateway.example:443");
        let e = Endpoint::new("https://[::1]:9443", tls()).unwrap();
        assert_eq!(e.url(), "https://[::1]:9443");
        for bad in [
            "http://127.0.0.1:8080",
            "https://",
            "https://h:notaport",
            "https://h:1/path",
            "https://u@h:1",
            "ftp://h",
        ] {
            assert!(Endpoint::new(bad, tls()).is_err(), "{bad}");
        }
    }
}
