//! Redis Sentinel and Redis Cluster end to end: the real enroll-api (in
//! process, on PostgreSQL) and real `oneprotect-gateway` processes, both
//! configured with one `redis+sentinel://` or `redis+cluster://` URL, over
//! Redis servers this module starts from the machine's `redis-server` on
//! free loopback ports in a temporary directory.
//!
//! - **Cluster**: three masters (`redis-cli --cluster create`), a key
//!   prefix with a hash tag. An agent enrolled through the enroll-api is
//!   served (200), revoked through the admin API, refused (403
//!   `agent_revoked`). Then the node holding the gateway's subscription is
//!   killed: the gateway resubscribes on another node (distrusting its
//!   cache), keeps serving, and a revocation made after the loss still
//!   reaches it.
//! - **Sharded Cluster** (ADR-0024): three masters with a replica each,
//!   `shards = 12`, a prefix without a hash tag, two gateways. Tenants are
//!   made until one lives on each master (its keys read on that master's
//!   own connection); a revocation in each tenant is confirmed by both
//!   gateways and refused on the very next request of open connections.
//!   Then one tenant's master is killed: its replica takes over, a
//!   revocation answered just before the kill is on the new master (the
//!   relay waits for a replica, `wait_replicas = 1`, else replays it) and
//!   refused by the gateways and by a gateway started afterwards (empty
//!   cache), and a revocation after the failover reaches all three.
//! - **Sentinel**: one master, one replica, one Sentinel. The same
//!   enroll/serve/revoke round; then a Sentinel failover: gateway and
//!   enroll-api follow the new master on their reconnect, and a new agent is
//!   enrolled, served and revoked through it.
//!
//! `cargo test --workspace --test suite -- redis_ha:: --nocapture`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use crate::support::fleet::{Agent, Fleet, GwTuning, Sender, POLLS};
use crate::support::gateway::write;
use crate::support::redis::RedisProc;

/// The gateways' staleness bound in these tests, and their heartbeat.
const MAX_STALENESS_MS: u64 = 2000;
const HEARTBEAT_MS: u64 = 200;

/// Progress on stderr, with the time since the test started (for reading a
/// slow or failed run; nothing is asserted on it).
fn step(t0: Instant, what: &str) {
    eprintln!("[redis_ha {:>6} ms] {what}", t0.elapsed().as_millis());
}

/// Fails with instructions when the Redis tools are missing.
fn require_redis_tools() {
    for tool in ["redis-server", "redis-cli"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`{tool}` is not on PATH: these tests start their own Redis Cluster and Sentinel. \
             Install it (Debian/Ubuntu: `apt-get install redis-server`, which brings redis-cli)."
        );
    }
}

/// One command on a plain connection to the node on `port` (bounded).
async fn node_cmd<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let fut = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<T>(&mut c).await
    };
    Ok(tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .with_context(|| format!("redis on {port} timed out"))??)
}

/// The number of pub/sub clients connected to the node on `port`, not
/// counting Sentinel's own (0 when the node does not answer).
async fn pubsub_clients(port: u16) -> usize {
    node_cmd::<String>(
        port,
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub"),
    )
    .await
    .map(|s| {
        s.lines()
            .filter(|l| !l.trim().is_empty() && !l.contains(" name=sentinel-"))
            .count()
    })
    .unwrap_or(0)
}

