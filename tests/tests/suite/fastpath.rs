//! The gateway's HTTP/1.1 fast path (ADR-0023) against pingora's path, on
//! the same inputs: two gateways, one with `listener.http1_fast_path` on
//! (the default) and one with it off, each before its own raw upstream that
//! records the exact bytes it receives and answers with a scripted
//! response. Every request is sent as raw bytes over a real mTLS connection.
//! What the upstream received and what the client got back must be the
//! same through both, less the differences ADR-0023 lists: hop-by-hop
//! headers (`Connection`, `Keep-Alive`, `Proxy-Connection`) are not
//! forwarded by the fast path, chunk boundaries and extensions of a relayed
//! body may differ, and each gateway has its own agent identity and signing
//! key.
// Test setup: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oneprotect_identity::headers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::gateway::{start_gateway, Gw, Opts};
use crate::support::gateway_toml::RouteToml;

/// What a raw upstream received: one entry per request.
#[derive(Default)]
struct Received {
    requests: Mutex<Vec<(String, Vec<u8>)>>,
    connections: Mutex<usize>,
    /// Requests for `/hold` (never answered) whose connection the gateway
    /// closed within 30 s.
    held_closed: Mutex<usize>,
}

/// The scripted answer for a request path.
fn answer(path: &str, head_request: bool) -> (Vec<u8>, bool) {
    let body = format!("answer for {path}");
    let close_after = path.contains("/upclose") || path.contains("/close");
    let out = if path.contains("/chunked") {
        b"HTTP/1.1 200 OK\r\nX-Up: chunked\r\nTransfer-Encoding: chunked\r\n\r\n4;e=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec()
    } else if path.contains("/close") {
        format!("HTTP/1.1 200 OK\r\nX-Up: close\r\n\r\n{body}").into_bytes()
    } else if path.contains("/nocontent") {
        b"HTTP/1.1 204 No Content\r\nX-Up: none\r\n\r\n".to_vec()
    } else if path.contains("/continue") {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
    } else if path.contains("/big") {
        let big = "z".repeat(300 * 1024);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        )
        .into_bytes()
    } else if path.contains("/badlength") {
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx".to_vec()
    } else {
        let conn = if close_after {
            "Connection: close\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 200 OK\r\nX-Up: len\r\nKeep-Alive: timeout=5\r\n{conn}Content-Length: {}\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    if head_request {
        // The head only: a HEAD answer has no body.
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        return (out[..end].to_vec(), close_after);
    }
    (out, close_after)
}

/// A raw HTTP/1.1 upstream: reads each request (Content-Length or chunked
/// body), records its bytes, writes the scripted answer.
async fn start_raw_upstream() -> (SocketAddr, Arc<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Received::default());
    let rec = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            *rec.connections.lock().unwrap() += 1;
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let lower = head.to_ascii_lowercase();
                    let mut req = buf[..end].to_vec();
                    buf.drain(..end);
                    if lower.contains("\r\ntransfer-encoding: chunked") {
                        let Some(e) = read_until(&mut s, &mut buf, b"0\r\n\r\n").await else {
                            return;
                        };
                        req.extend(buf.drain(..e));
                    } else if let Some(n) = lower
                        .split("\r\n")
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                    {
                        if fill(&mut s, &mut buf, n).await.is_none() {
                            return;
                        }
                        req.extend(buf.drain(..n));
                    }
                    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                    rec.requests.lock().unwrap().push((path.clone(), req));
                    if path.contains("/hold") {
                        let mut byte = [0u8; 1];
                        let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte));
                        if let Ok(Ok(0)) = read.await {
                            *rec.held_closed.lock().unwrap() += 1;
                        }
                        return;
                    }
                    let (out, close) = answer(&path, head.starts_with("HEAD "));
                    if s.write_all(&out).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Reads into `buf` until `pat` appears; the index just past it.
