//! Fetching the gateways' verification keys: the JWK Set the enroll-api
//! publishes at `/.well-known/jwks.json`, over HTTP or HTTPS (with a CA file).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use oneprotect_identity::jwk::MAX_JWKS_BYTES;
use oneprotect_identity::{JwkError, JwkSet};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Why the JWK Set could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The URL is not `http://` or `https://` with a host.
    #[error("JWKS URL {0:?} is not an http(s) URL with a host")]
    BadUrl(String),
    /// An `https://` URL without a CA file to verify the server with.
    #[error("JWKS URL {0:?} is https: a CA file (PEM) to verify the server is needed")]
    NeedsCa(String),
    /// The CA file could not be read or holds no certificate.
    #[error("JWKS CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Connect, TLS or HTTP failed, or it took longer than the timeout.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with another status than 200.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// The document is not a usable JWK Set.
    #[error("fetching {url}: {source}")]
    Document {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: JwkError,
    },
}

/// Where the JWK Set is fetched from.
#[derive(Clone)]
pub struct JwksSource {
    url: String,
    host: String,
    port: u16,
    path_and_query: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl JwksSource {
    /// A source for `url`; `ca_file` (PEM) verifies an `https://` server.
    /// `timeout` bounds each fetch (connect to last byte).
    pub fn new(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<Self, JwksError> {
        let bad = || JwksError::BadUrl(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let tls = if https {
            let ca = ca_file.ok_or_else(|| JwksError::NeedsCa(url.to_owned()))?;
            let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Some((Arc::new(client_config(ca)?), name))
        } else {
            None
        };
        Ok(Self {
            url: url.to_owned(),
            host,
            port,
            path_and_query,
            tls,
            timeout,
        })
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches and parses the set.
    pub async fn fetch(&self) -> Result<JwkSet, JwksError> {
        let body = tokio::time::timeout(self.timeout, self.get())
            .await
            .map_err(|_| self.fail(format!("no answer within {:?}", self.timeout)))??;
        JwkSet::parse(&body).map_err(|source| JwksError::Document {
            url: self.url.clone(),
            source,
        })
    }

    fn fail(&self, reason: String) -> JwksError {
        JwksError::Fetch {
            url: self.url.clone(),
            reason,
        }
    }

    async fn get(&self) -> Result<Bytes, JwksError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let req = Request::get(self.path_and_query.as_str())
            .header(http::header::HOST, host)
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(
                http::header::USER_AGENT,
                concat!("oneprotect-upstream/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.fail(e.to_string()))?;
        match &self.tls {
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| self.fail(format!("TLS: {e}")))?;
                self.exchange(TokioIo::new(tls), req).await
            }
            None => self.exchange(TokioIo::new(tcp), req).await,
        }
    }

    async fn exchange<IO>(&self, io: IO, req: Request<Empty<Bytes>>) -> Result<Bytes, JwksError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.fail(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| self.fail(e.to_string()))?;
            if resp.status() != StatusCode::OK {
                return Err(JwksError::Status {
                    url: self.url.clone(),
                    status: resp.status(),
                });
            }
            Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| self.fail(format!("read body: {e}")))
        }
        .await;
        driver.abort();
        result
    }
}

fn client_config(ca: &Path) -> Result<rustls::ClientConfig, JwksError> {
    let fail = |reason: String| JwksError::Ca {
        path: ca.display().to_string(),
        reason,
    };
    let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| fail(e.to_string()))?;
        roots.add(cert).map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("no CERTIFICATE block".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = Duration::from_secs(1);
        for bad in ["", "ftp://x/jwks", "/jwks.json", "http:///x"] {
            assert!(
                matches!(JwksSource::new(bad, None, t), Err(JwksError::BadUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            JwksSource::new("https://127.0.0.1/jwks", None, t),
            Err(JwksError::NeedsCa(_))
        ));
        let s = JwksSource::new("http://[::1]:8080/.well-known/jwks.json", None, t).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", 8080));
        assert_eq!(s.path_and_query, "/.well-known/jwks.json");
        let dir = std::env::temp_dir().join(format!("jwks-ca-{}", std::process::id()));
        std::fs::write(&dir, "not a pem").unwrap();
        assert!(matches!(
            JwksSource::new("https://localhost/jwks", Some(&dir), t),
            Err(JwksError::Ca { .. })
        ));
        let _ = std::fs::remove_file(dir);
    }
}
