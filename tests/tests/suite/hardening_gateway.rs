//! Issue 15, gateway part: the trust boundary between clients and the
//! upstreams that act on the gateway's headers, over real sockets, with
//! independent clients where it matters (raw bytes over rustls, `curl`,
//! `openssl s_client`) and an upstream that records the exact request line
//! and header names it received.
//!
//! Run: `cargo test -p oneprotect-tests --test suite hardening_gateway::`
//! (needs Redis on 127.0.0.1:6379, `curl` with HTTP/2 and `openssl` on the
//! PATH). The rows are in `docs/bad-input.md`, "Gateway trust boundary
//! (issue 15)".

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use oneprotect_identity::{headers, AgentIdentity};
use oneprotect_testpki::LeafSpec;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::gateway::{
    h1_send, only, refused, seen_paths, start_gateway, upstream_headers, Gw, Opts, EXCHANGE,
};
use crate::support::gateway_toml::RouteToml;
use crate::support::metrics::counter;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// An upstream that reads one request head per connection and answers
/// with it as JSON: the request line exactly as received and every header
/// line's name and value as received (no HTTP library in between).
async fn start_raw_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                let read_head = async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                };
                if !tokio::time::timeout(Duration::from_secs(10), read_head)
                    .await
                    .unwrap_or(false)
                {
                    return;
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut lines = text.split("\r\n");
                let request_line = lines.next().unwrap_or_default().to_owned();
                let headers: Vec<Value> = lines
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| serde_json::json!([n, v.trim()]))
                    .collect();
                let body = serde_json::json!({"request_line": request_line, "headers": headers})
                    .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A gateway with the test echo on `/api` and the raw upstream on `/raw`
/// (identity required) and `/open-raw` (no identity), plus `extra` config
/// appended at the end and `listener` keys in `[listener]`.
async fn gateway(listener: &str, extra: &str) -> Gw {
    gateway_with(listener, Vec::new(), extra).await
}

/// [`gateway`] with `routes` after the raw upstream's.
async fn gateway_with(listener: &str, routes: Vec<RouteToml>, extra: &str) -> Gw {
    let raw = start_raw_upstream().await;
    let mut all = vec![
        RouteToml::new("/raw", raw).without_health_check(),
        RouteToml::new("/open-raw", raw)
            .without_health_check()
            .without_identity(),
    ];
    all.extend(routes);
    start_gateway(Opts {
        listener_extra: listener.into(),
        routes: all,
        extra_routes: extra.into(),
        ..Opts::shared_redis()
    })
    .await
}

/// Connects to the gateway from `from` (a loopback address; the OS picks
/// when `None`) and sends `prefix` before anything else.
async fn tcp_from(gw: &Gw, from: Option<IpAddr>, prefix: &[u8]) -> std::io::Result<TcpStream> {
    let mut tcp = match from {
        None => TcpStream::connect(gw.addr).await?,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(gw.addr).await?
        }
    };
    if !prefix.is_empty() {
        tcp.write_all(prefix).await?;
    }
    Ok(tcp)
}

/// An mTLS (good certificate) HTTP/1.1 connection over `tcp`.
async fn tls_over(
    gw: &Gw,
    tcp: TcpStream,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio_rustls::TlsConnector::from(gw.client(Some((&gw.leaf, &gw.ca)), alpn))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Reads until the peer closes or `bound` passes; true when it closed.
async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S, bound: Duration) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&out).into_owned()),
        }
    }
}

/// Sends `raw` on a fresh mTLS HTTP/1.1 connection (good certificate) and
/// returns what came back until the gateway closed (at most 20 s, which
/// fails the test: every case here ends with the connection closed).
async fn raw_h1(gw: &Gw, raw: &[u8]) -> String {
    let tcp = tcp_from(gw, None, b"").await.unwrap();
    let mut tls = tls_over(gw, tcp, b"http/1.1").await.unwrap();
    tls.write_all(raw).await.unwrap();
    tls.flush().await.unwrap();
    let (closed, out) = read_until_closed(&mut tls, Duration::from_secs(20)).await;
    assert!(closed, "not closed: {out}");
    out
}

/// The status and parsed body of the one response in `out`.
fn one_response(out: &str) -> (u16, String, Value) {
    // Status lines start a line (a problem's detail may mention HTTP/1.1).
    let statuses: Vec<usize> = out
        .match_indices("HTTP/1.")
        .map(|(i, _)| i)
        .filter(|&i| i == 0 || out[..i].ends_with('\n'))
        .collect();
    assert_eq!(statuses.len(), 1, "exactly one response: {out}");
    let (head, body) = out.split_once("\r\n\r\n").expect("a whole response");
    let status = head[9..12].parse().unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Asserts a problem+json answer of `status` and `code` that closes the
/// connection.
fn assert_problem(out: &str, status: u16, code: &str, case: &str) {
    let (got, head, body) = one_response(out);
    assert_eq!(got, status, "{case}: {out}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{case}: {out}"
    );
    assert!(head.contains("connection: close"), "{case}: {out}");
    assert_eq!(body["code"], code, "{case}: {out}");
}

const FAILURES: &str = "oneprotect_gateway_handshake_failures_total";

/// The certificate verifier's reasons (`tls::VerifyError::reason`).
const VERIFIER_REASONS: [&str; 9] = [
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "bad_signature",
    "bad_eku",
    "invalid_path",
    "tenant_mismatch",
    "invalid_identity",
    "trust_domain",
];

/// The header names (lower case) of the raw upstream's JSON answer.
fn raw_names(body: &Value) -> Vec<String> {
    body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_ascii_lowercase())
        .collect()
}

