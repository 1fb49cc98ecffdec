//! The scenarios and the `all` run that puts them side by side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use oneprotect_identity::revocation::Change;
use oneprotect_identity::{AgentId, KeySchema};
use tokio::net::TcpStream;

use crate::child::{free_port, Server};
use crate::cpu::{rss_kib, CpuMeter};
use crate::load::{self, LoadSpec, Proto, Target};
use crate::pki::BenchPki;
use crate::report::{IdleRecord, Report, RevocationRecord, RunRecord};

/// How the revocation scenario revokes agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RevokeVia {
    /// The enroll-api's admin API (agents enrolled through the real exchange).
    EnrollApi,
    /// A direct projection write + announcement, as the enroll-api's relay does.
    Redis,
}

/// Sizes of a run.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Agent identities.
    pub agents: usize,
    /// Tenants they are spread over.
    pub tenants: usize,
    /// Connections for keep-alive and handshake load.
    pub concurrency: usize,
    /// Length of each load run.
    pub duration: Duration,
    /// Request cap of each load run.
    pub max_requests: u64,
    /// Total rate of the fixed-rate latency runs, req/s.
    pub latency_rate: f64,
    /// Idle connections held.
    pub idle: usize,
    /// Agents revoked in the revocation scenario.
    pub revocations: usize,
    /// Bound after which no revoked request may be accepted, ms.
    pub revocation_bound_ms: f64,
}

impl Sizes {
    /// Full size: the figures for bench/RESULTS.md.
    pub fn full() -> Self {
        Self {
            agents: 1000,
            tenants: 10,
            concurrency: 64,
            duration: Duration::from_secs(10),
            max_requests: 5_000_000,
            latency_rate: 2000.0,
            idle: 2000,
            revocations: 200,
            revocation_bound_ms: 50.0,
        }
    }

    /// `--quick`: every scenario in well under two minutes.
    pub fn quick() -> Self {
        Self {
            agents: 200,
            tenants: 4,
            concurrency: 16,
            duration: Duration::from_secs(3),
            max_requests: 1_000_000,
            latency_rate: 1000.0,
            idle: 300,
            revocations: 50,
            revocation_bound_ms: 50.0,
        }
    }

    /// `--tiny`: the smoke test that keeps the harness from rotting.
    pub fn tiny() -> Self {
        Self {
            agents: 12,
            tenants: 2,
            concurrency: 2,
            duration: Duration::from_millis(500),
            max_requests: 20_000,
            latency_rate: 200.0,
            idle: 10,
            revocations: 5,
            revocation_bound_ms: 50.0,
        }
    }
}

/// What the `all` run needs from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sizes.
    pub sizes: Sizes,
    /// Output directory.
    pub out: PathBuf,
    /// Where cached identities live.
    pub cache: PathBuf,
    /// Redis for the revocation projection.
    pub redis_url: String,
    /// Pin servers under test to these CPUs (a `taskset -c` list), if any.
    pub server_cpu: Option<String>,
    /// Worker threads (gateway `runtime.threads`, HAProxy `nbthread`) and
    /// worker processes (nginx `worker_processes`) of the servers under test.
    pub server_threads: usize,
    /// Skip nginx even if installed.
    pub no_nginx: bool,
    /// Skip HAProxy even if installed.
    pub no_haproxy: bool,
    /// How the revocation scenario revokes.
    pub revoke_via: RevokeVia,
    /// Gateways of the revocation scenario's second run (1: no second run).
    pub revocation_gateways: usize,
    /// The command line, for the report.
    pub command: String,
    /// Run only these scenarios (`keepalive`, `latency`, `latency-seq1`,
    /// `latency-seq8`, `handshake`, `handshake-resumed`, `idle`,
    /// `revocation`); empty: all of them.
    pub only: Vec<String>,
    /// The gateway's `listener.read_buffer_bytes` (its default when `None`).
    pub gateway_read_buffer: Option<usize>,
    /// The gateway's `listener.write_buffer_bytes` (its default when `None`).
    pub gateway_write_buffer: Option<usize>,
    /// The gateway's `listener.http1_fast_path`.
    pub gateway_http1_fast_path: bool,
    /// The gateway's `listener.http2_fast_path`.
    pub gateway_http2_fast_path: bool,
    /// The gateway's `runtime.work_stealing`.
    pub gateway_work_stealing: bool,
    /// Keep-alive runs only over this protocol (`None`: HTTP/1.1 and h2).
    pub proto: Option<Proto>,
}

