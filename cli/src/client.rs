//! A small HTTP/1.1 client for the admin API: one connection per request
//! (a command makes one to a few), HTTPS verified against `--ca-file` or the
//! system's roots, plain HTTP only as [`ServerUrl::check_transport`] allows,
//! a connect timeout (TCP + TLS handshake), a whole-request timeout and a
//! bounded response body.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use oneprotect_identity::AdminKeySecret;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{CliError, Problem};
use crate::settings::{Scheme, ServerUrl};

/// Default for `--connect-timeout`: TCP connect and TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Default for `--timeout`: the whole request, connect included.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// The largest response body read (a page of 500 agents, 1000 events or a
/// CRL of a tenant with many revocations fit well within it).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The response itself when the status is a success, else
    /// [`CliError::Api`] with the problem document (when the body is one).
    pub fn success(self) -> Result<Response, CliError> {
        if self.status.is_success() {
            return Ok(self);
        }
        Err(CliError::Api {
            status: self.status.as_u16(),
            problem: serde_json::from_slice::<Problem>(&self.body).ok(),
        })
    }

    /// The body as JSON (after [`Response::success`]).
    pub fn json(&self) -> Result<serde_json::Value, CliError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| CliError::Protocol(format!("{}: body is not JSON: {e}", self.status)))
    }
}

/// The client for one server.
#[derive(Clone)]
pub struct Client {
    url: ServerUrl,
    tls: Option<TlsConnector>,
    insecure_http: bool,
    connect_timeout: Duration,
    timeout: Duration,
    verbose: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.url)
    }
}

/// How the client is built.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Allow plain HTTP to a host that is not loopback.
    pub insecure_http: bool,
    /// TCP connect and TLS handshake.
    pub connect_timeout: Duration,
    /// The whole request.
    pub timeout: Duration,
    /// Print each request line and status (never a header) on stderr.
    pub verbose: bool,
}

impl Client {
    /// A client for `url`, trusting the PEM roots in `ca_file` or, when
    /// `None`, the system's roots. Refuses plain HTTP to a non-loopback host
    /// unless allowed.
    pub fn new(
        url: ServerUrl,
        ca_file: Option<&Path>,
        opts: &ClientOptions,
    ) -> Result<Self, CliError> {
        url.check_transport(opts.insecure_http)?;
        let tls = match url.scheme {
            Scheme::Http => None,
            Scheme::Https => Some(TlsConnector::from(tls_config(ca_file)?)),
        };
        Ok(Client {
            url,
            tls,
            insecure_http: opts.insecure_http,
            connect_timeout: opts.connect_timeout,
            timeout: opts.timeout,
            verbose: opts.verbose,
        })
    }

    /// The server's base URL.
    pub fn url(&self) -> &ServerUrl {
        &self.url
    }

