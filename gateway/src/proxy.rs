//! The one `ProxyHttp` implementation: route, require identity, check
//! revocation, rewrite headers, proxy. Errors become `pingora::Error` only
//! here.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use oneprotect_identity::problem::{self, Problem, ProblemKind};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::tls::SslDigest;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::assertion::AssertionService;
use crate::conn::{ConnIdentity, Forwarding};
use crate::headers::{inject_identity, set_forwarding, strip_client_headers, StripPolicy};
use crate::metrics::Metrics;
use crate::reports::Reporter;
use crate::revocation::{Decision, Revocation};
use crate::routes::{Route, Router};

/// The proxy.
pub struct Gateway {
    router: Arc<Router>,
    revocation: Arc<Revocation>,
    reporter: Reporter,
    assertions: Arc<AssertionService>,
    metrics: Metrics,
    strip: StripPolicy,
}

impl Gateway {
    /// A proxy over its parts; `strip` says which client headers are
    /// removed beyond the identity and forwarding ones.
    pub fn new(
        router: Arc<Router>,
        revocation: Arc<Revocation>,
        reporter: Reporter,
        assertions: Arc<AssertionService>,
        metrics: Metrics,
        strip: StripPolicy,
    ) -> Self {
        Self {
            router,
            revocation,
            reporter,
            assertions,
            metrics,
            strip,
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request needs exactly one `Host` header
/// (whatever its target form); HTTP/1.0 may omit it but not repeat it.
/// HTTP/2 carries `:authority` instead and is not checked here. Returns
/// why the request is refused.
pub fn host_problem(req: &RequestHeader) -> Option<&'static str> {
    if req.version == http::Version::HTTP_2 {
        return None;
    }
    match req.headers.get_all(http::header::HOST).iter().count() {
        0 if req.version == http::Version::HTTP_11 => {
            Some("an HTTP/1.1 request needs a Host header")
        }
        0 | 1 => None,
        _ => Some("more than one Host header"),
    }
}

/// Why a request for a tunnel is refused on a route that allows the
/// `allowed` upgrade protocols (lower-case; empty: none), if it is.
///
/// A request asks for a tunnel with an `Upgrade` header (any value, e.g.
/// `websocket`, `h2c`), a `Connection` header naming the `upgrade` option
/// (any case, in a list), or the `CONNECT` method (HTTP/1.1, or HTTP/2's
/// extended CONNECT). After a 101 or a 2xx to CONNECT the connection
/// carries opaque bytes the per-request revocation check never sees, so:
/// `CONNECT` is always refused (the gateway is no forward proxy); an
/// `Upgrade` is let through only as RFC 9110 §7.8 frames it (HTTP/1.1,
/// `Connection: upgrade`, one `Upgrade` header naming one protocol) to a
/// protocol the route lists, and the connection then watches its own
/// revocation state ([`crate::revocation::Revocation::watch_tunnel`]).
pub fn upgrade_problem(req: &RequestHeader, allowed: &[String]) -> Option<&'static str> {
    if req.method == http::Method::CONNECT {
        return Some("CONNECT is not allowed");
    }
    let asks = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|opt| opt.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    let mut upgrades = req.headers.get_all(http::header::UPGRADE).iter();
    let Some(first) = upgrades.next() else {
        return asks.then_some("Connection: upgrade is not allowed");
    };
    if allowed.is_empty() {
        return Some("Upgrade is not allowed");
    }
    if req.version != http::Version::HTTP_11 {
        return Some("Upgrade needs HTTP/1.1");
    }
    if !asks {
        return Some("Upgrade needs Connection: upgrade");
    }
    if upgrades.next().is_some() {
        return Some("more than one Upgrade header");
    }
    let protocol = first.as_bytes().trim_ascii();
    // One protocol: with a list the upstream would choose, maybe one the
    // route does not allow.
    if protocol.contains(&b',') {
        return Some("Upgrade must name one protocol");
    }
    let name = protocol.split(|b| *b == b'/').next().unwrap_or_default();
    let listed = allowed.iter().any(|p| {
        p.as_bytes().eq_ignore_ascii_case(protocol) || p.as_bytes().eq_ignore_ascii_case(name)
    });
    (!listed).then_some("Upgrade to this protocol is not allowed on this route")
}

/// Rewrites an absolute-form target (`GET http://host/path HTTP/1.1`) to
/// origin-form (`/path`), with `Host` set to the target's authority, as
/// RFC 9112 §3.2.2 says a server must read it; upstreams get origin-form
/// only. Returns whether it rewrote.
pub fn to_origin_form(req: &mut RequestHeader) -> pingora::Result<bool> {
    let raw = req.raw_path();
    if raw.first() == Some(&b'/') {
        return Ok(false);
    }
    // pingora keeps an HTTP/1 absolute-form target's scheme and authority
    // only in the raw bytes (the Uri holds its path); an HTTP/2 request
    // holds them in the Uri.
    let authority = match req.uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => match target_authority(raw) {
            Some(a) => a,
            None => return Ok(false),
        },
    };
    let path = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "request target"))?;
    req.set_uri(uri);
    req.insert_header(http::header::HOST, authority)?;
    Ok(true)
}