/// Every scenario name `--only` accepts.
pub const SCENARIOS: &[&str] = &[
    "keepalive",
    "latency",
    "latency-seq1",
    "latency-seq8",
    "handshake",
    "handshake-resumed",
    "idle",
    "revocation",
];

impl Options {
    /// Whether scenario `name` runs.
    pub fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

async fn upstream_stats(addr: SocketAddr) -> Option<(u64, u64)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut s, c) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(c);
    let req = http::Request::get("/__stats")
        .header("host", addr.to_string())
        .body(Empty::new())
        .ok()?;
    let body = s
        .send_request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((v["connections"].as_u64()?, v["requests"].as_u64()?))
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(String::new(), |kb| format!(", {} GiB", kb / 1024 / 1024));
    format!("{cores} cores ({model}){mem}")
}

struct Env {
    pki: BenchPki,
    upstream: Server,
    upstream_addr: SocketAddr,
}

/// Runs one load against `target`, measuring `cpu_pid`'s CPU time.
async fn measure(
    report: &mut Report,
    env: &Env,
    scenario: &str,
    target: &Target,
    cpu_pid: u32,
    spec: &LoadSpec,
    resumption: bool,
) -> anyhow::Result<()> {
    let configs = env.pki.client_configs(spec.proto.alpn(), resumption)?;
    let before = upstream_stats(env.upstream_addr).await;
    let meter = CpuMeter::start(cpu_pid);
    let label = format!("{scenario} {} {:?}", target.name, spec.proto);
    let r = match scenario {
        "handshake" | "handshake-resumed" => load::handshakes(target, &configs, spec, &label).await,
        _ => load::keepalive(target, &configs, spec, &label).await,
    };
    let cpu = meter.elapsed_cpu();
    let after = upstream_stats(env.upstream_addr).await;
    let upstream_conns = match (before, after) {
        // The stats request itself opens one connection.
        (Some((b, _)), Some((a, _))) => Some(a.saturating_sub(b).saturating_sub(1)),
        _ => None,
    };
    let proto = match spec.proto {
        Proto::H1 => "h1",
        Proto::H2 => "h2",
    };
    report.runs.push(RunRecord::new(
        scenario,
        &target.name,
        proto,
        spec.concurrency,
        spec.rate,
        &r,
        cpu,
        upstream_conns,
    ));
    Ok(())
}