    /// `GET path`.
    pub async fn get(
        &self,
        path: &str,
        key: Option<&AdminKeySecret>,
    ) -> Result<Response, CliError> {
        self.send(Method::GET, path, key, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        key: Option<&AdminKeySecret>,
        body: &serde_json::Value,
    ) -> Result<Response, CliError> {
        self.send(Method::POST, path, key, Some(body)).await
    }

    /// Sends one request on a new connection and reads the whole answer,
    /// within `--timeout`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&AdminKeySecret>,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, CliError> {
        let started = Instant::now();
        if self.verbose {
            eprintln!("> {method} {}{path}", self.url);
        }
        let r = tokio::time::timeout(self.timeout, self.send_inner(method, path, key, body))
            .await
            .map_err(|_| CliError::Timeout {
                what: "request",
                after: self.timeout,
            })?;
        if self.verbose {
            match &r {
                Ok(r) => eprintln!(
                    "< {} ({} bytes, {} ms)",
                    r.status,
                    r.body.len(),
                    started.elapsed().as_millis()
                ),
                Err(_) => eprintln!("< failed ({} ms)", started.elapsed().as_millis()),
            }
        }
        r
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        key: Option<&AdminKeySecret>,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, CliError> {
        let uri = format!("{}{path}", self.url.prefix);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, self.url.authority())
            .header(
                http::header::USER_AGENT,
                concat!("oneprotect-cli/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::ACCEPT, "application/json, */*;q=0.5");
        if let Some(key) = key {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                .map_err(|_| CliError::usage("the admin key cannot be sent in a header"))?;
            v.set_sensitive(true);
            req = req.header(http::header::AUTHORIZATION, v);
        }
        let bytes =
            match body {
                Some(b) => {
                    req = req.header(http::header::CONTENT_TYPE, "application/json");
                    Bytes::from(serde_json::to_vec(b).map_err(|e| {
                        CliError::Protocol(format!("encoding the request failed: {e}"))
                    })?)
                }
                None => Bytes::new(),
            };
        // The builder's errors name the part (uri, header) but never a value.
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| CliError::usage(format!("cannot build the request: {e}")))?;

        let tcp = tokio::time::timeout(self.connect_timeout, self.connect())
            .await
            .map_err(|_| CliError::Timeout {
                what: "connect",
                after: self.connect_timeout,
            })??;
        match &self.tls {
            None => exchange(tcp, req, &self.url.authority()).await,
            Some(tls) => {
                let name = ServerName::try_from(self.url.host.clone())
                    .map_err(|_| CliError::usage(format!("invalid host {:?}", self.url.host)))?;
                let handshake = tls.connect(name, tcp);
                let stream = tokio::time::timeout(self.connect_timeout, handshake)
                    .await
                    .map_err(|_| CliError::Timeout {
                        what: "connect",
                        after: self.connect_timeout,
                    })?
                    .map_err(|e| self.tls_error(e))?;
                exchange(stream, req, &self.url.authority()).await
            }
        }
    }

    /// Connects to the first address of the host that answers. For plain
    /// HTTP without `--insecure-http`, only loopback addresses are tried:
    /// `localhost` that resolves elsewhere is refused, not followed.
    async fn connect(&self) -> Result<TcpStream, CliError> {
        let authority = self.url.authority();
        let fail = |reason: String| CliError::Connect {
            addr: authority.clone(),
            reason,
        };
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|e| fail(format!("cannot resolve the host: {e}")))?
                .collect();
        let loopback_only = self.url.scheme == Scheme::Http && !self.insecure_http;
        let mut last = None;
        for addr in addrs {
            if loopback_only && !addr.ip().is_loopback() {
                last = Some(CliError::usage(format!(
                    "refusing plain http:// to {addr}: {} resolved to an address that is \
                     not loopback (use https:// or --insecure-http)",
                    self.url.host
                )));
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = Some(fail(e.to_string())),
            }
        }
        Err(last.unwrap_or_else(|| fail("the host has no address".into())))
    }

    fn tls_error(&self, e: std::io::Error) -> CliError {
        let addr = self.url.authority();
        // rustls reports protocol failures (a certificate that does not
        // verify, a bad alert) inside the io::Error; anything else is the
        // network.
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => CliError::Tls {
                addr,
                reason: r.to_string(),
            },
            None => CliError::Connect {
                addr,
                reason: format!("TLS handshake: {e}"),
            },
        }
    }
}

async fn exchange<S>(
    io: S,
    req: Request<Full<Bytes>>,
    authority: &str,
) -> Result<Response, CliError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |reason: String| CliError::Connect {
        addr: authority.to_owned(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(format!("sending the request: {e}")))?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                CliError::Protocol(format!(
                    "the answer is larger than {} MiB",
                    MAX_RESPONSE_BYTES / (1024 * 1024)
                ))
            } else {
                fail(format!("reading the answer: {e}"))
            }
        })?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status: parts.status,
        body,
    })
}

/// The rustls client configuration: ring, TLS 1.2+, roots from `ca_file`
/// or the system's.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, CliError> {
    let roots = match ca_file {
        Some(path) => roots_from_file(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Protocol(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Every certificate of a PEM file as a trust anchor; at least one.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, CliError> {
    let bad = |why: String| CliError::usage(format!("CA file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, CliError> {
    let mut roots = RootCertStore::empty();
    // Unreadable or odd system certificates are skipped, as browsers do.
    if let Ok(certs) = rustls_native_certs::load_native_certs() {
        let _ = roots.add_parsable_certificates(certs);
    }
    if roots.is_empty() {
        return Err(CliError::usage(
            "no system CA certificates found: give --ca-file PEM (for the dev stack: \
             .data/dev/enroll-api/tls/dev-cert.pem)",
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ClientOptions {
        ClientOptions {
            insecure_http: false,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            verbose: false,
        }
    }

    #[test]
    fn errors_carry_the_problem_document() {
        let r = Response {
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(
                br#"{"type":"https://oneprotect.dev/problems/not_found","title":"Resource not found","status":404,"code":"not_found"}"#,
            ),
        };
        let e = r.success().unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::NOT_FOUND);
        assert_eq!(e.to_string(), "Resource not found (not_found, HTTP 404)");
        let ok = Response {
            status: StatusCode::OK,
            body: Bytes::from_static(b"{\"a\":1}"),
        };
        assert_eq!(ok.success().unwrap().json().unwrap()["a"], 1);
    }

    #[test]
    fn plain_http_to_remote_is_refused_before_any_connection() {
        let url = ServerUrl::parse("http://enroll.example:8446").unwrap();
        let e = Client::new(url, None, &opts()).unwrap_err();
        assert!(matches!(e, CliError::Usage(_)), "{e}");
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        assert!(matches!(roots_from_file(&p), Err(CliError::Usage(_))));
        assert!(matches!(
            roots_from_file(&dir.path().join("missing.pem")),
            Err(CliError::Usage(_))
        ));
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        // Bind then drop: nothing listens on the port a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = ServerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let c = Client::new(url, None, &opts()).unwrap();
        let e = c.get("/healthz", None).await.unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::UNAVAILABLE, "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_huge_answer_is_cut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let (s, _) = silent.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let url = ServerUrl::parse(&format!("http://{addr}")).unwrap();
        let c = Client::new(
            url,
            None,
            &ClientOptions {
                timeout: Duration::from_millis(300),
                ..opts()
            },
        )
        .unwrap();
        let e = c.get("/healthz", None).await.unwrap_err();
        assert!(
            matches!(
                e,
                CliError::Timeout {
                    what: "request",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.exit_code(), crate::error::exit::UNAVAILABLE);
        hold.abort();

        let big = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = big.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = big.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let len = MAX_RESPONSE_BYTES + 1;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min(len - sent);
                if s.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
        });
        let url = ServerUrl::parse(&format!("http://{addr}")).unwrap();
        let c = Client::new(url, None, &opts()).unwrap();
        let e = c.get("/x", None).await.unwrap_err();
        assert!(matches!(e, CliError::Protocol(_)), "{e}");
    }
}