/// Waits (bounded) until the node on `port` has a pub/sub client.
async fn wait_subscriber_on(port: u16) -> Result<()> {
    for _ in 0..POLLS {
        if pubsub_clients(port).await > 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("no subscriber ever showed up on redis {port}")
}

/// The gateways' settings in these tests.
const TUNING: GwTuning = GwTuning {
    max_staleness_ms: MAX_STALENESS_MS,
    heartbeat_ms: HEARTBEAT_MS,
};

/// Enrolls `name` through the fleet and waits until Redis (through the
/// topology under test) shows it active.
async fn enroll_active(fleet: &Fleet, name: &str) -> Result<Agent> {
    let agent = fleet.enroll(name).await?;
    fleet.wait_projection(&agent, "active").await?;
    Ok(agent)
}

/// Gateway `i`'s `oneprotect_gateway_revocation_cache_resets_total`.
async fn cache_resets(fleet: &Fleet, i: usize) -> Result<u64> {
    let text = admin_get(fleet.gateways[i].admin, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix("oneprotect_gateway_revocation_cache_resets_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no cache resets metric")
}

/// GET on an admin listener, returning the body (bounded).
async fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let fut = async {
        let stream = TcpStream::connect(admin).await?;
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))?;
        let body = s.send_request(req).await?.into_body().collect().await?;
        anyhow::Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("admin request timed out")?
}