/// Runs every scenario against every available target and returns the report.
pub async fn run_all(opts: &Options) -> anyhow::Result<Report> {
    let s = &opts.sizes;
    std::fs::create_dir_all(&opts.out)?;
    let mut report = Report {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        command: opts.command.clone(),
        machine: machine(),
        server_threads: opts.server_threads,
        ..Report::default()
    };
    let pki = BenchPki::load_or_mint(&opts.cache, s.agents, s.tenants)?;
    let files = pki.write_server_files(&opts.out.join("pki"))?;
    let ids = crate::gateway::identities(&pki)?;

    // The upstream: this binary in `upstream` mode.
    let up_port = free_port()?;
    let upstream_addr: SocketAddr = format!("127.0.0.1:{up_port}").parse()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("upstream")
        .arg("--listen")
        .arg(upstream_addr.to_string());
    let up_log = opts.out.join("upstream.log");
    let mut upstream = Server::spawn("upstream", cmd, &up_log)?;
    upstream.wait_ready(upstream_addr, Duration::from_secs(10), &up_log)?;
    let env = Env {
        pki,
        upstream,
        upstream_addr,
    };

    // Redis: the projection the gateway reads, under a prefix of our own.
    let keys = KeySchema::new(format!("bench:{}:", uuid::Uuid::new_v4().simple()));
    let client = redis::Client::open(opts.redis_url.as_str()).context("Redis URL")?;
    let mut redis = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("Redis at {} did not answer within 3 s", opts.redis_url))?
    .with_context(|| format!("connect to Redis at {}", opts.redis_url))?;
    crate::gateway::publish_active(&mut redis, &keys, &ids).await?;

    let result = async {
        let enroll_api = match opts.revoke_via {
            RevokeVia::EnrollApi if opts.wanted("revocation") => {
                let api = crate::enroll::EnrollApi::start(
                    &opts.out.join("enroll-api"),
                    &opts.redis_url,
                    keys.prefix(),
                )?;
                // The gateway trusts the bench root and the enroll-api's root.
                let mut bundle = std::fs::read_to_string(&files.client_roots)?;
                bundle.push('\n');
                bundle.push_str(&api.trust_bundle().await?);
                std::fs::write(&files.client_roots, bundle)?;
                Some(api)
            }
            _ => None,
        };
        // Every gateway process of the run: same files, Redis and tuning.
        let start_gateway = |dir: &str| {
            crate::gateway::start(
                &opts.out.join(dir),
                upstream_addr,
                &files,
                &opts.redis_url,
                keys.prefix(),
                opts.server_cpu.as_deref(),
                crate::gateway::Tuning {
                    read_buffer: opts.gateway_read_buffer,
                    write_buffer: opts.gateway_write_buffer,
                    http1_fast_path: opts.gateway_http1_fast_path,
                    http2_fast_path: opts.gateway_http2_fast_path,
                    work_stealing: opts.gateway_work_stealing,
                    threads: opts.server_threads,
                },
            )
        };
        let gw = start_gateway("gateway")?;
        // A baseline: skipped on request or when not installed, with a note.
        type Start = fn(
            &std::path::Path,
            SocketAddr,
            SocketAddr,
            &crate::pki::ServerFiles,
            Option<&str>,
            usize,
        ) -> anyhow::Result<Option<Server>>;
        let mut baseline = |name: &str, pkg: &str, skip: bool, start: Start| {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            if skip {
                report.notes.push(format!("{name} skipped (--no-{pkg})"));
                return anyhow::Ok((addr, None));
            }
            let server = start(
                &opts.out.join(pkg),
                addr,
                upstream_addr,
                &files,
                opts.server_cpu.as_deref(),
                opts.server_threads,
            )?;
            if server.is_none() {
                report.notes.push(format!(
                    "{name} not installed: {name} baseline skipped (apt-get install {pkg})"
                ));
            }
            Ok((addr, server))
        };
        let (nginx_addr, nginx) = baseline("nginx", "nginx", opts.no_nginx, crate::nginx::start)?;
        let (haproxy_addr, haproxy) =
            baseline("HAProxy", "haproxy", opts.no_haproxy, crate::haproxy::start)?;

        let direct = Target {
            name: "direct".into(),
            addr: upstream_addr,
            tls: false,
            path: "/".into(),
        };
        let gateway = Target {
            name: "gateway".into(),
            addr: gw.listen,
            tls: true,
            path: "/".into(),
        };
        let nginx_t = Target {
            name: "nginx".into(),
            addr: nginx_addr,
            tls: true,
            path: "/".into(),
        };
        let haproxy_t = Target {
            name: "haproxy".into(),
            addr: haproxy_addr,
            tls: true,
            path: "/".into(),
        };
        let mut targets: Vec<(&Target, u32)> = vec![(&gateway, gw.server.pid())];
        if let Some(n) = &nginx {
            targets.push((&nginx_t, n.pid()));
        }
        if let Some(h) = &haproxy {
            targets.push((&haproxy_t, h.pid()));
        }
        // The baselines must have their revocation check on: a certificate
        // on its CA's CRL is refused, one that is not is served.
        for (t, _) in targets.iter().skip(1) {
            refuses_revoked(&env, t).await?;
            report.notes.push(format!(
                "{}: checked before the runs: a certificate on its CA's CRL is refused, a good one served",
                t.name
            ));
        }

        let closed = |proto| LoadSpec {
            concurrency: s.concurrency,
            duration: s.duration,
            max_requests: s.max_requests,
            proto,
            rate: None,
        };
        let fixed = LoadSpec {
            rate: Some(s.latency_rate),
            ..closed(Proto::H1)
        };
        // Added latency at microsecond resolution: a closed loop (the next
        // request leaves when the answer is in; no timer, no queueing in the
        // load generator) on 1 and on 8 keep-alive connections.
        let sequential = |concurrency| LoadSpec {
            concurrency,
            ..closed(Proto::H1)
        };

        for (scenario, spec) in [
            ("keepalive", closed(Proto::H1)),
            ("latency", fixed.clone()),
            ("latency-seq1", sequential(1)),
            ("latency-seq8", sequential(8)),
        ] {
            if opts.wanted(scenario) {
                let pid = env.upstream.pid();
                measure(&mut report, &env, scenario, &direct, pid, &spec, true).await?;
            }
        }
        // (scenario, load, whether the client may resume TLS sessions)
        let plan = [
            ("keepalive", closed(Proto::H1), true),
            ("keepalive", closed(Proto::H2), true),
            ("latency", fixed.clone(), true),
            ("latency-seq1", sequential(1), true),
            ("latency-seq8", sequential(8), true),
            ("handshake", closed(Proto::H1), false),
            ("handshake-resumed", closed(Proto::H1), true),
        ];
        for (t, pid) in &targets {
            for (scenario, spec, resumption) in &plan {
                if opts.wanted(scenario) && opts.proto.is_none_or(|p| p == spec.proto) {
                    measure(&mut report, &env, scenario, t, *pid, spec, *resumption).await?;
                }
            }
        }
        for (t, pid) in &targets {
            if opts.wanted("idle") {
                report.idle.push(idle(&env, t, *pid, s.idle).await?);
            }
        }
        if opts.wanted("revocation") {
            report.revocation = Some(
                revocation(
                    &env,
                    std::slice::from_ref(&gateway),
                    &ids,
                    &keys,
                    &mut redis,
                    &opts.redis_url,
                    enroll_api.as_ref(),
                    s,
                )
                .await?,
            );
            if enroll_api.is_some() && opts.revocation_gateways > 1 {
                // More gateway processes on the same Redis: the revoke API
                // waits for every one of them (ADR-0022).
                let mut extra = Vec::new();
                let mut fleet = vec![gateway.clone()];
                for i in 1..opts.revocation_gateways {
                    let g = start_gateway(&format!("gateway-{}", i + 1))?;
                    fleet.push(Target {
                        name: format!("gateway-{}", i + 1),
                        addr: g.listen,
                        tls: true,
                        path: "/".into(),
                    });
                    extra.push(g);
                }
                wait_live_gateways(&mut redis, &keys, fleet.len()).await?;
                report.revocation_fleet = Some(
                    revocation(
                        &env,
                        &fleet,
                        &ids,
                        &keys,
                        &mut redis,
                        &opts.redis_url,
                        enroll_api.as_ref(),
                        s,
                    )
                    .await?,
                );
                drop(extra);
            }
        }
        drop(enroll_api);
        drop(haproxy);
        drop(nginx);
        drop(gw);
        anyhow::Ok(())
    }
    .await;
    crate::gateway::cleanup(&mut redis, &keys).await;
    result?;
    Ok(report)
}

