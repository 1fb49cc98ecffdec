//! The soak: mixed traffic through two real `oneprotect-gateway` processes
//! on one Redis and one enroll-api (PostgreSQL, own schema) while agents
//! enroll, rotate (confirmed, and unconfirmed so the grace period ends it)
//! and are revoked. Afterwards: no request from a revoked agent or a
//! superseded certificate was accepted once the bound had passed, no good
//! certificate was refused with a 403, and the gateways' resident memory did
//! not grow by more than [`RSS_GROWTH_LIMIT_KIB`] between the end of the
//! warm-up and the end of the run.
//!
//! CI runs it for [`DEFAULT_SECS`]; the full soak is ten minutes:
//! `ONEPROTECT_SOAK_SECS=600 cargo test -p oneprotect-tests --test suite soak:: -- --nocapture`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use oneprotect_agent::client::Endpoint;
use oneprotect_identity::AgentId;

use crate::support::fleet::{Agent, Fleet, GwTuning, Sender};

/// Seconds the CI variant runs.
const DEFAULT_SECS: u64 = 20;
/// How long after a revocation's (or a confirmation's) answer a gateway may
/// still accept the old identity: its `max_staleness`.
const TUNING: GwTuning = GwTuning {
    max_staleness_ms: 2000,
    heartbeat_ms: 200,
};
/// Rotation grace (the enroll-api's minimum): an unconfirmed rotation's previous certificate is
/// superseded this long after the rotation (plus one sweep interval).
const GRACE_SECS: u64 = 10;
/// The enroll-api's sweep interval in a fleet with rotation.
const SWEEP: Duration = Duration::from_millis(200);
/// Live (not revoked) agents kept between these numbers.
const MIN_LIVE: usize = 6;
const MAX_LIVE: usize = 12;
/// The stated figure: resident memory growth per gateway between the end of
/// the warm-up (a quarter of the run) and the end.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

/// One request of the soak.
#[derive(Debug, Clone)]
struct Shot {
    device: usize,
    /// Sent by a rotated-away certificate kept in use on purpose.
    ghost: bool,
    serial: String,
    sent: Instant,
    status: u16,
    code: String,
}

/// A device: its current identity, the gateway it talks to, and what has
/// been done to it.
struct Slot {
    agent: Agent,
    gateway: usize,
    busy: bool,
    /// The revoke call was made (refusals may start here: the announcement
    /// can beat the API's answer) ...
    revoking_since: Option<Instant>,
    /// ... and answered (the bound runs from here).
    revoked_at: Option<Instant>,
}

type Shots = Arc<Mutex<Vec<Shot>>>;