/// Waits (bounded) until `agent` gets a 200 through `gw`; returns how many
/// requests were answered otherwise first (e.g. 503 while the gateway
/// reconnects).
async fn wait_served(gw: SocketAddr, agent: &Agent) -> Result<usize> {
    let mut s = Sender::new(agent, gw);
    for refused in 0..POLLS {
        if s.send("/api/wait").await.0 == 200 {
            return Ok(refused);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("agent {} never served through {gw}", agent.id)
}

/// What one revocation round measured.
struct Round {
    /// Requests the victim sent after the admin API answered.
    requests: usize,
    /// Admin API answer → first 403 `agent_revoked`.
    to_first_403: Duration,
}

/// After a topology change: enrolls a new agent named `name`, checks it is
/// served through `gw` without a refusal, then runs a [`revoke_round`] on it
/// with `bystander` still served.
async fn enroll_serve_and_revoke(
    fleet: &Fleet,
    gw: SocketAddr,
    name: &str,
    bystander: &Agent,
) -> Result<Round> {
    let fresh = enroll_active(fleet, name).await?;
    ensure!(
        wait_served(gw, &fresh).await? == 0,
        "{name} refused before being served"
    );
    revoke_round(fleet, gw, &fresh, bystander).await
}

/// Revokes `victim` through the admin API while it keeps sending through
/// `gw` (one keep-alive connection); checks it is refused with 403
/// `agent_revoked` — no request sent later than the staleness bound after
/// Redis showed the revocation is accepted, and every request after the
/// first refusal is refused — and that `bystander` is still served.
async fn revoke_round(
    fleet: &Fleet,
    gw: SocketAddr,
    victim: &Agent,
    bystander: &Agent,
) -> Result<Round> {
    let mut s = Sender::new(victim, gw);
    ensure!(
        s.send("/api/before").await.0 == 200,
        "victim not served before the revocation"
    );
    let r = fleet.revoke(victim).await?;
    ensure!(r.status == 200, "revoke: {} {}", r.status, r.body);
    let answered = Instant::now();
    let poll = async {
        let mut samples = Vec::new();
        for _ in 0..POLLS * 4 {
            let sent = Instant::now();
            let (status, code) = s.send("/api/after").await;
            let refused = status == 403 && code == "agent_revoked";
            samples.push((sent, status, code));
            if refused {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    };
    let (visible, mut samples) = tokio::join!(fleet.wait_projection(victim, "revoked"), poll);
    let visible = visible?;
    let Some(first) = samples
        .iter()
        .find(|(_, st, code)| *st == 403 && code == "agent_revoked")
        .map(|(sent, _, _)| *sent)
    else {
        bail!(
            "the gateway never refused the revoked agent: {:?}",
            samples.last()
        );
    };
    // Refused for good: a revoked answer is terminal.
    for _ in 0..20 {
        let sent = Instant::now();
        let (status, code) = s.send("/api/again").await;
        samples.push((sent, status, code));
    }
    let bound = visible + Duration::from_millis(MAX_STALENESS_MS);
    let late_accepts = samples
        .iter()
        .filter(|(sent, st, _)| *sent > bound && *st == 200)
        .count();
    ensure!(
        late_accepts == 0,
        "{late_accepts} requests accepted after the bound"
    );
    // After the first refusal: refused, or the connection the gateway
    // closed after refusing (status 0, the sender reconnects) — never served.
    let mut refused_again = 0;
    for (sent, st, code) in &samples {
        if *sent > first {
            ensure!(
                *st == 0 || (*st, code.as_str()) == (403, "agent_revoked"),
                "after the first refusal: {st} {code}"
            );
            refused_again += usize::from(*st == 403);
        }
    }
    ensure!(refused_again > 0, "refused only once");
    ensure!(
        Sender::new(bystander, gw).send("/api/other").await.0 == 200,
        "the other agent is still served"
    );
    Ok(Round {
        requests: samples.len(),
        to_first_403: first.saturating_duration_since(answered),
    })
}

/// Starts `masters` cluster-enabled masters with `replicas` replicas each
/// and joins them with `redis-cli --cluster create`; waits (bounded) for
/// `cluster_state:ok` on every node. Losing a master keeps the others
/// serving their slots (`cluster-require-full-coverage no`).
async fn start_cluster(dir: &Path, masters: usize, replicas: usize) -> Result<Vec<RedisProc>> {
    let mut nodes = Vec::new();
    for i in 0..masters * (1 + replicas) {
        let conf = format!("nodes-{i}.conf");
        nodes.push(
            RedisProc::start(
                dir,
                None,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ],
            )
            .await?,
        );
    }
    let mut cmd = tokio::process::Command::new("redis-cli");
    cmd.arg("--cluster").arg("create");
    for p in &nodes {
        cmd.arg(format!("127.0.0.1:{}", p.port));
    }
    cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("redis-cli --cluster create timed out")??;
    ensure!(
        out.status.success(),
        "redis-cli --cluster create failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &nodes {
        let mut ok = false;
        for _ in 0..POLLS {
            let info: String = node_cmd(p.port, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            if info.contains("cluster_state:ok") {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ensure!(ok, "cluster node {} never reached cluster_state:ok", p.port);
    }
    Ok(nodes)
}

/// The port of the master serving `slot`, from `CLUSTER NODES`.
async fn slot_owner(any: u16, slot: u16) -> Result<u16> {
    let text: String = node_cmd(any, redis::cmd("CLUSTER").arg("NODES")).await?;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // id addr flags master ping pong epoch link slot...
        let Some(addr) = f.get(1) else { continue };
        for range in f.iter().skip(8) {
            let range: &str = range;
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) else {
                continue;
            };
            if (lo..=hi).contains(&slot) {
                let port = addr
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
                    .context("node address")?;
                return Ok(port);
            }
        }
    }
    bail!("no node serves slot {slot}:\n{text}")
}

/// Redis Cluster: enroll, serve, revoke through one `redis+cluster://` URL;
/// then the node holding the gateway's subscription dies, the gateway
/// resubscribes on another node (a reconnect: the cache is distrusted),
/// keeps serving, and a later revocation still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_enroll_serve_revoke_and_survive_losing_the_subscribed_node() -> Result<()> {
    require_redis_tools();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let mut nodes = start_cluster(tmp.path(), 3, 0).await?;
    step(t0, "cluster up");
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();

    // Every key of the test is in the slot of this hash tag.
    let prefix = format!("{{{}}}:", oneprotect_tests::unique_name("redis_ha_cluster"));
    let slot: u16 = node_cmd(
        ports[0],
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{prefix}x")),
    )
    .await?;
    let owner = slot_owner(ports[0], slot).await?;
    let others: Vec<u16> = ports.iter().copied().filter(|p| *p != owner).collect();
    // Seed order: the subscription starts on the first seed, a node that
    // does not hold our slot, so it can die without taking the data along
    // (these masters have no replicas).
    let url = format!(
        "redis+cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{owner}",
        others[0], others[1]
    );
    let mut fleet = Fleet::start_with_prefix("redis_ha_cluster", &url, &prefix).await?;
    step(t0, "enroll-api up");
    let g = fleet.add_gateway(TUNING).await?;
    step(t0, "gateway ready");
    let gw = fleet.gateways[g].addr;
    let a0 = enroll_active(&fleet, "c0").await?;
    let a1 = enroll_active(&fleet, "c1").await?;
    step(t0, "agents enrolled");
    ensure!(
        wait_served(gw, &a0).await? == 0,
        "a0 refused before being served"
    );
    ensure!(
        wait_served(gw, &a1).await? == 0,
        "a1 refused before being served"
    );

    wait_subscriber_on(others[0]).await?;
    ensure!(
        pubsub_clients(owner).await == 0 && pubsub_clients(others[1]).await == 0,
        "the gateway subscribed somewhere else than the first seed"
    );
    step(t0, "serving; revoking");
    let first = revoke_round(&fleet, gw, &a0, &a1).await?;
    println!(
        "redis_ha cluster: slot {slot} on node {owner}, subscription on node {}; revoked agent: \
         {} requests, revoke answer -> first 403 in {} ms",
        others[0],
        first.requests,
        first.to_first_403.as_millis()
    );

    // Kill the node the subscription is on.
    let resets_before = cache_resets(&fleet, g).await?;
    let victim_node = nodes
        .iter_mut()
        .find(|n| n.port == others[0])
        .context("node")?;
    victim_node.kill().await;
    step(t0, "subscribed node killed");
    let killed = Instant::now();
    wait_subscriber_on(others[1])
        .await
        .with_context(|| fleet.gateway_log(g))?;
    let resubscribed = killed.elapsed();
    let refused_meanwhile = wait_served(gw, &a1).await?;
    fleet.wait_ready(g).await?;
    let resets_after = cache_resets(&fleet, g).await?;
    ensure!(
        resets_after > resets_before,
        "the resubscription did not distrust the cache ({resets_before} -> {resets_after})"
    );
    // The enroll-api still writes (its slot's node is alive), the gateway
    // still hears about it.
    step(t0, "resubscribed and serving");
    let second = enroll_serve_and_revoke(&fleet, gw, "c2", &a1).await?;
    println!(
        "redis_ha cluster: node {} killed; subscription moved to node {} after {} ms \
         ({refused_meanwhile} requests of a live agent refused meanwhile, cache resets \
         {resets_before} -> {resets_after}); new agent revoked after the loss: {} requests, \
         revoke answer -> first 403 in {} ms",
        others[0],
        others[1],
        resubscribed.as_millis(),
        second.requests,
        second.to_first_403.as_millis()
    );
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    drop(fleet);
    drop(nodes);
    Ok(())
}

/// One request of `agent` on `s` (an open keep-alive connection, reopened
/// by the sender if the gateway closed it).
async fn status_of(s: &mut Sender) -> (u16, String) {
    s.send("/api/probe").await
}

/// Revokes `victim` (tenant admin key `key`) while it holds an open, served
/// keep-alive connection through every gateway in `gws`; the answer must say
/// every one of the `live` gateways confirmed it on the tenant's `shard`,
/// and the very next request on every connection must be refused.
async fn revoke_confirmed_everywhere(
    fleet: &Fleet,
    key: &str,
    victim: &Agent,
    gws: &[SocketAddr],
    shard: u16,
) -> Result<f64> {
    let mut senders = Vec::new();
    for gw in gws {
        wait_served(*gw, victim).await?;
        let mut s = Sender::new(victim, *gw);
        ensure!(
            status_of(&mut s).await.0 == 200,
            "{} not served via {gw}",
            victim.id
        );
        senders.push(s);
    }
    let r = fleet.revoke_with(key, victim).await?;
    ensure!(r.status == 200, "revoke: {} {}", r.status, r.body);
    let e = &r.body["enforcement"];
    ensure!(
        e["outcome"] == "confirmed"
            && e["gateways_live"] == gws.len()
            && e["gateways_confirmed"] == gws.len()
            && e["shard"] == shard,
        "enforcement: {e}"
    );
    for (s, gw) in senders.iter_mut().zip(gws) {
        let (st, code) = status_of(s).await;
        ensure!(
            (st, code.as_str()) == (403, "agent_revoked"),
            "the next request via {gw} after a confirmed revocation: {st} {code}"
        );
    }
    Ok(e["elapsed_ms"].as_f64().unwrap_or(-1.0))
}

/// Redis Cluster with a sharded projection (ADR-0024): see the module
/// documentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sharded_projection_spreads_tenants_and_survives_a_master_failover() -> Result<()> {
    use oneprotect_identity::revocation::key_slot;
    const SHARDS: u16 = 12;
    require_redis_tools();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let mut nodes = start_cluster(tmp.path(), 3, 1).await?;
    step(t0, "cluster of 3 masters + 3 replicas up");
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    // No hash tag: each shard's own tag decides its slot.
    let prefix = format!("{}:", oneprotect_tests::unique_name("redis_ha_sharded"));
    let url = format!(
        "redis+cluster://{}",
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut fleet = Fleet::start_sharded("redis_ha_sharded", &url, &prefix, SHARDS, 1).await?;
    step(t0, "enroll-api up");
    fleet.add_gateway(TUNING).await?;
    fleet.add_gateway(TUNING).await?;
    let mut gws: Vec<SocketAddr> = fleet.gateways.iter().map(|g| g.addr).collect();
    step(t0, "two gateways ready");

    // Tenants until one lives on each master.
    let master_of = |t: &oneprotect_identity::TenantId, alive: u16| {
        let slot = key_slot(&fleet.keys.revocation_seq_of(fleet.keys.shard_of(t)));
        async move { slot_owner(alive, slot).await.map(|m| (slot, m)) }
    };
    let mut tenants: Vec<(oneprotect_identity::TenantId, String, u16, u16)> = Vec::new();
    let mut made = 0;
    let first = (fleet.tenant, fleet.key.clone());
    let mut next = Some(first);
    while tenants.len() < 3 {
        let (t, k) = match next.take() {
            Some(tk) => tk,
            None => {
                made += 1;
                ensure!(made <= 60, "60 tenants and still not one on every master");
                fleet.add_tenant(&format!("t{made}")).await?
            }
        };
        let (slot, master) = master_of(&t, ports[0]).await?;
        if tenants.iter().all(|(_, _, _, m)| *m != master) {
            tenants.push((t, k, slot, master));
        }
    }
    let masters: Vec<u16> = tenants.iter().map(|x| x.3).collect();
    step(
        t0,
        &format!("tenants on masters {masters:?} ({made} extra tenants made)"),
    );

    // A revocation in every tenant, on every gateway.
    let mut elapsed = Vec::new();
    for (i, (t, k, _, master)) in tenants.iter().enumerate() {
        let a = fleet.enroll_in(*t, k, &format!("x{i}")).await?;
        fleet.wait_projection(&a, "active").await?;
        // The agent's keys live on its tenant's master: a plain connection
        // to that node reads them (another node would answer MOVED).
        let on_master: Option<String> =
            node_cmd(*master, redis::cmd("GET").arg(fleet.agent_key(&a))).await?;
        ensure!(
            on_master.as_deref() == Some("active"),
            "{on_master:?} on {master}"
        );
        let shard = fleet.keys.shard_of(t);
        elapsed.push(revoke_confirmed_everywhere(&fleet, k, &a, &gws, shard).await?);
    }
    step(
        t0,
        &format!("one revocation per master confirmed by both gateways ({elapsed:?} ms)"),
    );

    // Fail over the first tenant's master.
    let (vt, vk, vslot, victim_master) = tenants[0].clone();
    let vshard = fleet.keys.shard_of(&vt);
    let before = fleet.enroll_in(vt, &vk, "y").await?;
    let after = fleet.enroll_in(vt, &vk, "z").await?;
    let bystander = fleet.enroll_in(vt, &vk, "w").await?;
    for a in [&before, &after, &bystander] {
        fleet.wait_projection(a, "active").await?;
    }
    revoke_confirmed_everywhere(&fleet, &vk, &before, &gws, vshard).await?;
    nodes
        .iter_mut()
        .find(|n| n.port == victim_master)
        .context("victim node")?
        .kill()
        .await;
    let killed = Instant::now();
    step(t0, &format!("master {victim_master} (slot {vslot}) killed"));
    let alive = *ports
        .iter()
        .find(|p| **p != victim_master)
        .context("a live node")?;
    let mut new_master = victim_master;
    for _ in 0..POLLS * 2 {
        if let Ok(m) = slot_owner(alive, vslot).await {
            if m != victim_master {
                new_master = m;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        new_master != victim_master,
        "no replica took over slot {vslot}"
    );
    let failover = killed.elapsed();
    step(
        t0,
        &format!(
            "replica {new_master} promoted after {} ms",
            failover.as_millis()
        ),
    );

    // The revocation answered before the kill is on the new master (the
    // replica had it, or the relay — whose row stays pending until a
    // replica confirms — wrote it again).
    let mut held = None;
    for _ in 0..POLLS * 2 {
        held =
            node_cmd::<Option<String>>(new_master, redis::cmd("GET").arg(fleet.agent_key(&before)))
                .await
                .ok()
                .flatten();
        if held.as_deref() == Some("revoked") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        held.as_deref() == Some("revoked"),
        "the revocation made before the failover is not on the new master: {held:?}"
    );
    // Both gateways serve the tenant again (after resubscribing) and still
    // refuse the agent revoked before the failover.
    for gw in &gws {
        wait_served(*gw, &bystander)
            .await
            .with_context(|| fleet.gateway_log(0))?;
        let (st, code) = Sender::new(&before, *gw).send("/api/again").await;
        ensure!(
            (st, code.as_str()) == (403, "agent_revoked"),
            "via {gw}: {st} {code}"
        );
    }
    // A gateway started now has no cache: it reads the new master.
    let g = fleet.add_gateway(TUNING).await?;
    gws.push(fleet.gateways[g].addr);
    let (st, code) = Sender::new(&before, gws[2]).send("/api/fresh").await;
    ensure!(
        (st, code.as_str()) == (403, "agent_revoked"),
        "a fresh gateway after the failover: {st} {code}"
    );
    // The new gateway serves as soon as it is ready; it counts as live once
    // its first presence is written: wait for that, or the revocation below
    // may rightly be confirmed by the two it knew of (seen under a loaded CI).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.live_gateways().await.len() < gws.len() {
        ensure!(
            Instant::now() < deadline,
            "the new gateway never became live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step(
        t0,
        "revocation from before the failover held everywhere; revoking after it",
    );
    let ms = revoke_confirmed_everywhere(&fleet, &vk, &after, &gws, vshard).await?;
    println!(
        "redis_ha sharded: {SHARDS} shards over masters {masters:?}; revocations confirmed by 2 \
         gateways in {elapsed:?} ms; master {victim_master} killed, replica {new_master} promoted \
         after {} ms; the revocation from before the kill held on the new master and on 3 \
         gateways; one after it confirmed by 3 gateways in {ms} ms",
        failover.as_millis()
    );
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    drop(fleet);
    drop(nodes);
    Ok(())
}

/// Redis Sentinel: enroll, serve, revoke through one `redis+sentinel://`
/// URL; then a Sentinel failover to the replica: the gateway and the
/// enroll-api follow the new master on their reconnect (Sentinel
/// disconnects the demoted master's clients), and an agent enrolled
/// afterwards is served and revoked through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_enroll_serve_revoke_and_follow_a_failover() -> Result<()> {
    require_redis_tools();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let master = RedisProc::start(dir, None, &[]).await?;
    let replica_of = master.port.to_string();
    let replica = RedisProc::start(dir, None, &["--replicaof", "127.0.0.1", &replica_of]).await?;
    // Sentinel rewrites its configuration file: give it its own.
    let conf = write(
        dir,
        "sentinel.conf",
        &format!(
            "sentinel monitor ha 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds ha 30000\n\
             sentinel failover-timeout ha 10000\n",
            master.port
        ),
    );
    let sentinel = RedisProc::start(dir, Some(&conf), &["--sentinel"]).await?;
    let master_port = |sentinel: u16| async move {
        node_cmd::<Vec<String>>(
            sentinel,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg("ha"),
        )
        .await
        .ok()
        .and_then(|v| v.get(1).and_then(|p| p.parse::<u16>().ok()))
    };
    ensure!(
        master_port(sentinel.port).await == Some(master.port),
        "sentinel does not know the master"
    );

    let url = format!("redis+sentinel://127.0.0.1:{}/ha", sentinel.port);
    let prefix = oneprotect_tests::unique_redis_prefix("redis_ha_sentinel");
    let mut fleet = Fleet::start_with_prefix("redis_ha_sentinel", &url, &prefix).await?;
    step(t0, "sentinel set and enroll-api up");
    let g = fleet.add_gateway(TUNING).await?;
    step(t0, "gateway ready");
    let gw = fleet.gateways[g].addr;
    let a0 = enroll_active(&fleet, "s0").await?;
    let a1 = enroll_active(&fleet, "s1").await?;
    ensure!(
        wait_served(gw, &a0).await? == 0,
        "a0 refused before being served"
    );
    ensure!(
        wait_served(gw, &a1).await? == 0,
        "a1 refused before being served"
    );
    wait_subscriber_on(master.port).await?;
    let first = revoke_round(&fleet, gw, &a0, &a1).await?;
    println!(
        "redis_ha sentinel: master {}; revoked agent: {} requests, revoke answer -> first 403 \
         in {} ms",
        master.port,
        first.requests,
        first.to_first_403.as_millis()
    );

    step(t0, "failing over");
    // Failover. Sentinel learns of the replica from the master's INFO (every
    // 10 s), so the command is retried until it has a candidate.
    let mut started = false;
    for _ in 0..POLLS * 2 {
        let r = node_cmd::<String>(
            sentinel.port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg("ha"),
        )
        .await;
        if r.is_ok() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(started, "SENTINEL FAILOVER never accepted");
    let failover = Instant::now();
    let mut promoted = false;
    for _ in 0..POLLS * 2 {
        if master_port(sentinel.port).await == Some(replica.port) {
            promoted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(promoted, "the replica never became master");
    // The old master is demoted (its clients disconnected); the gateway
    // resubscribes through the Sentinel, on the new master.
    wait_subscriber_on(replica.port)
        .await
        .with_context(|| fleet.gateway_log(g))?;
    let followed = failover.elapsed();
    let refused_meanwhile = wait_served(gw, &a1).await?;
    fleet.wait_ready(g).await?;
    step(t0, "following the new master");
    let second = enroll_serve_and_revoke(&fleet, gw, "s2", &a1).await?;
    println!(
        "redis_ha sentinel: failover {} -> {}; gateway subscribed on the new master {} ms after \
         SENTINEL FAILOVER ({refused_meanwhile} requests of a live agent refused meanwhile); new \
         agent revoked after the failover: {} requests, revoke answer -> first 403 in {} ms",
        master.port,
        replica.port,
        followed.as_millis(),
        second.requests,
        second.to_first_403.as_millis()
    );
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    drop(fleet);
    drop((sentinel, replica, master));
    Ok(())
}