/// Fails unless `target` serves a good agent and refuses the agent whose
/// certificate is on its CA's CRL (at the handshake or, TLS 1.3 sending the
/// server's verdict after the client's Finished, on the first request).
async fn refuses_revoked(env: &Env, target: &Target) -> anyhow::Result<()> {
    let roots = oneprotect_agent::tls::roots_from_pem(env.pki.root_pem.as_bytes())?;
    let revoked = env
        .pki
        .revoked_agent
        .as_ref()
        .context("the bench PKI has no revoked agent")?;
    let good = env.pki.agents.first().context("no agents")?;
    let mut outcome = Vec::new();
    for a in [good, revoked] {
        let cfg = crate::pki::client_config(
            &roots,
            &a.cert_pem,
            &a.chain_pem,
            &a.key_pem,
            Proto::H1.alpn(),
            false,
        )?;
        let mut scratch = load::LoadResult::empty();
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = load::open(target, Some(cfg), Proto::H1, &mut scratch).await?;
            s.send(load::request(target, Proto::H1, false)).await
        })
        .await
        .is_ok_and(|r| r.is_ok_and(|st| st.is_success()));
        outcome.push(served);
    }
    anyhow::ensure!(
        outcome == [true, false],
        "{}: a good certificate served: {}, a certificate on the CRL served: {} (the baseline must verify clients and check the CRLs)",
        target.name,
        outcome[0],
        outcome[1]
    );
    Ok(())
}