async fn read_until<R: AsyncReadExt + Unpin>(
    s: &mut R,
    buf: &mut Vec<u8>,
    pat: &[u8],
) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(i + pat.len());
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// One response as the client saw it: status line, headers (less `Date`,
/// whose presence is checked, and the hop-by-hop and framing ones), the
/// decoded body, and whether the connection stayed open.
#[derive(Debug, PartialEq)]
struct Seen {
    /// Informational heads before the response, as sent.
    interim: Vec<String>,
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Reads one response from `s` (framing by Content-Length, chunked, or
/// until close); `None` when the connection closed first.
async fn read_response<R: AsyncReadExt + Unpin>(
    s: &mut R,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> Option<(Seen, bool)> {
    let mut interim = Vec::new();
    let head = loop {
        let end = read_until(s, buf, b"\r\n\r\n").await?;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        if !head.starts_with("HTTP/1.1 1") {
            break head;
        }
        interim.push(head);
    };
    let mut lines = head.trim_end().split("\r\n");
    let status_line = lines.next()?.to_owned();
    let mut headers = Vec::new();
    let mut dated = false;
    let mut close = false;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let (n, v) = l.split_once(':')?;
        let (n, v) = (n.to_owned(), v.trim().to_owned());
        match n.to_ascii_lowercase().as_str() {
            "date" => dated = true,
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "content-length" => {
                length = v.parse::<usize>().ok();
                headers.push((n, v));
            }
            "keep-alive" | "proxy-connection" => {}
            _ => headers.push((n, v)),
        }
    }
    assert!(dated, "every response has a Date: {head}");
    headers.sort_by_key(|(n, _)| n.to_ascii_lowercase());
    let code: u16 = status_line.get(9..12)?.parse().ok()?;
    let mut body = Vec::new();
    if head_request || code == 204 || code == 304 {
    } else if chunked {
        loop {
            let e = read_until(s, buf, b"\r\n").await?;
            let line = String::from_utf8_lossy(&buf[..e - 2]).into_owned();
            buf.drain(..e);
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                // Trailers (dropped by pingora's path) up to the empty line.
                let e = read_until_blank_line(s, buf).await?;
                buf.drain(..e);
                break;
            }
            fill(s, buf, size + 2).await?;
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    } else if let Some(n) = length {
        fill(s, buf, n).await?;
        body.extend(buf.drain(..n));
    } else {
        let _ = s.read_to_end(buf).await;
        body.append(buf);
        close = true;
    }
    Some((
        Seen {
            interim,
            status_line,
            headers,
            body,
        },
        close,
    ))
}

async fn read_until_blank_line<R: AsyncReadExt + Unpin>(
    s: &mut R,
    buf: &mut Vec<u8>,
) -> Option<usize> {
    fill(s, buf, 2).await?;
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    read_until(s, buf, b"\r\n\r\n").await
}

/// Reads into `buf` until it holds at least `n` bytes; `None` when the
/// connection ends first.
async fn fill<R: AsyncReadExt + Unpin>(s: &mut R, buf: &mut Vec<u8>, n: usize) -> Option<()> {
    while buf.len() < n {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    Some(())
}

/// A request head as the upstream received it, normalised: the request
/// line, then the headers sorted by name (same-name order kept), the
/// gateway's own identity values and assertion checked and replaced by
/// placeholders, hop-by-hop headers left out; and the body.
fn normalised(gw: &Gw, raw: &[u8]) -> Normalised {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.trim_end().split("\r\n");
    let line = lines.next().unwrap().to_owned();
    let ours = [
        (headers::TENANT_ID, gw.id.tenant().to_string()),
        (headers::AGENT_ID, gw.id.agent().to_string()),
        (headers::CERT_SERIAL, gw.id.serial().to_string()),
        (headers::SPIFFE_ID, gw.id.uri().to_string()),
    ];
    let mut out = Vec::new();
    for l in lines {
        let (n, v) = l.split_once(": ").unwrap_or((l, ""));
        let lower = n.to_ascii_lowercase();
        if ["connection", "keep-alive", "proxy-connection"].contains(&lower.as_str()) {
            continue;
        }
        let v = if let Some((_, want)) = ours.iter().find(|(name, _)| *name == lower) {
            assert_eq!(v, want, "{lower} is the gateway's own: {head}");
            "<identity>".to_owned()
        } else if lower == headers::IDENTITY_ASSERTION || lower == headers::CERT_NOT_AFTER {
            assert!(!v.is_empty(), "{head}");
            "<identity>".to_owned()
        } else {
            v.to_owned()
        };
        out.push((n.to_owned(), v));
    }
    out.sort_by_key(|(n, _)| n.to_ascii_lowercase());
    (line, out, raw[end..].to_vec())
}

/// A request head as [`normalised`] gives it: request line, headers, body.
type Normalised = (String, Vec<(String, String)>, Vec<u8>);

/// Requires the upstream's view of the request whose path holds `id` to be
/// the same through the fast path's gateway (`fast`) and pingora's
/// (`slow`), after `norm`, and to hold none of the client's spoofed values;
/// neither upstream may have seen it only when it was `refused`.
fn same_upstream_view(
    (fast, fast_seen): (&Gw, &Received),
    (slow, slow_seen): (&Gw, &Received),
    id: &str,
    refused: bool,
    norm: fn(&Gw, &[u8]) -> Normalised,
) {
    let pick = |seen: &Received| {
        seen.requests
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p.contains(id))
            .map(|(_, r)| r.clone())
    };
    let (up_a, up_b) = match (pick(fast_seen), pick(slow_seen)) {
        (Some(a), Some(b)) => (norm(fast, &a), norm(slow, &b)),
        (None, None) if refused => return,
        (a, b) => panic!(
            "{id}: seen upstream through the fast path: {}, through pingora's: {}",
            a.is_some(),
            b.is_some()
        ),
    };
    assert_eq!(
        up_a, up_b,
        "{id}: the upstream's view differs (fast, pingora)"
    );
    for (n, v) in &up_a.1 {
        assert!(
            !["spoof", "203.0.113.1", "evil", ":AAAA:"]
                .iter()
                .any(|s| v.contains(s)),
            "{id}: a client value reached the upstream: {n}: {v}"
        );
    }
}

/// The requests compared, each sent on its own fresh connection (`{id}`
/// is replaced by a per-case id, the same for both gateways).
fn cases() -> Vec<(&'static str, String)> {
    let spoofs = "X-OneProtect-Tenant-Id: spoof\r\nx-oneprotect-agent-id: spoof\r\nX_OneProtect_Spiffe_Id: spoof\r\nx-oneprotect_cert_serial: spoof\r\nX-Forwarded-For: 203.0.113.1\r\nX-Forwarded-Host: evil\r\nForwarded: for=203.0.113.1\r\nX-Real-IP: 203.0.113.1\r\nClient-Cert: :AAAA:\r\nClient-Cert-Chain: :AAAA:\r\nX-Forwarded-Client-Cert: By=spiffe://evil\r\n";
    let big_body = "b".repeat(200 * 1024);
    vec![
        ("get", "GET /raw/len/{id}?q=1&r=%20 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n".into()),
        ("spoofed", format!("GET /raw/len/{{id}} HTTP/1.1\r\nHost: localhost\r\n{spoofs}X-Custom: 1\r\nx_custom: 2\r\n\r\n")),
        ("repeated-and-cased", "GET /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\nx-b: 2\r\nx-a: 3\r\nX-B: 4\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n".into()),
        ("hop-by-hop", "GET /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\n\r\n".into()),
        ("client-close", "GET /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into()),
        ("post", "POST /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":\"hello\"}".into()),
        ("post-big", format!("PUT /raw/len/{{id}} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{big_body}", big_body.len())),
        ("head", "HEAD /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-chunked", "GET /raw/chunked/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-until-close", "GET /raw/close/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-closes", "GET /raw/upclose/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-204", "DELETE /raw/nocontent/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-100", "GET /raw/continue/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("upstream-big", "GET /raw/big/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        // Declined by the fast path: pingora's path serves both the same.
        ("request-chunked", "POST /raw/len/{id} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into()),
        ("absolute-form", "GET http://localhost/raw/len/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
        ("http10", "GET /raw/len/{id} HTTP/1.0\r\nHost: localhost\r\n\r\n".into()),
        // A byte pingora's URI type refuses (found by the fuzz target).
        ("backtick", "GET /raw/len/{id}/a`b HTTP/1.1\r\nHost: localhost\r\n\r\n".into()),
    ]
}

async fn fast_path_metric(gw: &Gw, outcome: &str) -> u64 {
    let (_, text) = gw.admin_get("/metrics").await;
    let key = format!("oneprotect_gateway_fast_path_requests_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the metrics"))
}

async fn gateway_before_raw_upstream(fast: bool) -> (Gw, Arc<Received>) {
    let (up, seen) = start_raw_upstream().await;
    let mut opts = Opts::shared_redis();
    opts.routes = vec![RouteToml::new("/raw", up).without_health_check()];
    opts.listener_extra = format!("http1_fast_path = {fast}\n");
    (start_gateway(opts).await, seen)
}

async fn send_one(gw: &Gw, raw: &[u8], head_request: bool) -> Option<(Seen, bool)> {
    let mut tls = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1"))
        .await
        .unwrap();
    tls.write_all(raw).await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = Vec::new();
    read_response(&mut tls, &mut buf, head_request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_matches_pingoras_path_on_the_same_requests() {
    let (fast, fast_seen) = gateway_before_raw_upstream(true).await;
    let (slow, slow_seen) = gateway_before_raw_upstream(false).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    for (name, template) in cases() {
        let raw = template.replace("{id}", &format!("{run}-{name}"));
        let head_request = raw.starts_with("HEAD ");
        let a = send_one(&fast, raw.as_bytes(), head_request).await;
        let b = send_one(&slow, raw.as_bytes(), head_request).await;
        let (a, a_closed) = a.unwrap_or_else(|| panic!("{name}: no answer through the fast path"));
        let (b, _) = b.unwrap_or_else(|| panic!("{name}: no answer through pingora's path"));
        assert_eq!(a, b, "{name}: the client's view differs (fast, pingora)");
        let refused = a.status_line.starts_with("HTTP/1.1 4");
        assert_eq!(
            a_closed,
            raw.contains("Connection: close") || raw.contains("HTTP/1.0") || refused,
            "{name}: the connection closes only when the client asked or was refused"
        );
        same_upstream_view(
            (&fast, &fast_seen),
            (&slow, &slow_seen),
            &format!("{run}-{name}"),
            refused,
            normalised,
        );
    }
    // The fast path served the common requests; the off switch kept
    // everything on pingora's path.
    assert!(fast_path_metric(&fast, "served").await >= 14);
    assert!(fast_path_metric(&fast, "declined").await >= 3);
    assert_eq!(fast_path_metric(&slow, "served").await, 0);
    fast.cleanup().await;
    slow.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_keeps_both_connections_alive_and_hands_over_to_pingora_mid_connection() {
    let (gw, seen) = gateway_before_raw_upstream(true).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut tls = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    for i in 0..30 {
        // Every fifth request is one the fast path declines (a chunked
        // body): pingora's path serves it on the same connection.
        let raw = if i % 5 == 4 {
            format!("POST /raw/len/{run}-{i} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        } else {
            format!("POST /raw/len/{run}-{i} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nhi")
        };
        tls.write_all(raw.as_bytes()).await.unwrap();
        let (resp, closed) = read_response(&mut tls, &mut buf, false)
            .await
            .unwrap_or_else(|| panic!("request {i}: no answer"));
        assert_eq!(resp.status_line, "HTTP/1.1 200 OK", "request {i}");
        assert_eq!(
            resp.body,
            format!("answer for /raw/len/{run}-{i}").as_bytes()
        );
        assert!(!closed, "request {i}");
    }
    let got: Vec<_> = seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.contains(&run))
        .map(|(_, r)| r.ends_with(b"hi") || r.ends_with(b"0\r\n\r\n"))
        .collect();
    assert_eq!(got.len(), 30);
    assert!(got.iter().all(|b| *b), "every body reached the upstream");
    // One upstream connection for the fast path's 24 requests (pooled,
    // checked before reuse), one more at most for pingora's own pool.
    assert!(
        *seen.connections.lock().unwrap() <= 2,
        "{}",
        *seen.connections.lock().unwrap()
    );
    assert_eq!(fast_path_metric(&gw, "served").await, 24);
    assert_eq!(fast_path_metric(&gw, "declined").await, 6);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_upstream_failures_answer_problems_and_refusals_stay_on_pingoras_path() {
    let (gw, seen) = gateway_before_raw_upstream(true).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    // A refused connection: 502 problem+json, connection closed.
    let (resp, closed) = send_one(
        &gw,
        b"GET /dead/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
        false,
    )
    .await
    .unwrap();
    assert_eq!(resp.status_line.get(9..12), Some("502"), "{resp:?}");
    assert!(closed);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["code"], "bad_gateway", "{body}");
    // A response with two Content-Lengths: 502, nothing of it relayed.
    let raw = format!("GET /raw/badlength/{run} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (resp, closed) = send_one(&gw, raw.as_bytes(), false).await.unwrap();
    assert_eq!(resp.status_line.get(9..12), Some("502"), "{resp:?}");
    assert!(closed);
    assert!(seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _)| p.contains(&run)));
    // A revoked certificate: pingora's path answers 403 agent_revoked (and
    // the fast path counts the request declined).
    let declined = fast_path_metric(&gw, "declined").await;
    gw.revoke_agent().await;
    let mut refused = false;
    for _ in 0..100 {
        let raw = format!("GET /raw/len/{run}-after HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (resp, _) = send_one(&gw, raw.as_bytes(), false).await.unwrap();
        if resp.status_line.get(9..12) == Some("403") {
            let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(body["code"], "agent_revoked", "{body}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the revoked agent was refused");
    assert!(fast_path_metric(&gw, "declined").await > declined);
    gw.cleanup().await;
}

// HTTP/2 (ADR-0028): the gateway's own HTTP/2 loop against pingora's, on
// the same requests from an HTTP/2 client (hyper's) over mTLS.

type H2Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// An HTTP/2 response as the client saw it: status, headers (names
/// lower-case, sorted; `date` left out), body.
#[derive(Debug, PartialEq)]
struct H2Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn gateway_before_raw_upstream_h2(fast: bool) -> (Gw, Arc<Received>) {
    let (up, seen) = start_raw_upstream().await;
    let mut opts = Opts::shared_redis();
    opts.routes = vec![RouteToml::new("/raw", up).without_health_check()];
    opts.listener_extra = format!("http2_fast_path = {fast}\n");
    (start_gateway(opts).await, seen)
}

async fn h2_connect(gw: &Gw) -> hyper::client::conn::http2::SendRequest<H2Body> {
    let stream = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"h2"))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (s, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    s
}

/// A body: whole (`Content-Length` set by the client) or streamed in
/// pieces (no length).
fn h2_body(pieces: &[&[u8]], streamed: bool) -> H2Body {
    use http_body_util::BodyExt as _;
    if !streamed {
        return http_body_util::Full::new(bytes::Bytes::from(pieces.concat())).boxed();
    }
    let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = pieces
        .iter()
        .map(|p| Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(p))))
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn h2_send(
    s: &mut hyper::client::conn::http2::SendRequest<H2Body>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: H2Body,
) -> Option<H2Seen> {
    use http_body_util::BodyExt as _;
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    s.ready().await.ok()?;
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        s.send_request(b.body(body).unwrap()),
    )
    .await
    .ok()?
    .ok()?;
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(n, _)| *n != "date")
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    let body = resp.into_body().collect().await.ok()?.to_bytes().to_vec();
    Some(H2Seen {
        status,
        headers,
        body,
    })
}

/// A `GET` without a body.
async fn h2_get(
    s: &mut hyper::client::conn::http2::SendRequest<H2Body>,
    path: &str,
) -> Option<H2Seen> {
    h2_send(s, "GET", path, &[], h2_body(&[], false)).await
}

/// [`normalised`], with names lower-case (HTTP/2 has no case to keep) and
/// `cookie` fields joined into one (RFC 9113 §8.2.3).
fn normalised_h2(gw: &Gw, raw: &[u8]) -> Normalised {
    let (line, headers, body) = normalised(gw, raw);
    let mut cookies = Vec::new();
    let mut out: Vec<(String, String)> = headers
        .into_iter()
        .filter_map(|(n, v)| {
            let n = n.to_ascii_lowercase();
            if n == "cookie" {
                cookies.push(v);
                return None;
            }
            Some((n, v))
        })
        .collect();
    if !cookies.is_empty() {
        out.push(("cookie".into(), cookies.join("; ")));
    }
    out.sort();
    (line, out, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_h2_matches_pingoras_path_on_the_same_requests() {
    let (fast, fast_seen) = gateway_before_raw_upstream_h2(true).await;
    let (slow, slow_seen) = gateway_before_raw_upstream_h2(false).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let spoofs: &[(&str, &str)] = &[
        ("x-oneprotect-tenant-id", "spoof"),
        ("x-oneprotect-agent-id", "spoof"),
        ("x_oneprotect_spiffe_id", "spoof"),
        ("x-oneprotect_cert_serial", "spoof"),
        ("x-forwarded-for", "203.0.113.1"),
        ("x-forwarded-host", "evil"),
        ("forwarded", "for=203.0.113.1"),
        ("x-real-ip", "203.0.113.1"),
        ("client-cert", ":AAAA:"),
        ("client-cert-chain", ":AAAA:"),
        ("x-forwarded-client-cert", "By=spiffe://evil"),
        ("x-custom", "1"),
        ("x_custom", "2"),
    ];
    let big = vec![b'b'; 200 * 1024];
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, &str, &str, Vec<(&str, &str)>, Vec<u8>)> = vec![
        (
            "get",
            "GET",
            "/raw/len/{id}?q=1&r=%20",
            vec![("user-agent", "t"), ("accept", "*/*")],
            vec![],
        ),
        ("spoofed", "GET", "/raw/len/{id}", spoofs.to_vec(), vec![]),
        (
            "repeated",
            "GET",
            "/raw/len/{id}",
            vec![("x-a", "1"), ("x-b", "2"), ("x-a", "3"), ("x-b", "4")],
            vec![],
        ),
        (
            "cookies",
            "GET",
            "/raw/len/{id}",
            vec![("cookie", "a=1"), ("cookie", "b=2")],
            vec![],
        ),
        (
            "post",
            "POST",
            "/raw/len/{id}",
            vec![("content-type", "application/json")],
            b"{\"a\":\"hello\"}".to_vec(),
        ),
        ("put-big", "PUT", "/raw/len/{id}", vec![], big.clone()),
        ("head", "HEAD", "/raw/len/{id}", vec![], vec![]),
        (
            "upstream-chunked",
            "GET",
            "/raw/chunked/{id}",
            vec![],
            vec![],
        ),
        (
            "upstream-until-close",
            "GET",
            "/raw/close/{id}",
            vec![],
            vec![],
        ),
        (
            "upstream-closes",
            "GET",
            "/raw/upclose/{id}",
            vec![],
            vec![],
        ),
        (
            "upstream-204",
            "DELETE",
            "/raw/nocontent/{id}",
            vec![],
            vec![],
        ),
        ("upstream-100", "GET", "/raw/continue/{id}", vec![], vec![]),
        ("upstream-big", "GET", "/raw/big/{id}", vec![], vec![]),
        (
            "upstream-bad-length",
            "GET",
            "/raw/badlength/{id}",
            vec![],
            vec![],
        ),
        ("no-route", "GET", "/nothere/{id}", vec![], vec![]),
    ];
    // All on one connection per gateway: streams, not connections.
    let mut a_conn = h2_connect(&fast).await;
    let mut b_conn = h2_connect(&slow).await;
    for (name, method, path, headers, body) in &cases {
        let path = path.replace("{id}", &format!("{run}-{name}"));
        let a = h2_send(&mut a_conn, method, &path, headers, h2_body(&[body], false)).await;
        let b = h2_send(&mut b_conn, method, &path, headers, h2_body(&[body], false)).await;
        let a = a.unwrap_or_else(|| panic!("{name}: no answer through the fast path"));
        let b = b.unwrap_or_else(|| panic!("{name}: no answer through pingora's path"));
        assert_eq!(a, b, "{name}: the client's view differs (fast, pingora)");
        same_upstream_view(
            (&fast, &fast_seen),
            (&slow, &slow_seen),
            &format!("{run}-{name}"),
            a.status >= 400,
            normalised_h2,
        );
    }
    // Every request of the fast gateway was the fast path's, none of the
    // other's: the switch holds.
    assert!(fast_path_metric(&fast, "served").await >= 14);
    assert_eq!(fast_path_metric(&slow, "served").await, 0);
    fast.cleanup().await;
    slow.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_h2_streams_bodies_bounds_them_and_refuses_revoked_agents() {
    let (up, seen) = start_raw_upstream().await;
    let mut opts = Opts::shared_redis();
    let mut route = RouteToml::new("/raw", up).without_health_check();
    route.max_body_bytes = Some(64 * 1024);
    opts.routes = vec![route];
    let gw = start_gateway(opts).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut s = h2_connect(&gw).await;
    // A body without a length, in pieces: the upstream gets it chunked.
    let path = format!("/raw/len/{run}-streamed");
    let r = h2_send(
        &mut s,
        "POST",
        &path,
        &[],
        h2_body(&[b"abc", b"defg", b"h"], true),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let got = seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| p.contains(&format!("{run}-streamed")))
        .map(|(_, r)| String::from_utf8_lossy(r).into_owned())
        .unwrap();
    assert!(
        got.to_ascii_lowercase()
            .contains("\r\ntransfer-encoding: chunked\r\n"),
        "{got}"
    );
    let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let decoded: String = body
        .split("\r\n")
        .collect::<Vec<_>>()
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| c[1])
        .collect();
    assert_eq!(decoded, "abcdefgh", "{body:?}");
    // Over the route's limit, declared: 413 before anything goes upstream;
    // streamed: 413 once the limit is passed. The connection lives on.
    let big = vec![b'x'; 70 * 1024];
    for streamed in [false, true] {
        let path = format!("/raw/len/{run}-big-{streamed}");
        let r = h2_send(
            &mut s,
            "POST",
            &path,
            &[],
            h2_body(&[&big[..40_000], &big[40_000..]], streamed),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 413, "streamed={streamed}: {r:?}");
        let problem: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(problem["code"], "payload_too_large", "{problem}");
    }
    assert!(!seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|(p, _)| p.contains(&format!("{run}-big-false"))));
    // Many streams at once on the one connection.
    let mut all = Vec::new();
    for i in 0..40 {
        let mut s = s.clone();
        let path = format!("/raw/len/{run}-many-{i}");
        all.push(tokio::spawn(async move { h2_get(&mut s, &path).await }));
    }
    for (i, t) in all.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "stream {i}");
        assert_eq!(
            r.body,
            format!("answer for /raw/len/{run}-many-{i}").into_bytes()
        );
    }
    // Revoked: the very next stream on the open connection is refused.
    gw.revoke_agent().await;
    let mut refused = false;
    for _ in 0..100 {
        let r = h2_get(&mut s, &format!("/raw/len/{run}-after"))
            .await
            .unwrap();
        if r.status == 403 {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["code"], "agent_revoked", "{body}");
            assert!(r
                .headers
                .iter()
                .any(|(n, v)| n == "content-type" && v == "application/problem+json"));
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the revoked agent was refused");
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastpath_h2_a_stream_the_client_resets_stops_its_upstream_request() {
    // Rapid reset (CVE-2023-44487): a reset stream frees its slot at once,
    // so the work for it must stop too, or a client could keep any number
    // of upstream requests going on one connection.
    let (gw, seen) = gateway_before_raw_upstream_h2(true).await;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let s = h2_connect(&gw).await;
    for i in 0..5 {
        let path = format!("/raw/hold/{run}-{i}");
        let mut s2 = s.clone();
        let p = path.clone();
        let pending = tokio::spawn(async move { h2_get(&mut s2, &p).await });
        // The upstream has the request (and will never answer it).
        let mut arrived = false;
        for _ in 0..200 {
            if seen
                .requests
                .lock()
                .unwrap()
                .iter()
                .any(|(q, _)| *q == path)
            {
                arrived = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(arrived, "{path} reached the upstream");
        // Dropping the response resets the stream (RST_STREAM CANCEL).
        pending.abort();
    }
    let mut closed = 0;
    for _ in 0..200 {
        closed = *seen.held_closed.lock().unwrap();
        if closed == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        closed, 5,
        "the gateway dropped each reset stream's upstream request"
    );
    assert!(fast_path_metric(&gw, "reset").await >= 5);
    // The connection itself goes on.
    let mut s = s;
    let r = h2_get(&mut s, &format!("/raw/len/{run}-after"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    gw.cleanup().await;
}