/// The authority of an absolute-form target (`scheme://authority/...`).
fn target_authority(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let (_, rest) = text.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty()).then(|| authority.to_owned())
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    route: Option<Arc<Route>>,
    /// The connection's TLS digest, holding its [`ConnIdentity`] when the
    /// client presented a verified certificate.
    tls: Option<Arc<SslDigest>>,
    /// Identity checked and allowed for this request: inject it.
    inject: bool,
    upstream_sent: Option<Instant>,
    /// Request body bytes seen so far (the limit also holds for chunked
    /// bodies, which carry no Content-Length).
    body_bytes: u64,
    /// The upstream switched protocols (101): the bytes that follow are a
    /// tunnel's, not a body (no body limit), and the connection watches
    /// its revocation state.
    tunnel: bool,
}

impl RequestCtx {
    fn identity(&self) -> Option<&ConnIdentity> {
        self.tls.as_ref()?.extension.get::<ConnIdentity>()
    }
}

/// Seconds since the Unix epoch (the assertions' clock).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Counts and logs a request the revocation check refused with `kind`;
/// a superseded certificate's use is also reported, without waiting, for
/// the enroll-api's audit event (possible key theft, `crate::reports`).
pub(crate) fn refused(
    metrics: &Metrics,
    reporter: &Reporter,
    conn: &ConnIdentity,
    route: &str,
    kind: ProblemKind,
    source: Option<std::net::IpAddr>,
) {
    metrics
        .revocation_refusals
        .with_label_values(&[kind.code])
        .inc();
    tracing::info!(
        code = kind.code,
        tenant = %conn.identity().tenant(),
        agent = %conn.identity().agent(),
        serial = %conn.identity().serial(),
        "request refused by revocation check"
    );
    if kind == problem::CERTIFICATE_SUPERSEDED {
        reporter.report(conn, route, source);
    }
}

/// Counts a request refused because the revocation state is unavailable.
pub(crate) fn refused_unavailable(metrics: &Metrics) {
    metrics
        .revocation_refusals
        .with_label_values(&[problem::REVOCATION_UNAVAILABLE.code])
        .inc();
}