async fn idle(env: &Env, target: &Target, pid: u32, count: usize) -> anyhow::Result<IdleRecord> {
    let configs = env.pki.client_configs(Proto::H1.alpn(), false)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let (held, res) = load::idle_connections(target, &configs, count).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(pid);
    let n = held.len();
    drop(held);
    if res.error_count() > 0 {
        eprintln!("note: idle {}: {:?}", target.name, res.errors);
    }
    Ok(IdleRecord {
        target: target.name.clone(),
        connections: n,
        rss_before_kib: before,
        rss_after_kib: after,
        per_connection_kib: if n > 0 {
            after.saturating_sub(before) as f64 / n as f64
        } else {
            0.0
        },
    })
}

/// The agents the revocation scenario revokes, with their client configs:
/// enrolled through the enroll-api, or the first bench identities.
async fn revocation_agents(
    env: &Env,
    ids: &[oneprotect_identity::AgentIdentity],
    keys: &KeySchema,
    redis: &mut redis::aio::MultiplexedConnection,
    enroll: Option<&crate::enroll::EnrollApi>,
    n: usize,
) -> anyhow::Result<(Vec<AgentId>, Vec<Arc<rustls::ClientConfig>>)> {
    let Some(api) = enroll else {
        let configs = env.pki.client_configs(Proto::H1.alpn(), true)?;
        return Ok((
            ids.iter().take(n).map(|id| id.agent()).collect(),
            configs.into_iter().take(n).collect(),
        ));
    };
    let enrolled = api.enroll_agents(n).await?;
    let roots = oneprotect_agent::tls::roots_from_pem(env.pki.root_pem.as_bytes())?;
    let mut agents = Vec::with_capacity(n);
    let mut configs = Vec::with_capacity(n);
    for e in &enrolled {
        agents.push(e.issued.agent_id);
        configs.push(crate::pki::client_config(
            &roots,
            &e.issued.certificate_pem,
            &e.issued.chain_pem,
            &e.key_pem,
            Proto::H1.alpn(),
            true,
        )?);
    }
    // The relay projects each enrolment; wait until every certificate is active.
    let cert_keys: Vec<String> = enrolled
        .iter()
        .map(|e| keys.cert_status(&e.issued.tenant_id, &e.issued.serial))
        .collect();
    for _ in 0..400 {
        let got: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&cert_keys)
            .query_async(redis)
            .await?;
        if got.iter().all(|v| v.as_deref() == Some("active")) {
            return Ok((agents, configs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the enroll-api did not project the enrolled agents to Redis within 20 s")
}

/// Waits (at most 20 s) until `n` gateways are live in `{prefix}gateways`
/// (ADR-0022): each registers once it has confirmed Redis.
async fn wait_live_gateways(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &KeySchema,
    n: usize,
) -> anyhow::Result<()> {
    let mut live = 0;
    for _ in 0..400 {
        let raw: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(keys.gateways())
            .query_async(redis)
            .await?;
        let now = oneprotect_identity::revocation::unix_ms_now();
        live = raw
            .iter()
            .filter_map(|(_, j)| {
                serde_json::from_str::<oneprotect_identity::GatewayPresence>(j).ok()
            })
            .filter(|p| p.is_live(now))
            .count();
        if live >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("only {live} of {n} gateways became live within 20 s")
}

/// Revokes agents one by one while each keeps sending on its own keep-alive
/// connection: through the enroll-api's admin API (measured from its 200
/// answer) or by a direct projection write. Measures the time to each
/// agent's first refused request, the time until the harness' own
/// subscriber sees the announcement, and counts requests accepted after
/// that announcement (the revocation being visible in Redis).
#[allow(clippy::too_many_arguments)]
async fn revocation(
    env: &Env,
    gateways: &[Target],
    ids: &[oneprotect_identity::AgentIdentity],
    keys: &KeySchema,
    redis: &mut redis::aio::MultiplexedConnection,
    redis_url: &str,
    enroll: Option<&crate::enroll::EnrollApi>,
    s: &Sizes,
) -> anyhow::Result<RevocationRecord> {
    let n = s.revocations.min(ids.len());
    let (agents, configs) = revocation_agents(env, ids, keys, redis, enroll, n).await?;
    let start = Instant::now();
    let nanos = move || start.elapsed().as_nanos() as u64;
    // 0 = not yet; else nanos since start. `revoked_at`: the revoke call
    // returned; `visible_at`: the announcement reached our subscriber.
    let revoked_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let visible_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let refused_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let accepted_after = Arc::new(AtomicU64::new(0));
    let accepted_after_bound = Arc::new(AtomicU64::new(0));
    let accepted_after_answer = Arc::new(AtomicU64::new(0));
    let bound_ns = (s.revocation_bound_ms * 1e6) as u64;
    let deadline = start + Duration::from_secs(10 + n as u64 / 5);

    let index: std::collections::HashMap<AgentId, usize> =
        agents.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let (mut sink, mut stream) = redis::Client::open(redis_url)?
        .get_async_pubsub()
        .await?
        .split();
    sink.subscribe(keys.revocation_channel()).await?;
    let watcher = {
        let visible_at = visible_at.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            let _sink = sink;
            while let Some(msg) = stream.next().await {
                let Ok(text) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(a) = serde_json::from_str::<oneprotect_identity::Announcement>(&text) else {
                    continue;
                };
                if let Change::Agent {
                    agent_id,
                    status: oneprotect_identity::AgentStatus::Revoked,
                    ..
                } = a.change
                {
                    if let Some(&i) = index.get(&agent_id) {
                        let _ = visible_at[i].compare_exchange(
                            0,
                            nanos().max(1),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                }
            }
        })
    };

    let mut tasks = Vec::new();
    for (i, cfg) in configs.into_iter().enumerate() {
        // Agents spread over the gateways.
        let target = gateways[i % gateways.len()].clone();
        let (revoked_at, visible_at, refused_at, acc, acc_b, acc_a) = (
            revoked_at.clone(),
            visible_at.clone(),
            refused_at.clone(),
            accepted_after.clone(),
            accepted_after_bound.clone(),
            accepted_after_answer.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut scratch = load::LoadResult::empty();
            let mut sender: Option<load::Sender> = None;
            // One keep-alive connection per agent, reopened only if closed.
            while Instant::now() < deadline {
                if sender.is_none() {
                    match load::open(&target, Some(cfg.clone()), Proto::H1, &mut scratch).await {
                        Ok(s) => sender = Some(s),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                    }
                }
                let Some(conn) = sender.as_mut() else {
                    continue;
                };
                let sent = start.elapsed().as_nanos() as u64;
                let status = conn.send(load::request(&target, Proto::H1, false)).await;
                let rv = revoked_at[i].load(Ordering::Acquire);
                let vis = visible_at[i].load(Ordering::Acquire);
                match status {
                    Ok(st) if st.is_success() => {
                        if rv != 0 && sent > rv {
                            acc_a.fetch_add(1, Ordering::Relaxed);
                        }
                        if vis != 0 && sent > vis {
                            acc.fetch_add(1, Ordering::Relaxed);
                            if sent > vis + bound_ns {
                                acc_b.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(st) if st.as_u16() == 403 && rv != 0 => {
                        refused_at[i].store(start.elapsed().as_nanos() as u64, Ordering::Release);
                        return;
                    }
                    _ => sender = None,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Let every agent get going, then revoke them one by one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut answers: Vec<f64> = Vec::with_capacity(n);
    let mut server_side: Vec<f64> = Vec::with_capacity(n);
    let mut confirmed = 0;
    for i in 0..n {
        let t0 = Instant::now();
        match enroll {
            Some(api) => {
                let (outcome, elapsed_ms) = api.revoke(agents[i]).await?;
                if outcome == "confirmed" {
                    confirmed += 1;
                }
                server_side.push(elapsed_ms);
            }
            None => crate::gateway::revoke(redis, keys, &ids[i]).await?,
        }
        answers.push(t0.elapsed().as_secs_f64() * 1e3);
        revoked_at[i].store(nanos().max(1), Ordering::Release);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    watcher.abort();
    let mut announce: Vec<f64> = (0..n)
        .filter_map(|i| {
            let rv = revoked_at[i].load(Ordering::Acquire);
            let vis = visible_at[i].load(Ordering::Acquire);
            (vis != 0).then(|| vis.saturating_sub(rv) as f64 / 1e6)
        })
        .collect();
    announce.sort_by(f64::total_cmp);
    let mut lat: Vec<f64> = (0..n)
        .filter_map(|i| {
            let rv = revoked_at[i].load(Ordering::Acquire);
            let rf = refused_at[i].load(Ordering::Acquire);
            (rf != 0).then(|| rf.saturating_sub(rv) as f64 / 1e6)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let apct = |p: f64| {
        (!announce.is_empty()).then(|| announce[((announce.len() - 1) as f64 * p).round() as usize])
    };
    answers.sort_by(f64::total_cmp);
    server_side.sort_by(f64::total_cmp);
    let server_pct = |p: f64| {
        (!server_side.is_empty())
            .then(|| server_side[((server_side.len() - 1) as f64 * p).round() as usize])
    };
    let answer_pct = |p: f64| {
        (!answers.is_empty()).then(|| answers[((answers.len() - 1) as f64 * p).round() as usize])
    };
    Ok(RevocationRecord {
        via: match enroll {
            Some(_) => "enroll-api".into(),
            None => "redis".into(),
        },
        announce_p50_ms: enroll.and(apct(0.5)),
        announce_p99_ms: enroll.and(apct(0.99)),
        revocations: n,
        refused: lat.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        accepted_after_visible: accepted_after.load(Ordering::Relaxed),
        accepted_after_bound: accepted_after_bound.load(Ordering::Relaxed),
        bound_ms: s.revocation_bound_ms,
        gateways: gateways.len(),
        answer_p50_ms: enroll.and(answer_pct(0.5)),
        answer_p99_ms: enroll.and(answer_pct(0.99)),
        answers_confirmed: enroll.map(|_| confirmed),
        enforcement_p50_ms: server_pct(0.5),
        enforcement_p99_ms: server_pct(0.99),
        accepted_after_answer: accepted_after_answer.load(Ordering::Relaxed),
    })
}
