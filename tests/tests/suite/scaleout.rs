//! Several gateways on one Redis: real `oneprotect-gateway` processes, one
//! in-process enroll-api on PostgreSQL (own schema) writing the revocation
//! projection to Redis (own key prefix), agents enrolled through the real
//! exchange and sending bounded load through every gateway. A revocation
//! made with the admin API must reach every gateway; a gateway started after
//! it refuses the revoked agent from its first request.
//!
//! The fixture ([`Fleet`]) lives in `support::fleet`, shared with `faults`,
//! `redis_ha` and `soak`.
//!
//! `cargo test -p oneprotect-tests --test suite scaleout::`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::support::fleet::{admin_status, Fleet, GwTuning, Load, Sample, Sender, POLLS};
use crate::support::gateway::TD;
use oneprotect_testpki::TestPki;

const TUNING: GwTuning = GwTuning {
    max_staleness_ms: 2000,
    heartbeat_ms: 200,
};

/// Three gateway processes on one Redis and one enroll-api, four agents
/// sending through all of them; an admin revocation reaches every gateway
/// (no request of the revoked agent accepted once the bound has passed
/// after Redis showed it), the others keep working, and a fourth gateway
/// started afterwards refuses the revoked agent from its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_revocation_reaches_every_gateway() -> Result<()> {
    let redis_url = oneprotect_tests::require_redis();
    let mut fleet = Fleet::start("scaleout", &redis_url).await?;
    for _ in 0..3 {
        fleet.add_gateway(TUNING).await?;
    }
    let mut agents = Vec::new();
    for i in 0..4 {
        let a = fleet.enroll(&format!("agent{i}")).await?;
        fleet.wait_projection(&a, "active").await?;
        agents.push(a);
    }
    let addrs: Vec<SocketAddr> = fleet.gateways.iter().map(|g| g.addr).collect();
    let load = Load::start(&agents, &addrs, Duration::from_millis(20), 5000);
    // Everyone gets through everywhere first.
    load.more(agents.len() * addrs.len() * 5).await;

    let victim = 0;
    let r = fleet.revoke(&agents[victim]).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let visible = fleet.wait_projection(&agents[victim], "revoked").await?;
    let bound = Duration::from_millis(TUNING.max_staleness_ms);
    // Keep the load going past the bound, then a little more.
    tokio::time::sleep(bound).await;
    load.more(agents.len() * addrs.len() * 10).await;
    let samples = load.finish().await;

    let after_bound = visible + bound;
    let victim_after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.agent == victim && s.sent > after_bound)
        .collect();
    let wrongly_accepted = victim_after.iter().filter(|s| s.status == 200).count();
    let accepted_in_bound = samples
        .iter()
        .filter(|s| s.agent == victim && s.sent > visible && s.sent <= after_bound)
        .filter(|s| s.status == 200)
        .count();
    for g in 0..addrs.len() {
        let refused = victim_after
            .iter()
            .filter(|s| s.gateway == g && s.status == 403 && s.code == "agent_revoked")
            .count();
        assert!(refused > 0, "gateway {g} never refused the revoked agent");
    }
    for s in &victim_after {
        assert_eq!((s.status, s.code.as_str()), (403, "agent_revoked"), "{s:?}");
    }
    let others_refused = samples
        .iter()
        .filter(|s| s.agent != victim && s.status != 200)
        .count();
    let total = samples.len();
    println!(
        "scaleout: {total} requests through {} gateways; revoked agent: {} requests after the bound, \
         {wrongly_accepted} accepted; {accepted_in_bound} accepted between Redis showing the \
         revocation and the bound; other agents refused: {others_refused}",
        addrs.len(),
        victim_after.len()
    );
    assert_eq!(wrongly_accepted, 0);
    assert_eq!(others_refused, 0, "no collateral refusals");

    // A gateway started after the revocation: refused from the first request.
    let late = fleet.add_gateway(TUNING).await?;
    let addr = fleet.gateways[late].addr;
    let mut s = Sender::new(&agents[victim], addr);
    assert_eq!(s.send("/api/first").await, (403, "agent_revoked".into()));
    let mut s = Sender::new(&agents[1], addr);
    assert_eq!(s.send("/api/first").await.0, 200);
    for g in 0..fleet.gateways.len() {
        assert_eq!(
            admin_status(fleet.gateways[g].admin, "/healthz").await,
            Some(200)
        );
    }
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// Sends `signal` (e.g. `-HUP`) to gateway `i`'s process.
fn signal(fleet: &Fleet, i: usize, signal: &str) -> Result<()> {
    let pid = fleet.gateways[i]
        .child
        .as_ref()
        .and_then(|c| c.id())
        .context("gateway exited")?;
    let st = std::process::Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill {signal} {pid}");
    Ok(())
}

/// The gateway process: SIGHUP swaps the trust bundle without dropping open
/// connections (new handshakes use the new bundle), and SIGTERM stops it
/// cleanly (exit status 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_process_reloads_the_bundle_on_sighup_and_exits_on_sigterm() -> Result<()> {
    let redis_url = oneprotect_tests::require_redis();
    let mut fleet = Fleet::start("signals", &redis_url).await?;
    let g = fleet
        .add_gateway(GwTuning {
            max_staleness_ms: 5000,
            heartbeat_ms: 200,
        })
        .await?;
    let agent = fleet.enroll("sig").await?;
    fleet.wait_projection(&agent, "active").await?;
    let addr = fleet.gateways[g].addr;
    let mut open = Sender::new(&agent, addr);
    assert_eq!(open.send("/api/before").await.0, 200);

    // A bundle without the platform root: new handshakes fail, the open
    // keep-alive connection keeps its verified identity.
    let bundle = fleet.dir.join("bundle.pem");
    let original = std::fs::read_to_string(&bundle)?;
    std::fs::write(&bundle, TestPki::new(TD).root_pem())?;
    signal(&fleet, g, "-HUP")?;
    let mut refused = false;
    for _ in 0..POLLS {
        // Refused at the handshake (0), or — a TLS 1.3 session resumed from
        // a ticket, which the gateway re-validates against the current
        // bundle — served without an identity (401).
        let (status, code) = Sender::new(&agent, addr).send("/api/fresh").await;
        if status == 0 || (status == 401 && code == "identity_required") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(
        refused,
        "new handshakes still accepted after SIGHUP with a foreign bundle"
    );
    assert_eq!(
        open.send("/api/still-open").await.0,
        200,
        "the open connection survives the reload"
    );

    // Back to the platform root: new handshakes are accepted again.
    std::fs::write(&bundle, original)?;
    signal(&fleet, g, "-HUP")?;
    let mut back = false;
    for _ in 0..POLLS {
        if Sender::new(&agent, addr).send("/api/again").await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(
        back,
        "new handshakes not accepted after restoring the bundle"
    );

    // SIGTERM: a clean exit, bounded in time.
    signal(&fleet, g, "-TERM")?;
    let mut child = fleet.gateways[g].child.take().context("child")?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("gateway did not exit within 30 s of SIGTERM")??;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    Ok(())
}