/// Sends as device `d` until `stop`, or until a while after its revocation;
/// picks up a rotated identity at the next request.
fn spawn_device(
    tasks: &mut tokio::task::JoinSet<()>,
    slots: Arc<Mutex<Vec<Slot>>>,
    d: usize,
    addrs: Arc<Vec<SocketAddr>>,
    shots: Shots,
    stop: Arc<AtomicBool>,
) {
    tasks.spawn(async move {
        let mut current: Option<(String, Sender)> = None;
        // Bounded: 50 requests/s for at most an hour.
        for _ in 0..180_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (agent, gateway, revoked_at) = {
                let s = &slots.lock().unwrap()[d];
                (s.agent.clone(), s.gateway, s.revoked_at)
            };
            if revoked_at.is_some_and(|t| t.elapsed() > TUNING_BOUND + Duration::from_secs(2)) {
                return;
            }
            if current.as_ref().is_none_or(|(s, _)| *s != agent.serial) {
                current = Some((agent.serial.clone(), Sender::new(&agent, addrs[gateway])));
            }
            let (serial, sender) = current.as_mut().unwrap();
            let sent = Instant::now();
            let (status, code) = sender.send("/api/soak").await;
            shots.lock().unwrap().push(Shot {
                device: d,
                ghost: false,
                serial: serial.clone(),
                sent,
                status,
                code,
            });
            let pause = if revoked_at.is_some() { 100 } else { 20 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    });
}

/// Keeps using a certificate after it was rotated away, for `how_long`.
fn spawn_ghost(
    tasks: &mut tokio::task::JoinSet<()>,
    agent: Agent,
    d: usize,
    addr: SocketAddr,
    shots: Shots,
    how_long: Duration,
) {
    tasks.spawn(async move {
        let mut sender = Sender::new(&agent, addr);
        let until = Instant::now() + how_long;
        for _ in 0..1000 {
            if Instant::now() > until {
                return;
            }
            let sent = Instant::now();
            let (status, code) = sender.send("/api/ghost").await;
            shots.lock().unwrap().push(Shot {
                device: d,
                ghost: true,
                serial: agent.serial.clone(),
                sent,
                status,
                code,
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

const TUNING_BOUND: Duration = Duration::from_millis(TUNING.max_staleness_ms);

/// Resident set size of process `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

/// Rotates `agent` through gateway `addr` with the agent library; returns
/// the new identity (not yet confirmed).
async fn rotate(fleet: &Fleet, agent: &Agent, addr: SocketAddr) -> Result<Agent> {
    let url = format!("https://{addr}");
    let id: AgentId = agent.id.parse()?;
    let old = Endpoint::new(&url, agent.tls.clone())?;
    let enrolled = oneprotect_agent::rotate::rotate(&old, id).await?;
    let pem = format!(
        "{}{}",
        enrolled.issued.certificate_pem, enrolled.issued.chain_pem
    );
    Ok(Agent {
        id: agent.id.clone(),
        tenant: agent.tenant,
        serial: enrolled.issued.serial.to_string(),
        tls: fleet.agent_tls(&pem, &enrolled.key_pem)?,
    })
}

/// Confirms `next` (presenting it through `addr`), retrying while its
/// projection is on its way (503); checks that `previous` was superseded.
async fn confirm(next: &Agent, previous: &Agent, addr: SocketAddr) -> Result<()> {
    let id: AgentId = next.id.parse()?;
    let new = Endpoint::new(&format!("https://{addr}"), next.tls.clone())?;
    let mut last = None;
    for _ in 0..200 {
        match oneprotect_agent::rotate::confirm(&new, id).await {
            Ok(c) => {
                anyhow::ensure!(
                    c.superseded_serial.map(|s| s.to_string()) == Some(previous.serial.clone()),
                    "confirm superseded {:?}, not {}",
                    c.superseded_serial,
                    previous.serial
                );
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("confirm never succeeded: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_lifecycle_under_load() -> Result<()> {
    let secs: u64 = match std::env::var("ONEPROTECT_SOAK_SECS") {
        Ok(v) => v.parse().context("ONEPROTECT_SOAK_SECS: seconds")?,
        Err(_) => DEFAULT_SECS,
    };
    let run = Duration::from_secs(secs);
    let redis_url = oneprotect_tests::require_redis();
    let mut fleet = Fleet::start_with_rotation("soak", &redis_url, GRACE_SECS).await?;
    for _ in 0..2 {
        fleet.add_gateway(TUNING).await?;
    }
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(fleet.gateways.iter().map(|g| g.addr).collect());
    let pids: Vec<u32> = fleet
        .gateways
        .iter()
        .map(|g| g.pid().context("gateway pid"))
        .collect::<Result<_>>()?;

    let slots: Arc<Mutex<Vec<Slot>>> = Arc::new(Mutex::new(Vec::new()));
    let shots: Shots = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    // serial → (rotation started: refusals may begin; superseded at the
    // latest: confirm answered, or grace + sweep after an unconfirmed
    // rotation).
    let mut superseded: HashMap<String, (Instant, Instant)> = HashMap::new();
    let (mut enrolled, mut rotations, mut unconfirmed, mut revocations) = (0, 0, 0, 0);
    let mut tick = 0usize;
    let started = Instant::now();
    let mut rss_warm: Option<Vec<u64>> = None;
    let rss_start: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_>>()?;
    let mut rss_max = rss_start.clone();

    while started.elapsed() < run {
        tick += 1;
        let live: Vec<usize> = {
            let s = slots.lock().unwrap();
            (0..s.len())
                .filter(|&d| s[d].revoked_at.is_none() && !s[d].busy)
                .collect()
        };
        match tick % 3 {
            // Enroll while below the ceiling.
            0 | 1 if live.len() < MAX_LIVE => {
                let d = slots.lock().unwrap().len();
                let agent = fleet.enroll(&format!("soak{d}")).await?;
                fleet.wait_projection(&agent, "active").await?;
                slots.lock().unwrap().push(Slot {
                    agent,
                    gateway: d % addrs.len(),
                    busy: false,
                    revoking_since: None,
                    revoked_at: None,
                });
                enrolled += 1;
                spawn_device(
                    &mut tasks,
                    slots.clone(),
                    d,
                    addrs.clone(),
                    shots.clone(),
                    stop.clone(),
                );
            }
            // Rotate; every third rotation is left unconfirmed.
            1 if !live.is_empty() => {
                let d = live[tick / 3 % live.len()];
                let (agent, gateway) = {
                    let mut s = slots.lock().unwrap();
                    s[d].busy = true;
                    (s[d].agent.clone(), s[d].gateway)
                };
                rotations += 1;
                let confirmed = rotations % 3 != 0;
                let started = Instant::now();
                let next = rotate(&fleet, &agent, addrs[gateway]).await?;
                // The device moves to the new certificate first, as the
                // agent library's run loop does, then confirms.
                slots.lock().unwrap()[d].agent = next.clone();
                if confirmed {
                    confirm(&next, &agent, addrs[gateway]).await?;
                }
                let answered = Instant::now();
                let at = if confirmed {
                    answered
                } else {
                    unconfirmed += 1;
                    answered + Duration::from_secs(GRACE_SECS) + SWEEP
                };
                superseded.insert(agent.serial.clone(), (started, at));
                slots.lock().unwrap()[d].busy = false;
                let ghost_for = (at - answered) + TUNING_BOUND + Duration::from_secs(1);
                spawn_ghost(
                    &mut tasks,
                    agent,
                    d,
                    addrs[gateway],
                    shots.clone(),
                    ghost_for,
                );
            }
            // Revoke while above the floor.
            2 if live.len() > MIN_LIVE => {
                let d = live[tick / 3 % live.len()];
                let agent = {
                    let mut s = slots.lock().unwrap();
                    s[d].revoking_since = Some(Instant::now());
                    s[d].agent.clone()
                };
                let r = fleet.revoke(&agent).await?;
                anyhow::ensure!(r.status == 200, "revoke: {} {}", r.status, r.body);
                slots.lock().unwrap()[d].revoked_at = Some(Instant::now());
                revocations += 1;
            }
            _ => {}
        }
        if rss_warm.is_none() && started.elapsed() > run / 4 {
            rss_warm = Some(pids.iter().map(|p| rss_kib(*p)).collect::<Result<_>>()?);
        }
        for (i, p) in pids.iter().enumerate() {
            rss_max[i] = rss_max[i].max(rss_kib(*p)?);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Let the last revocations and supersessions pass their bound under load.
    tokio::time::sleep(TUNING_BOUND + Duration::from_secs(GRACE_SECS) + Duration::from_secs(1))
        .await;
    let rss_end: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_>>()?;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let shots = shots.lock().unwrap().clone();
    let revoked: Vec<(Option<Instant>, Option<Instant>)> = slots
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.revoking_since, s.revoked_at))
        .collect();

    // Wrong accepts: anything accepted after a revocation's answer + bound,
    // or from a certificate after its supersession + bound. Wrong refusals:
    // a device's current certificate refused before any change to it began.
    let mut after_bound = 0;
    let mut wrongly_accepted = Vec::new();
    let mut wrongly_refused = Vec::new();
    let mut good = 0;
    for s in &shots {
        let (revoking, revoked) = revoked[s.device];
        let (rotating, superseded_at) = superseded.get(&s.serial).copied().unzip();
        let dead_at = [revoked, superseded_at].into_iter().flatten().min();
        let changing_since = [revoking, rotating].into_iter().flatten().min();
        if dead_at.is_some_and(|t| s.sent > t + TUNING_BOUND) {
            after_bound += 1;
            if s.status == 200 {
                wrongly_accepted.push(s.clone());
            } else if s.status == 403 {
                let ok = [
                    "agent_revoked",
                    "certificate_revoked",
                    "certificate_superseded",
                ];
                assert!(ok.contains(&s.code.as_str()), "{s:?}");
            }
        } else if !s.ghost && changing_since.is_none_or(|t| s.sent < t) {
            good += 1;
            if s.status != 200 {
                wrongly_refused.push(s.clone());
            }
        }
    }
    let warm = rss_warm.unwrap_or_else(|| rss_start.clone());
    let growth: Vec<i64> = warm
        .iter()
        .zip(&rss_end)
        .map(|(w, e)| i64::try_from(*e).unwrap() - i64::try_from(*w).unwrap())
        .collect();
    let mut refused_by: HashMap<(u16, String), usize> = HashMap::new();
    for s in &wrongly_refused {
        *refused_by.entry((s.status, s.code.clone())).or_default() += 1;
    }
    println!(
        "soak {secs} s: {} requests through {} gateways; {enrolled} enrolled, {rotations} \
         rotations ({unconfirmed} left to the {GRACE_SECS} s grace), {revocations} revoked; \
         {after_bound} requests after a revocation or supersession bound, {} accepted; good \
         requests {good}, refused {} {refused_by:?}; gateway RSS KiB start {rss_start:?}, after \
         warm-up {warm:?}, max {rss_max:?}, end {rss_end:?}, growth after warm-up {growth:?} \
         (limit {RSS_GROWTH_LIMIT_KIB})",
        shots.len(),
        addrs.len(),
        wrongly_accepted.len(),
        wrongly_refused.len(),
    );
    assert!(rotations > 0 && unconfirmed > 0 && revocations > 0);
    assert!(
        after_bound > 0,
        "no request tested a bound: the soak proved nothing"
    );
    assert!(wrongly_accepted.is_empty(), "{wrongly_accepted:?}");
    // A good certificate is never refused as revoked or superseded.
    assert!(
        wrongly_refused.iter().all(|s| s.status != 403),
        "{wrongly_refused:?}"
    );
    for g in &growth {
        assert!(
            *g <= i64::try_from(RSS_GROWTH_LIMIT_KIB).unwrap(),
            "gateway RSS grew {g} KiB after the warm-up"
        );
    }
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    Ok(())
}