/// Writes a problem+json answer. `close` ends an HTTP/1.1 connection after
/// the response (`connection: close`); on HTTP/2 only the stream ends.
async fn respond_problem(
    session: &mut Session,
    kind: ProblemKind,
    detail: Option<&str>,
    retry_after: Option<u64>,
    close: bool,
) -> pingora::Result<()> {
    let body = Bytes::from(Problem::new(kind, detail.map(str::to_owned)).to_json());
    let mut resp = ResponseHeader::build(kind.status, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, problem::CONTENT_TYPE)?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(s) = retry_after {
        resp.insert_header(http::header::RETRY_AFTER, s)?;
    }
    if close {
        session.set_keepalive(None);
        if !session.is_http2() {
            resp.insert_header(http::header::CONNECTION, "close")?;
        }
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if let Some(why) = host_problem(session.req_header()) {
            respond_problem(session, problem::BAD_REQUEST, Some(why), None, true).await?;
            return Ok(true);
        }
        let Some(route) = self.router.route(session.req_header().uri.path()).cloned() else {
            respond_problem(session, problem::ROUTE_NOT_FOUND, None, None, false).await?;
            return Ok(true);
        };
        if let Some(why) = upgrade_problem(session.req_header(), &route.upgrade_protocols) {
            respond_problem(session, problem::UPGRADE_NOT_ALLOWED, Some(why), None, true).await?;
            return Ok(true);
        }
        ctx.tls = session.digest().and_then(|d| d.ssl_digest.clone());
        if route.require_identity {
            let Some(conn) = ctx.identity() else {
                respond_problem(
                    session,
                    problem::IDENTITY_REQUIRED,
                    Some("present a valid agent client certificate"),
                    None,
                    false,
                )
                .await?;
                ctx.route = Some(route);
                return Ok(true);
            };
            match self.revocation.check(conn).await {
                Decision::Allow => ctx.inject = true,
                Decision::Refuse(kind) => {
                    let source = match session.client_addr() {
                        Some(pingora::protocols::l4::socket::SocketAddr::Inet(a)) => Some(a.ip()),
                        _ => None,
                    };
                    refused(
                        &self.metrics,
                        &self.reporter,
                        conn,
                        &route.prefix,
                        kind,
                        source,
                    );
                    ctx.route = Some(route);
                    respond_problem(session, kind, None, None, true).await?;
                    return Ok(true);
                }
                Decision::Unavailable => {
                    refused_unavailable(&self.metrics);
                    ctx.route = Some(route);
                    let retry = self.revocation.retry_after_secs();
                    respond_problem(
                        session,
                        problem::REVOCATION_UNAVAILABLE,
                        None,
                        Some(retry),
                        false,
                    )
                    .await?;
                    return Ok(true);
                }
            }
        }
        let too_big = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > route.max_body_bytes);
        ctx.route = Some(route);
        if too_big {
            respond_problem(session, problem::PAYLOAD_TOO_LARGE, None, None, true).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.tunnel {
            return Ok(());
        }
        if let (Some(chunk), Some(route)) = (body.as_ref(), ctx.route.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > route.max_body_bytes {
                // fail_to_proxy answers 413 `payload_too_large` and closes.
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body over the route's limit",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::new(ErrorType::InternalError))?;
        let backend = route
            .pool
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no healthy upstream"))?;
        Ok(Box::new(route.peer(backend)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // Always, mTLS or not.
        strip_client_headers(upstream_request, self.strip);
        // HTTP/2 requests carry scheme and authority in the URI too.
        to_origin_form(upstream_request)?;
        // The TCP peer, or the source a trusted balancer's PROXY header
        // named (crate::proxy_protocol).
        if let Some(pingora::protocols::l4::socket::SocketAddr::Inet(client)) =
            session.client_addr()
        {
            // Formatted once per connection where there is one to keep it
            // on (a verified identity: the hot path).
            match ctx.identity() {
                Some(conn) => set_forwarding(upstream_request, &conn.forwarding(client.ip()))?,
                None => set_forwarding(upstream_request, &Forwarding::new(client.ip()))?,
            }
        }
        if ctx.inject {
            if let (Some(conn), Some(route)) = (ctx.identity(), ctx.route.as_deref()) {
                let assertion = conn.assertion(&self.assertions, route, unix_now());
                inject_identity(upstream_request, conn, assertion)?;
            }
        }
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // Only an allowed upgrade request reaches an upstream with an
        // `Upgrade` header (request_filter), and it needed an identity.
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| !r.upgrade_protocols.is_empty())
        {
            if let Some(conn) = ctx.identity() {
                conn.tunnel_opened();
                self.metrics.tunnels_opened.inc();
                ctx.tunnel = true;
            }
        }
        if let (Some(sent), Some(route)) = (ctx.upstream_sent.take(), ctx.route.as_ref()) {
            self.metrics
                .upstream_latency
                .with_label_values(&[route.prefix.as_str()])
                .observe(sent.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let kind = match e.etype() {
            ErrorType::HTTPStatus(503) => Some(problem::UPSTREAM_UNAVAILABLE),
            ErrorType::HTTPStatus(413) => Some(problem::PAYLOAD_TOO_LARGE),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &pingora::ErrorSource::Upstream =>
            {
                Some(problem::GATEWAY_TIMEOUT)
            }
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => Some(problem::BAD_GATEWAY),
                pingora::ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    // Malformed framing (a bad chunk size, say): RFC 9112
                    // answers 400.
                    _ => Some(problem::BAD_REQUEST),
                },
                _ => Some(problem::INTERNAL),
            },
        };
        let code = match kind {
            Some(kind) => {
                tracing::warn!(error = %e, status = kind.status, "request failed");
                if respond_problem(session, kind, None, None, true)
                    .await
                    .is_err()
                {
                    tracing::debug!("could not write the error response");
                }
                kind.status
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // `StatusCode::as_str` is static: no allocation per request.
        let status = session
            .response_written()
            .map_or("0", |r| r.status.as_str());
        let route = ctx.route.as_ref().map_or("none", |r| r.prefix.as_str());
        self.metrics
            .requests
            .with_label_values(&[route, status])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: http::Version, target: &[u8], hosts: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", target, None).unwrap();
        r.set_version(version);
        for h in hosts {
            r.append_header(http::header::HOST, *h).unwrap();
        }
        r
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        use http::Version as V;
        assert!(host_problem(&req(V::HTTP_11, b"/", &[])).is_some());
        assert!(host_problem(&req(V::HTTP_11, b"/", &["a", "b"])).is_some());
        assert!(host_problem(&req(V::HTTP_11, b"/", &["a"])).is_none());
        assert!(host_problem(&req(V::HTTP_10, b"/", &[])).is_none());
        assert!(host_problem(&req(V::HTTP_10, b"/", &["a", "a"])).is_some());
        assert!(host_problem(&req(V::HTTP_2, b"/", &[])).is_none());
    }

    #[test]
    fn every_tunnel_request_is_refused_unless_the_route_allows_it() {
        use http::Version as V;
        let none: &[String] = &[];
        let ws = &["websocket".to_owned()];
        let with = |version: V, hdrs: &[(&str, &str)]| {
            let mut r = req(version, b"/", &["h"]);
            for (n, v) in hdrs {
                r.append_header(n.to_string(), *v).unwrap();
            }
            r
        };
        let h1 = |hdrs: &[(&str, &str)]| with(V::HTTP_11, hdrs);
        // No route allows anything: every spelling of a tunnel is refused.
        assert!(upgrade_problem(&h1(&[("upgrade", "websocket")]), none).is_some());
        assert!(upgrade_problem(&h1(&[("Upgrade", "h2c")]), none).is_some());
        assert!(upgrade_problem(&h1(&[("connection", "Upgrade")]), none).is_some());
        assert!(upgrade_problem(&h1(&[("connection", "keep-alive, UPGRADE ")]), none).is_some());
        assert!(upgrade_problem(&h1(&[("connection", "keep-alive")]), none).is_none());
        assert!(upgrade_problem(&h1(&[("connection", "upgrades")]), none).is_none());
        assert!(upgrade_problem(&h1(&[]), none).is_none());
        let connect = RequestHeader::build("CONNECT", b"upstream:443", None).unwrap();
        assert!(upgrade_problem(&connect, none).is_some());
        assert!(upgrade_problem(&connect, ws).is_some());
        // A route allowing websocket: only a well-formed websocket upgrade.
        let good = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
        ];
        assert_eq!(upgrade_problem(&h1(&good), ws), None);
        assert_eq!(
            upgrade_problem(
                &h1(&[("upgrade", "websocket/13"), ("connection", "upgrade")]),
                ws
            ),
            None
        );
        assert!(
            upgrade_problem(&h1(&[("upgrade", "h2c"), ("connection", "upgrade")]), ws).is_some()
        );
        assert!(upgrade_problem(
            &h1(&[("upgrade", "websocket, h2c"), ("connection", "upgrade")]),
            ws
        )
        .is_some());
        assert!(
            upgrade_problem(&h1(&[("upgrade", "websocket")]), ws).is_some(),
            "no Connection: upgrade"
        );
        assert!(
            upgrade_problem(&h1(&[("connection", "upgrade")]), ws).is_some(),
            "no Upgrade"
        );
        assert!(upgrade_problem(
            &h1(&[
                ("upgrade", "websocket"),
                ("upgrade", "websocket"),
                ("connection", "upgrade")
            ]),
            ws
        )
        .is_some());
        assert!(upgrade_problem(&with(V::HTTP_10, &good), ws).is_some());
        assert!(upgrade_problem(&with(V::HTTP_2, &good), ws).is_some());
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_the_target_host() {
        use http::Version as V;
        let mut r = req(
            V::HTTP_11,
            b"http://upstream.example:8080/api/x?y=1",
            &["other"],
        );
        assert!(to_origin_form(&mut r).unwrap());
        assert_eq!(r.raw_path(), b"/api/x?y=1");
        assert_eq!(r.uri.authority(), None);
        assert_eq!(r.headers[http::header::HOST], "upstream.example:8080");
        assert_eq!(r.headers.get_all(http::header::HOST).iter().count(), 1);
        let mut o = req(V::HTTP_11, b"/api/x", &["h"]);
        assert!(!to_origin_form(&mut o).unwrap());
        assert_eq!(o.raw_path(), b"/api/x");
    }
}