/// The values of header `name` (case-insensitive) in the raw upstream's answer.
fn raw_values(body: &Value, name: &str) -> Vec<String> {
    body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect()
}

/// How a CGI/WSGI/PHP/Rack application sees a header name.
fn cgi(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// `curl` against the gateway with the agent certificate (or none);
/// `http2` picks the protocol. Returns the parsed JSON body.
async fn curl(gw: &Gw, path: &str, with_cert: bool, http2: bool, hdrs: &[&str]) -> Value {
    let (chain, key, root) = gw.client_pem_files();
    let port = gw.addr.port();
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&root)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(if http2 { "--http2" } else { "--http1.1" });
    for h in hdrs {
        c.args(["-H", h]);
    }
    if with_cert {
        c.arg("--cert").arg(&chain).arg("--key").arg(&key);
    }
    c.arg(format!("https://localhost:{port}{path}"));
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&out.stdout)))
}

// ---------------------------------------------------------------------------------------------
// 1. header-name equivalence
// ---------------------------------------------------------------------------------------------

/// The underscore spellings of the identity headers, as the issue lists them.
const UNDERSCORE_SPOOFS: &[&str] = &[
    "x_oneprotect_tenant_id: 00000000-0000-4000-8000-000000000000",
    "X_OneProtect_Agent_Id: 11111111-1111-4111-8111-111111111111",
    "x-oneprotect_spiffe_id: spiffe://evil/tenant/x/agent/y",
    "x_forwarded_client_cert: By=evil;URI=spiffe://evil",
    "client_cert: :Zm9v:",
    "X_Custom_Thing: harmless-but-underscored",
];

