//! Acknowledged revocation (issue 16 part 1, ADR-0022): the revoke API
//! answers once every live gateway has applied the revocation, so the very
//! next request of the revoked agent on every open connection, HTTP/1.1
//! keep-alive or HTTP/2, through every gateway, is refused. A frozen
//! gateway (SIGSTOP) is named in the answer, which still arrives by the
//! deadline, and refuses the agent once resumed.
//!
//! Real `oneprotect-gateway` processes on one Redis, the enroll-api on
//! PostgreSQL ([`Fleet`]), agents enrolled through the real exchange.
//!
//! `cargo test -p oneprotect-tests --test suite acked_revocation::`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::support::fleet::{Agent, Fleet, GwTuning, Sender, POLLS};
use crate::support::gateway::{read, request};
use oneprotect_identity::GatewayPresence;

/// `max_staleness` above the fleet's 2 s enforcement deadline: a frozen
/// gateway is still live (it may still trust its cache) when the deadline
/// passes, so the answer must name it.
const TUNING: GwTuning = GwTuning {
    max_staleness_ms: 6000,
    heartbeat_ms: 200,
};

/// One HTTP/2 connection of an agent to a gateway, never reconnected: a
/// request on it after it closed fails (status 0).
struct H2 {
    s: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    async fn open(agent: &Agent, addr: SocketAddr) -> Result<Self> {
        let mut tls = (*agent.tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        ensure!(
            stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]),
            "no h2"
        );
        let (s, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        Ok(Self { s })
    }

    /// One GET on this connection: (status, problem code); 0 when the
    /// connection cannot carry it.
    async fn send(&mut self, path: &str) -> (u16, String) {
        let fut = async {
            self.s.ready().await?;
            let r = read(self.s.send_request(request(path, &[])).await?).await?;
            anyhow::Ok((r.status, r.body["code"].as_str().unwrap_or("").to_owned()))
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(x)) => x,
            _ => (0, String::new()),
        }
    }
}

/// An agent's open connections: one HTTP/1.1 keep-alive and one HTTP/2 per
/// gateway.
struct Open {
    h1: Vec<Sender>,
    h2: Vec<H2>,
}

impl Open {
    async fn new(agent: &Agent, fleet: &Fleet) -> Result<Self> {
        let mut open = Self {
            h1: Vec::new(),
            h2: Vec::new(),
        };
        for g in &fleet.gateways {
            open.h1.push(Sender::new(agent, g.addr));
            open.h2.push(H2::open(agent, g.addr).await?);
        }
        Ok(open)
    }

    /// The next request on every connection at once: (gateway, protocol,
    /// status, code) each.
    async fn next(&mut self, path: &str) -> Vec<(usize, &'static str, u16, String)> {
        let h1 = futures_util::future::join_all(self.h1.iter_mut().map(|s| s.send(path)));
        let h2 = futures_util::future::join_all(self.h2.iter_mut().map(|s| s.send(path)));
        let (h1, h2) = tokio::join!(h1, h2);
        let mut out = Vec::new();
        for (g, (st, code)) in h1.into_iter().enumerate() {
            out.push((g, "h1", st, code));
        }
        for (g, (st, code)) in h2.into_iter().enumerate() {
            out.push((g, "h2", st, code));
        }
        out
    }
}

async fn revoke(fleet: &Fleet, a: &Agent, query: &str) -> Result<(u16, Value)> {
    let r = fleet
        .client
        .send(
            "POST",
            &format!("/api/v1/agents/{}/revoke{query}", a.id),
            Some(&fleet.key),
            Some(json!({"reason": "device stolen"})),
        )
        .await?;
    Ok((r.status, r.body))
}