/// Asserts that the upstream saw no name an application would fold into a
/// protected one except the gateway's own, nothing with `_` (unless
/// `underscores_kept`), and the verified identity.
fn assert_no_underscore_spoof(gw: &Gw, names: &[String], agent: &str, underscores_kept: bool) {
    for n in names {
        if headers::is_client_identity_header(&cgi(n)) {
            assert!(
                headers::INJECTED.contains(&n.as_str()),
                "{n} reached the upstream"
            );
        }
        assert!(
            underscores_kept || !n.contains('_'),
            "{n} reached the upstream"
        );
    }
    assert_eq!(agent, gw.id.agent().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_underscore_identity_headers_never_reach_the_upstream() {
    let gw = gateway("", "").await;
    // Raw bytes over TLS: the names reach the gateway exactly as written.
    let mut raw = "GET /raw/underscores HTTP/1.1\r\nHost: localhost\r\n".to_owned();
    for h in UNDERSCORE_SPOOFS {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("Connection: close\r\n\r\n");
    let out = raw_h1(&gw, raw.as_bytes()).await;
    let (status, _, body) = one_response(&out);
    assert_eq!(status, 200, "{out}");
    let names = raw_names(&body);
    let agent = raw_values(&body, headers::AGENT_ID);
    assert_eq!(agent.len(), 1, "{body}");
    assert_no_underscore_spoof(&gw, &names, &agent[0], false);
    assert!(!out.contains("spoof") && !out.contains("evil"), "{out}");

    // curl over HTTP/1.1 and HTTP/2, with a certificate and without (the
    // certificate-less exchange route).
    for http2 in [false, true] {
        let body = curl(&gw, "/api/underscores", true, http2, UNDERSCORE_SPOOFS).await;
        let names: Vec<String> = body["headers"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_no_underscore_spoof(
            &gw,
            &names,
            body["headers"][headers::AGENT_ID][0].as_str().unwrap(),
            false,
        );
        assert!(!body.to_string().contains("evil"), "http2={http2}: {body}");
        let body = curl(&gw, EXCHANGE, false, http2, UNDERSCORE_SPOOFS).await;
        let names: Vec<String> = body["headers"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.contains('_') || headers::is_client_identity_header(&cgi(n))),
            "http2={http2}: {names:?}"
        );
    }
    gw.cleanup().await;

    // headers.allow_underscores = true keeps other underscored names; the
    // protected ones stay out in every spelling.
    let gw = gateway("", "[headers]\nallow_underscores = true\n").await;
    for http2 in [false, true] {
        let body = curl(&gw, "/api/underscores", true, http2, UNDERSCORE_SPOOFS).await;
        let h = body["headers"].as_object().unwrap();
        let names: Vec<String> = h.keys().cloned().collect();
        assert_eq!(
            h["x_custom_thing"],
            serde_json::json!(["harmless-but-underscored"]),
            "http2={http2}: {body}"
        );
        assert_no_underscore_spoof(&gw, &names, h[headers::AGENT_ID][0].as_str().unwrap(), true);
        assert!(!body.to_string().contains("evil"), "http2={http2}: {body}");
    }
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. forwarding headers and trusted proxies
// ---------------------------------------------------------------------------------------------

const FORWARDING_SPOOFS: &[&str] = &[
    "X-Forwarded-For: 203.0.113.66",
    "Forwarded: for=203.0.113.66;proto=http",
    "X-Real-IP: 203.0.113.66",
    "X-Forwarded-Host: evil.example",
    "X-Forwarded-Proto: http",
];

/// The upstream sees exactly one of each forwarding header, naming `ip`,
/// and nothing the client sent.
fn assert_forwarding(h: &serde_json::Map<String, Value>, ip: &str, case: &str) {
    assert_eq!(h["x-forwarded-for"], serde_json::json!([ip]), "{case}");
    assert_eq!(h["x-real-ip"], serde_json::json!([ip]), "{case}");
    assert_eq!(
        h["forwarded"],
        serde_json::json!([format!("for={ip}")]),
        "{case}"
    );
    assert!(!h.contains_key("x-forwarded-host"), "{case}");
    assert!(!h.contains_key("x-forwarded-proto"), "{case}");
    assert!(
        !Value::Object(h.clone())
            .to_string()
            .contains("203.0.113.66"),
        "{case}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_forwarding_headers_are_the_gateways_own() {
    let gw = gateway("", "").await;
    for http2 in [false, true] {
        let body = curl(&gw, "/api/fwd", true, http2, FORWARDING_SPOOFS).await;
        assert_forwarding(
            body["headers"].as_object().unwrap(),
            "127.0.0.1",
            &format!("mtls http2={http2}"),
        );
        let body = curl(&gw, EXCHANGE, false, http2, FORWARDING_SPOOFS).await;
        assert_forwarding(
            body["headers"].as_object().unwrap(),
            "127.0.0.1",
            &format!("exchange http2={http2}"),
        );
    }
    // From another loopback address: the TCP peer it is.
    let tcp = tcp_from(&gw, Some("127.0.0.3".parse().unwrap()), b"")
        .await
        .unwrap();
    let tls = tls_over(&gw, tcp, b"http/1.1").await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let spoofs: Vec<(&str, &str)> = FORWARDING_SPOOFS
        .iter()
        .map(|h| h.split_once(": ").unwrap())
        .collect();
    let r = h1_send(&mut s, "/api/fwd3", &spoofs).await.unwrap();
    assert_eq!(r.status, 200);
    assert_forwarding(upstream_headers(&r), "127.0.0.3", "from 127.0.0.3");
    gw.cleanup().await;
}

/// `listener.trusted_proxies`: a connection from a listed balancer must
/// start with a PROXY protocol v2 header whose source becomes the client
/// address; everyone else is named by the TCP peer and cannot send one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_proxy_protocol_only_from_trusted_balancers() {
    let gw = gateway("trusted_proxies = [\"127.0.0.2/32\"]", "").await;
    let client: SocketAddr = "198.51.100.23:40123".parse().unwrap();
    let header = oneprotect_gateway::proxy_protocol::encode_v2(client, gw.addr);
    let send = |tls: tokio_rustls::client::TlsStream<TcpStream>| async move {
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        h1_send(&mut s, "/api/pp", &[("X-Forwarded-For", "203.0.113.66")])
            .await
            .unwrap()
    };
    // The balancer with a header: the header's source is the client.
    let tcp = tcp_from(&gw, Some("127.0.0.2".parse().unwrap()), &header)
        .await
        .unwrap();
    let r = send(tls_over(&gw, tcp, b"http/1.1").await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_forwarding(upstream_headers(&r), "198.51.100.23", "via the balancer");
    assert_eq!(only(&r, headers::AGENT_ID), gw.id.agent().to_string());

    // A LOCAL header (the balancer's health check): the TCP peer.
    let mut local = oneprotect_gateway::proxy_protocol::SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let tcp = tcp_from(&gw, Some("127.0.0.2".parse().unwrap()), &local)
        .await
        .unwrap();
    let r = send(tls_over(&gw, tcp, b"http/1.1").await.unwrap()).await;
    assert_forwarding(upstream_headers(&r), "127.0.0.2", "LOCAL");

    let before = gw.admin_get("/metrics").await.1;
    // The balancer without a header: refused before TLS.
    let tcp = tcp_from(&gw, Some("127.0.0.2".parse().unwrap()), b"")
        .await
        .unwrap();
    assert!(
        tls_over(&gw, tcp, b"http/1.1").await.is_err(),
        "no PROXY header from a trusted balancer"
    );
    // A client not listed cannot claim an address: its header is not TLS.
    let tcp = tcp_from(&gw, None, &header).await.unwrap();
    assert!(
        tls_over(&gw, tcp, b"http/1.1").await.is_err(),
        "PROXY header from an untrusted peer"
    );
    // And without one it is named by its TCP peer.
    let tcp = tcp_from(&gw, None, b"").await.unwrap();
    let r = send(tls_over(&gw, tcp, b"http/1.1").await.unwrap()).await;
    assert_forwarding(upstream_headers(&r), "127.0.0.1", "untrusted peer");

    let after = gw.admin_get("/metrics").await.1;
    assert_eq!(
        counter(&after, FAILURES, "proxy_protocol") - counter(&before, FAILURES, "proxy_protocol"),
        1,
        "{after}"
    );
    assert_eq!(
        counter(&after, FAILURES, "not_tls") - counter(&before, FAILURES, "not_tls"),
        1,
        "{after}"
    );
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 5. HTTP/1.1 conformance
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_http11_host_chunks_and_absolute_form() {
    let gw = gateway("", "").await;
    let id = uuid::Uuid::new_v4().simple().to_string();

    let out = raw_h1(
        &gw,
        format!("GET /api/nohost-{id} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_problem(&out, 400, "bad_request", "h1_no_host");
    // Refused by pingora's parser before any filter: 400, empty body.
    let out = raw_h1(
        &gw,
        format!("GET /api/twohosts-{id} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(one_response(&out).0, 400, "h1_two_hosts: {out}");
    let out = raw_h1(
        &gw,
        format!(
            "GET https://localhost/api/mismatch-host-{id} HTTP/1.1\r\nHost: other.example\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(
        one_response(&out).0,
        400,
        "h1_absolute_form_other_host: {out}"
    );
    // Absolute-form without Host is still HTTP/1.1 without Host.
    let out = raw_h1(
        &gw,
        format!("GET https://localhost/api/abs-nohost-{id} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_problem(&out, 400, "bad_request", "h1_absolute_form_no_host");
    // HTTP/1.0 may omit Host.
    let out = raw_h1(&gw, b"GET /raw/http10 HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "{out}"
    );

    for (case, size) in [
        ("chunk_size_not_hex", "zz"),
        ("chunk_size_overflow", "fffffffffffffffffffff"),
    ] {
        let out = raw_h1(
            &gw,
            format!(
                "POST /api/chunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_problem(&out, 400, "bad_request", case);
    }

    // Absolute-form: the upstream gets origin-form and the target's host.
    let out = raw_h1(
        &gw,
        b"GET https://localhost:8443/raw/abs?q=1 HTTP/1.1\r\nHost: localhost:8443\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (status, _, body) = one_response(&out);
    assert_eq!(status, 200, "{out}");
    assert_eq!(body["request_line"], "GET /raw/abs?q=1 HTTP/1.1", "{body}");
    assert_eq!(raw_values(&body, "host"), ["localhost:8443"], "{body}");

    let seen = seen_paths().lock().unwrap().clone();
    assert!(
        !seen.iter().any(|p| p.contains(&id)),
        "a Host-less request reached the upstream: {seen:?}"
    );
    // Still serving.
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 6. handshake failures
// ---------------------------------------------------------------------------------------------

/// Runs `openssl s_client` with `args` against the gateway (stdin closed);
/// returns whether it reported a completed handshake.
async fn s_client(gw: &Gw, args: &[&str]) -> bool {
    let mut c = std::process::Command::new("openssl");
    c.args([
        "s_client",
        "-connect",
        &gw.addr.to_string(),
        "-servername",
        "localhost",
    ])
    .args(args)
    .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.contains("Cipher is ") && !text.contains("Cipher is (NONE)")
}

/// Every failed handshake is counted under a bounded reason (not only
/// certificate refusals and timeouts), and a flood of garbage is counted
/// one by one while the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_every_handshake_failure_is_counted_by_reason() {
    let gw = gateway("handshake_timeout_ms = 1500", "").await;
    let before = gw.admin_get("/metrics").await.1;

    // Connect and close at once.
    let tcp = tcp_from(&gw, None, b"").await.unwrap();
    drop(tcp);
    // Half a ClientHello, then close.
    let mut tcp = tcp_from(&gw, None, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let _ = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    // Garbage and plain HTTP.
    for prefix in [
        &b"\x00\x01garbage-garbage-garbage"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut tcp = tcp_from(&gw, None, prefix).await.unwrap();
        let (closed, _) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
        assert!(closed);
    }
    // Silence: the deadline.
    let mut tcp = tcp_from(&gw, None, b"").await.unwrap();
    let (closed, _) = read_until_closed(&mut tcp, Duration::from_secs(20)).await;
    assert!(
        closed,
        "silent connection not closed at the handshake deadline"
    );
    // An independent client: TLS 1.2 only (the gateway is TLS 1.3 only), a
    // group the gateway does not offer.
    assert!(!s_client(&gw, &["-tls1_2"]).await, "TLS 1.2 accepted");
    assert!(
        !s_client(&gw, &["-tls1_3", "-groups", "ffdhe2048"]).await,
        "ffdhe2048 accepted"
    );
    // A refused certificate: counted once, by the verifier's reason.
    let foreign =
        oneprotect_testpki::TestPki::new(crate::support::gateway::TD).tenant_ca(&gw.ca.tenant);
    assert!(
        refused(
            &gw,
            &foreign.agent(&uuid::Uuid::new_v4().to_string()),
            &foreign
        )
        .await
    );

    // Bounded metrics are read once the gateway has seen every close.
    let mut after = String::new();
    for _ in 0..100 {
        after = gw.admin_get("/metrics").await.1;
        if counter(&after, FAILURES, "timeout") > counter(&before, FAILURES, "timeout") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delta =
        |reason: &str| counter(&after, FAILURES, reason) - counter(&before, FAILURES, reason);
    assert!(delta("eof") >= 2, "eof: {after}");
    assert!(delta("not_tls") >= 2, "not_tls: {after}");
    assert_eq!(delta("timeout"), 1, "{after}");
    assert_eq!(delta("no_shared_group"), 1, "{after}");
    assert_eq!(
        delta("protocol_version") + delta("no_shared_cipher"),
        1,
        "{after}"
    );
    // The verifier's own reason (a foreign CA with the same name: the
    // signature does not verify), counted once.
    assert_eq!(
        VERIFIER_REASONS.iter().map(|r| delta(r)).sum::<u64>(),
        1,
        "{after}"
    );
    // Never a label outside the documented set.
    for line in after.lines().filter(|l| l.starts_with(FAILURES)) {
        let reason = line.split('"').nth(1).unwrap();
        assert!(
            oneprotect_gateway::handshake::REASONS.contains(&reason)
                || VERIFIER_REASONS.contains(&reason),
            "{line}"
        );
    }

    // A flood of garbage: every connection counted, good clients served.
    let n = 200u64;
    let flood = async {
        for _ in 0..n {
            let mut tcp = tcp_from(&gw, None, b"\x00garbage\r\n\r\n").await.unwrap();
            let _ = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        }
    };
    let served = async {
        for _ in 0..5 {
            let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
            assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
        }
    };
    tokio::join!(flood, served);
    let end = gw.admin_get("/metrics").await.1;
    assert_eq!(
        counter(&end, FAILURES, "not_tls") - counter(&after, FAILURES, "not_tls"),
        n,
        "{end}"
    );
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 7. serial numbers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_accepts_every_serial_length_rfc_5280_allows() {
    let gw = gateway("", "").await;
    let agent = uuid::Uuid::new_v4().to_string();
    // 159 bits, as `openssl ca -rand_serial` makes them.
    let mut serial: Vec<u8> = uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .chain(uuid::Uuid::new_v4().as_bytes().iter())
        .take(20)
        .copied()
        .collect();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let mut spec = LeafSpec::agent(&gw.ca, &agent);
    spec.serial = Some(serial.clone());
    let leaf = gw.ca.leaf(&spec);
    let id = AgentIdentity::from_chain(&leaf.cert_der, &gw.ca.cert_der).unwrap();
    let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(id.serial().to_string(), hex);
    gw.set_active(&id).await;
    let (mut s, _t) = gw.h1(Some((&leaf, &gw.ca))).await.unwrap();
    let r = h1_send(&mut s, "/api/serial", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(only(&r, headers::CERT_SERIAL), hex);
    assert_eq!(only(&r, headers::AGENT_ID), agent);

    // Longer than 20 octets: refused at the handshake.
    let mut spec = LeafSpec::agent(&gw.ca, &agent);
    spec.serial = Some(vec![0x11; 21]);
    assert!(refused(&gw, &gw.ca.leaf(&spec), &gw.ca).await, "21 octets");
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP/2 idle connections and connections without a client certificate
// ---------------------------------------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Opens an mTLS (good certificate) connection with ALPN h2, sends `bytes`
/// and reads until the gateway closes it; fails the test if that takes
/// longer than `bound`.
async fn h2_closed_within(gw: &Gw, bytes: &[u8], bound: Duration, case: &str) {
    let mut tls = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"h2"))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "{case}");
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (closed, _) = read_until_closed(&mut tls, bound).await;
    assert!(closed, "{case}: not closed within {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_h2_idle_and_unauthenticated_connections_close() {
    // pingora's defaults would keep all of these open: no h2 idle timeout,
    // no bound on the h2 preface, nothing per certificate-less connection.
    let gw = gateway(
        "idle_timeout_secs = 2\nunauthenticated_timeout_secs = 4",
        "",
    )
    .await;
    let bound = Duration::from_secs(20);
    let no_preface = h2_closed_within(&gw, b"", bound, "h2_no_preface");
    let mut settings_only = H2_PREFACE.to_vec();
    settings_only.extend_from_slice(H2_SETTINGS);
    let no_stream = h2_closed_within(&gw, &settings_only, bound, "h2_no_stream");
    // A HEADERS frame (stream 1, `:method GET` indexed) without END_HEADERS,
    // and no CONTINUATION ever.
    let mut partial = settings_only.clone();
    partial.extend_from_slice(&[0, 0, 1, 1, 0x00, 0, 0, 0, 1, 0x82]);
    let partial_headers = h2_closed_within(&gw, &partial, bound, "h2_headers_never_complete");
    let after_request = async {
        let stream = gw
            .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"h2"))
            .await
            .unwrap();
        let (mut s, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let r = s
            .send_request(crate::support::gateway::request("/api/h2", &[]))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        drop(r);
        assert!(
            tokio::time::timeout(bound, conn).await.is_ok(),
            "h2_idle_after_request: not closed within {bound:?}"
        );
    };
    // Without a certificate: closed at unauthenticated_timeout_secs even
    // while it keeps calling the exchange (each call resets the idle timer).
    let busy_unauthenticated = async {
        let (mut s, task) = gw.h1(None).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut ok = 0;
        while start.elapsed() < bound {
            match h1_send(&mut s, EXCHANGE, &[]).await {
                Ok(r) if r.status == 200 => ok += 1,
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(ok >= 2, "served before the bound: {ok}");
        assert!(
            start.elapsed() < bound,
            "certificate-less connection still open after {bound:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    };
    tokio::join!(
        no_preface,
        no_stream,
        partial_headers,
        after_request,
        busy_unauthenticated
    );
    let metrics = gw.admin_get("/metrics").await.1;
    let closed = "oneprotect_gateway_connections_closed_total";
    assert!(
        counter(&metrics, closed, "unauthenticated_timeout") >= 1,
        "{metrics}"
    );
    assert!(counter(&metrics, closed, "idle_timeout") >= 1, "{metrics}");
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_certificate_less_connections_are_capped_per_source() {
    let gw = gateway("unauthenticated_max_per_source = 2", "").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut s, t) = gw.h1(None).await.unwrap();
        assert_eq!(h1_send(&mut s, EXCHANGE, &[]).await.unwrap().status, 200);
        held.push((s, t));
    }
    // The third from the same address: closed right after the handshake.
    let third = match gw.h1(None).await {
        Err(_) => true,
        Ok((mut s, _t)) => h1_send(&mut s, EXCHANGE, &[]).await.is_err(),
    };
    assert!(third, "a third certificate-less connection was served");
    // Agents with a certificate, and other addresses, are not affected.
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    let tcp = tcp_from(&gw, Some("127.0.0.4".parse().unwrap()), b"")
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(gw.client(None, b"http/1.1"))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut other, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        h1_send(&mut other, EXCHANGE, &[]).await.unwrap().status,
        200
    );
    // A slot is freed when its connection closes.
    drop(held.pop());
    let mut freed = false;
    for _ in 0..50 {
        if let Ok((mut s, _t)) = gw.h1(None).await {
            if h1_send(&mut s, EXCHANGE, &[])
                .await
                .is_ok_and(|r| r.status == 200)
            {
                freed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the closed connection's slot was not freed");
    let metrics = gw.admin_get("/metrics").await.1;
    assert!(
        counter(
            &metrics,
            "oneprotect_gateway_connections_closed_total",
            "unauthenticated_per_source"
        ) >= 1,
        "{metrics}"
    );
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. protocol upgrades and tunnels
// ---------------------------------------------------------------------------------------------

/// A real WebSocket server (RFC 6455 opening handshake): answers an upgrade
/// request with `101 Switching Protocols` and the `Sec-WebSocket-Accept` of
/// its key, then echoes bytes; anything else gets 400. Counts the requests
/// it received and the tunnels that ended (the peer closed).
async fn start_websocket_upstream() -> (SocketAddr, WsCounts) {
    use base64::Engine as _;
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = WsCounts::default();
    let all = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = all.seen.clone();
            let ended = all.ended.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let key = text
                    .lines()
                    .find_map(|l| l.strip_prefix("sec-websocket-key:"))
                    .map(|k| k.trim().to_owned());
                let (Some(key), true) = (key, text.contains("upgrade: websocket")) else {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                // The key was lower-cased with the head; the test's key is
                // lower-case already.
                let digest = ring::digest::digest(
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
                );
                let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                     sec-websocket-accept: {accept}\r\n\r\n"
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                // The tunnel: echo until the peer goes (bounded).
                for _ in 0..1000 {
                    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, counts)
}

/// What the WebSocket upstream saw: requests, and tunnels the gateway side
/// closed.
#[derive(Clone, Default)]
struct WsCounts {
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ended: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const WS_KEY: &str = "dghlihnhbxbszsbub25jzq==";

/// A WebSocket opening handshake (RFC 6455) for `path`, as raw HTTP/1.1.
fn ws_upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Item 3: a 101 would turn the connection into a tunnel that the
/// per-request revocation check never sees again, so every request for a
/// tunnel (`Upgrade`, `Connection: upgrade`, `CONNECT`) gets 400
/// `upgrade_not_allowed` and the connection closes; nothing reaches the
/// WebSocket upstream, which would have upgraded (checked directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_upgrades_and_tunnels_are_refused() {
    use std::sync::atomic::Ordering;
    let (ws, counts) = start_websocket_upstream().await;
    let seen = counts.seen.clone();
    let gw = gateway_with(
        "",
        vec![RouteToml::new("/ws", ws).without_health_check()],
        "",
    )
    .await;

    // The upstream is a real WebSocket server: directly, it upgrades.
    let mut direct = TcpStream::connect(ws).await.unwrap();
    direct
        .write_all(ws_upgrade_request("/ws/chat").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), direct.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 101"), "direct: {answer}");
    drop(direct);
    let direct_requests = seen.load(Ordering::SeqCst);

    let cases: &[(&str, String)] = &[
        (
            "websocket",
            ws_upgrade_request("/ws/chat"),
        ),
        (
            "websocket_mixed_case_connection_list",
            format!(
                "GET /ws/chat HTTP/1.1\r\nHost: localhost\r\nuPgRaDe: WebSocket\r\n\
                 Connection: keep-alive, UPGRADE\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
        (
            "h2c",
            "GET /ws/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                .into(),
        ),
        (
            "connection_upgrade_only",
            "GET /ws/x HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n\r\n".into(),
        ),
        (
            "upgrade_without_connection",
            "GET /ws/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n".into(),
        ),
    ];
    for (case, raw) in cases {
        let out = raw_h1(&gw, raw.as_bytes()).await;
        assert_problem(&out, 400, "upgrade_not_allowed", case);
        assert!(!out.contains(" 101 "), "{case}: {out}");
    }
    // CONNECT (a tunnel by definition): refused, never a 2xx.
    let out = raw_h1(
        &gw,
        b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n",
    )
    .await;
    let (status, _, _) = one_response(&out);
    assert!((400..500).contains(&status), "connect: {out}");

    // curl, an independent client, asking for a WebSocket through the gateway.
    let v = curl(
        &gw,
        "/ws/chat",
        true,
        false,
        &[
            "Upgrade: websocket",
            "Connection: Upgrade",
            &format!("Sec-WebSocket-Key: {WS_KEY}"),
            "Sec-WebSocket-Version: 13",
        ],
    )
    .await;
    assert_eq!(v["code"], "upgrade_not_allowed", "curl: {v}");

    assert_eq!(
        seen.load(Ordering::SeqCst),
        direct_requests,
        "an upgrade request reached the WebSocket upstream through the gateway"
    );
    // A plain request on the same gateway is still served.
    let out = raw_h1(
        &gw,
        b"GET /raw/after-upgrades HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(one_response(&out).0, 200, "{out}");
    gw.cleanup().await;
}

/// Opens a WebSocket tunnel on `path` through the gateway with `cert` and
/// proves it carries bytes both ways (the upstream echoes).
async fn open_tunnel(
    gw: &Gw,
    cert: (&oneprotect_testpki::Leaf, &oneprotect_testpki::TenantCa),
    path: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = gw.tls(gw.client(Some(cert), b"http/1.1")).await.unwrap();
    tls.write_all(ws_upgrade_request(path).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(text.starts_with("HTTP/1.1 101"), "{path}: {text}");
    for msg in [&b"ping-1"[..], b"ping-2"] {
        tls.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg, "the tunnel echoes");
    }
    tls
}

/// Waits (bounded) until the upstream has seen `n` tunnels end.
async fn upstream_saw_ended(counts: &WsCounts, n: usize) {
    use std::sync::atomic::Ordering;
    for _ in 0..200 {
        if counts.ended.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the upstream saw {} tunnels end, expected {n}",
        counts.ended.load(Ordering::SeqCst)
    );
}

/// Item 3, the route that allows upgrades: a WebSocket tunnel opens
/// through the gateway (its route lists `websocket`; other protocols and
/// malformed upgrades still get 400), carries bytes, and is torn down both
/// ways, without a further request, when its certificate is revoked, when
/// it is superseded, and when the revocation state cannot be confirmed
/// for longer than `max_staleness_ms` (Redis gone) — each counted by
/// reason. A tunnel of another agent stays open through the first two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_gw_allowed_tunnels_close_when_revoked_superseded_or_unconfirmed() {
    use oneprotect_identity::revocation::Change;
    use oneprotect_identity::CertStatus;
    use std::sync::atomic::Ordering;
    let (ws, counts) = start_websocket_upstream().await;
    let routes = vec![
        RouteToml::new("/wss", ws)
            .without_health_check()
            .upgrades(&["websocket"]),
        RouteToml::new("/ws", ws).without_health_check(),
    ];
    let gw = gateway_with("", routes.clone(), "").await;

    // Still refused: a route without upgrade_protocols, another protocol,
    // a list, an Upgrade without Connection: upgrade.
    for (case, raw) in [
        ("route_without_upgrades", ws_upgrade_request("/ws/chat")),
        (
            "h2c_on_a_websocket_route",
            "GET /wss/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                .into(),
        ),
        (
            "protocol_list",
            "GET /wss/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket, h2c\r\n\
             Connection: Upgrade\r\n\r\n"
                .into(),
        ),
        (
            "upgrade_without_connection",
            "GET /wss/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n".into(),
        ),
    ] {
        let out = raw_h1(&gw, raw.as_bytes()).await;
        assert_problem(&out, 400, "upgrade_not_allowed", case);
    }
    assert_eq!(
        counts.seen.load(Ordering::SeqCst),
        0,
        "nothing refused reached the upstream"
    );

    // Another agent's tunnel stays open throughout.
    let other = gw.ca.agent(&uuid::Uuid::new_v4().to_string());
    let other_id = AgentIdentity::from_chain(&other.cert_der, &gw.ca.cert_der).unwrap();
    gw.set_active(&other_id).await;
    let mut bystander = open_tunnel(&gw, (&other, &gw.ca), "/wss/bystander").await;

    // Revoked: the open tunnel closes, both ways, with no request sent.
    let mut t = open_tunnel(&gw, (&gw.leaf, &gw.ca), "/wss/chat").await;
    let metrics = gw.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("oneprotect_gateway_tunnels_opened_total 2"),
        "{metrics}"
    );
    gw.revoke_cert().await;
    let (closed, _) = read_until_closed(&mut t, Duration::from_secs(5)).await;
    assert!(closed, "the revoked certificate's tunnel stayed open");
    upstream_saw_ended(&counts, 1).await;
    // A new upgrade with the revoked certificate: refused before any 101.
    let mut again = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1"))
        .await
        .unwrap();
    again
        .write_all(ws_upgrade_request("/wss/chat").as_bytes())
        .await
        .unwrap();
    let (_, out) = read_until_closed(&mut again, Duration::from_secs(10)).await;
    assert_problem(&out, 403, "certificate_revoked", "upgrade after revocation");

    // Superseded (rotation's grace ended): the same.
    let next = gw.ca.agent(&uuid::Uuid::new_v4().to_string());
    let next_id = AgentIdentity::from_chain(&next.cert_der, &gw.ca.cert_der).unwrap();
    gw.set_active(&next_id).await;
    let mut t = open_tunnel(&gw, (&next, &gw.ca), "/wss/chat").await;
    gw.announce(
        gw.keys.cert_status(&next_id.tenant(), &next_id.serial()),
        CertStatus::Superseded.as_str(),
        Change::Cert {
            serial: next_id.serial(),
            status: CertStatus::Superseded,
        },
    )
    .await;
    let (closed, _) = read_until_closed(&mut t, Duration::from_secs(5)).await;
    assert!(closed, "the superseded certificate's tunnel stayed open");
    upstream_saw_ended(&counts, 2).await;

    // The bystander's tunnel still echoes.
    bystander.write_all(b"still-here").await.unwrap();
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), bystander.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still-here");

    let metrics = gw.admin_get("/metrics").await.1;
    let closed_by = |reason: &str| {
        counter(
            &metrics,
            "oneprotect_gateway_connections_closed_total",
            reason,
        )
    };
    assert_eq!(closed_by("tunnel_certificate_revoked"), 1, "{metrics}");
    assert_eq!(closed_by("tunnel_certificate_superseded"), 1, "{metrics}");
    drop(bystander);
    gw.cleanup().await;

    // Redis gone: once the state is unconfirmed beyond max_staleness, the
    // tunnel closes (fail closed), as requests would get 503.
    let redis = crate::support::redis::RedisChild::start(oneprotect_tests::free_port()).await;
    let gw = start_gateway(Opts {
        redis_url: format!("redis://127.0.0.1:{}", redis.port),
        max_staleness_ms: 1500,
        heartbeat_ms: 200,
        routes,
        ..Opts::shared_redis()
    })
    .await;
    let mut t = open_tunnel(&gw, (&gw.leaf, &gw.ca), "/wss/outage").await;
    redis.stop().await;
    let (closed, _) = read_until_closed(&mut t, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the tunnel outlived the revocation state's confirmation"
    );
    let metrics = gw.admin_get("/metrics").await.1;
    assert_eq!(
        counter(
            &metrics,
            "oneprotect_gateway_connections_closed_total",
            "tunnel_revocation_unavailable"
        ),
        1,
        "{metrics}"
    );
}