/// Waits (bounded) until the live set lists `n` gateways.
async fn wait_live(fleet: &Fleet, n: usize) -> Result<Vec<GatewayPresence>> {
    let mut last = Vec::new();
    for _ in 0..POLLS {
        last = fleet.live_gateways().await;
        if last.len() == n {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("live set never held {n} gateways: {last:?}")
}

/// Three gateways; for each of several agents, open keep-alive HTTP/1.1 and
/// HTTP/2 connections through every gateway, revoke it, and the answer says
/// all three confirmed; the very next request on every one of its
/// connections is 403 `agent_revoked`, while another agent is still served.
/// `?wait=false` answers `not_waited`; any other `wait` is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_answers_once_every_gateway_refuses() -> Result<()> {
    let redis_url = oneprotect_tests::require_redis();
    let mut fleet = Fleet::start("acked", &redis_url).await?;
    for _ in 0..3 {
        fleet.add_gateway(TUNING).await?;
    }
    let live = wait_live(&fleet, 3).await?;
    let mut addrs: Vec<String> = live.iter().map(|g| g.addr.clone()).collect();
    addrs.sort();
    let mut want: Vec<String> = fleet.gateways.iter().map(|g| g.addr.to_string()).collect();
    want.sort();
    assert_eq!(addrs, want, "each gateway registers its address");

    let bystander = fleet.enroll("bystander").await?;
    fleet.wait_projection(&bystander, "active").await?;
    let mut by = Open::new(&bystander, &fleet).await?;
    const VICTIMS: usize = 4;
    let mut accepted_after = 0;
    let mut refused_after = 0;
    let mut elapsed = Vec::new();
    for v in 0..VICTIMS {
        let agent = fleet.enroll(&format!("victim{v}")).await?;
        fleet.wait_projection(&agent, "active").await?;
        let mut open = Open::new(&agent, &fleet).await?;
        for (g, proto, st, code) in open.next("/api/before").await {
            assert_eq!(st, 200, "victim {v} gateway {g} {proto} before: {code}");
        }
        let (status, body) = revoke(&fleet, &agent, "").await?;
        // Nothing between the answer and the next requests.
        let after = open.next("/api/after").await;
        assert_eq!(status, 200, "{body}");
        let e = &body["enforcement"];
        assert_eq!(e["outcome"], "confirmed", "{body}");
        assert_eq!(e["gateways_live"], 3, "{body}");
        assert_eq!(e["gateways_confirmed"], 3, "{body}");
        assert_eq!(e["lagging"], json!([]), "{body}");
        assert!(e["seq"].as_u64().is_some_and(|s| s > 0), "{body}");
        elapsed.push(e["elapsed_ms"].as_f64().context("elapsed_ms")?);
        for (g, proto, st, code) in after {
            if st == 200 {
                accepted_after += 1;
            } else {
                refused_after += 1;
            }
            assert_eq!(
                (st, code.as_str()),
                (403, "agent_revoked"),
                "victim {v}: gateway {g} {proto}: the first request after the answer"
            );
        }
        for (g, proto, st, code) in by.next("/api/bystander").await {
            assert_eq!(st, 200, "bystander through gateway {g} {proto}: {code}");
        }
    }
    println!(
        "acked revocation: {VICTIMS} revocations through 3 gateways; first requests after the \
         answer on open h1+h2 connections: {refused_after} refused, {accepted_after} accepted; \
         commit → all confirmed (ms): {elapsed:?}"
    );
    assert_eq!(accepted_after, 0);

    // wait=false keeps the fire-and-forget answer; anything else is refused.
    let agent = fleet.enroll("nowait").await?;
    let (status, body) = revoke(&fleet, &agent, "?wait=false").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enforcement"]["outcome"], "not_waited", "{body}");
    assert_eq!(body["status"], "revoked", "{body}");
    let agent = fleet.enroll("badwait").await?;
    let (status, body) = revoke(&fleet, &agent, "?wait=maybe").await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "invalid_request", "{body}");
    // Refused before the commit: the agent is still active.
    let r = fleet
        .client
        .send(
            "GET",
            &format!("/api/v1/agents/{}", agent.id),
            Some(&fleet.key),
            None,
        )
        .await?;
    assert_eq!(r.body["status"], "active");

    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// One of three gateways frozen (SIGSTOP): the revoke answer arrives by the
/// deadline, says `lagging`, names the frozen gateway (its address and when
/// it fails closed) and counts the other two as confirmed; those refuse the
/// agent on the next request. Resumed (SIGCONT), the frozen gateway catches
/// up and refuses it too. A gateway stopped cleanly leaves the live set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_gateway_is_named_and_refuses_once_resumed() -> Result<()> {
    let redis_url = oneprotect_tests::require_redis();
    let mut fleet = Fleet::start("acked-frozen", &redis_url).await?;
    for _ in 0..3 {
        fleet.add_gateway(TUNING).await?;
    }
    wait_live(&fleet, 3).await?;
    let agent = fleet.enroll("victim").await?;
    fleet.wait_projection(&agent, "active").await?;
    let mut senders: Vec<Sender> = fleet
        .gateways
        .iter()
        .map(|g| Sender::new(&agent, g.addr))
        .collect();
    for (g, s) in senders.iter_mut().enumerate() {
        assert_eq!(s.send("/api/before").await.0, 200, "gateway {g}");
    }
    let frozen = 2;
    let pid = fleet.gateways[frozen].pid().context("gateway exited")?;
    kill("-STOP", pid)?;
    let res = async {
        let (status, body) = revoke(&fleet, &agent, "").await?;
        ensure!(status == 200, "{body}");
        let e = &body["enforcement"];
        ensure!(e["outcome"] == "lagging", "{body}");
        ensure!(
            e["gateways_live"] == 3 && e["gateways_confirmed"] == 2,
            "{body}"
        );
        let lagging = e["lagging"].as_array().context("lagging")?;
        ensure!(lagging.len() == 1, "{body}");
        ensure!(
            lagging[0]["addr"] == fleet.gateways[frozen].addr.to_string(),
            "the frozen gateway is named: {body}"
        );
        ensure!(lagging[0]["fails_closed_by"].is_string(), "{body}");
        // It waited for the deadline (the fleet's 2 s).
        ensure!(
            e["elapsed_ms"].as_f64().is_some_and(|ms| ms >= 2000.0),
            "{body}"
        );
        for g in (0..3).filter(|g| *g != frozen) {
            let (st, code) = senders[g].send("/api/after").await;
            ensure!(
                (st, code.as_str()) == (403, "agent_revoked"),
                "gateway {g}: {st} {code}"
            );
        }
        anyhow::Ok(e["seq"].as_u64().context("seq")?)
    }
    .await;
    // Resume whatever happened above.
    kill("-CONT", pid)?;
    let seq = res?;
    // Resumed: it applies the announcement it missed and reports it.
    let id_of_frozen = fleet.gateways[frozen].addr.to_string();
    let mut caught_up = false;
    for _ in 0..POLLS {
        let live = fleet.live_gateways().await;
        if live
            .iter()
            .any(|g| g.addr == id_of_frozen && g.applied >= seq)
        {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(caught_up, "the resumed gateway never reported seq {seq}");
    let (st, code) = senders[frozen].send("/api/resumed").await;
    assert_eq!((st, code.as_str()), (403, "agent_revoked"));

    // A clean stop removes the gateway from the live set at once (no
    // revocation waits for it).
    let pid0 = fleet.gateways[0].pid().context("gateway exited")?;
    kill("-TERM", pid0)?;
    wait_live(&fleet, 2).await?;

    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

fn kill(signal: &str, pid: u32) -> Result<()> {
    let st = std::process::Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill {signal} {pid}");
    Ok(())
}
