//! The one-process dev stack end to end, driven through the real binaries
//! as a user would: `oneprotect-dev up` on a free port base and a temporary
//! data directory, `oneprotect-agent enroll` and `call`, a revocation
//! through the admin API with the printed admin key, the refusal (403),
//! `oneprotect-dev demo`, and a clean stop on SIGTERM. Once on the embedded
//! defaults (SQLite, in-process revocation bus; plus a restart on the same
//! data directory), once on PostgreSQL (own schema) and Redis (own prefix).
//!
//! `cargo test -p oneprotect-tests --test suite devstack::`

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use sqlx::Connection as _;

use crate::support::enroll::Client;

/// How long `up` may take to write stack.json (first start: migrations, CA).
const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one CLI command may run.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the demo may run.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts (100 ms apart) to see a revocation refused.
const REFUSAL_POLLS: usize = 100;

fn bin(package: &str, name: &str) -> PathBuf {
    oneprotect_tests::ensure_binary(package, name)
}

/// Five consecutive ports that were free a moment ago.
fn free_port_base() -> u16 {
    for _ in 0..200 {
        let base = oneprotect_tests::free_port();
        if base > 65000 {
            continue;
        }
        let ok = (0..5).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no five consecutive free ports on 127.0.0.1 after 200 tries");
}

/// Runs `cmd` to completion within `limit`, killing it otherwise.
fn run(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// A running `oneprotect-dev up`; killed on drop.
struct Up {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    info: Value,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Up {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn start(data: &Path, base: u16, extra: &[&str]) -> Result<Self> {
        let log = data.with_extension("log");
        let logf = std::fs::File::create(&log)?;
        let child = Command::new(bin("oneprotect-dev", "oneprotect-dev"))
            .arg("--data-dir")
            .arg(data)
            .arg("up")
            .args(["--port-base", &base.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawn oneprotect-dev up")?;
        let mut up = Up {
            child: Some(child),
            data: data.to_owned(),
            log,
            info: Value::Null,
        };
        let stack = data.join("stack.json");
        let start = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&stack) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    up.info = v;
                    break;
                }
            }
            if let Some(s) = up.child.as_mut().context("child")?.try_wait()? {
                bail!(
                    "oneprotect-dev up exited ({s}) before writing stack.json:\n{}",
                    up.log_tail()
                );
            }
            if start.elapsed() > UP_TIMEOUT {
                bail!(
                    "oneprotect-dev up wrote no stack.json within {}s:\n{}",
                    UP_TIMEOUT.as_secs(),
                    up.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            up.info["listen"]["gateway"] == format!("127.0.0.1:{base}").as_str(),
            "the gateway is not on the port base: {}",
            up.info
        );
        Ok(up)
    }

    fn s(&self, key: &str) -> String {
        self.info[key].as_str().unwrap_or_default().to_owned()
    }

    fn admin(&self) -> Result<Client> {
        let addr: SocketAddr = self.info["listen"]["enroll_api_https"]
            .as_str()
            .context("enroll_api_https")?
            .parse()?;
        Client::new(addr, Path::new(&self.s("server_ca")))
    }

    /// SIGTERM, then a clean exit within 30 s that removes stack.json.
    fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().context("child")?;
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        ensure!(st.success(), "kill -TERM failed");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "oneprotect-dev up did not stop within 30s of SIGTERM:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(
            status.success(),
            "oneprotect-dev up exited with {status} on SIGTERM:\n{}",
            self.log_tail()
        );
        ensure!(
            !self.data.join("stack.json").exists(),
            "stack.json left behind after a clean stop"
        );
        Ok(())
    }
}

async fn admin_send(
    c: &Client,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> Result<crate::support::enroll::Reply> {
    tokio::time::timeout(CMD_TIMEOUT, c.send(method, path, Some(key), Some(body)))
        .await
        .context("admin API request timed out")?
}

fn agent(state: &Path, args: &[&str]) -> Result<Output> {
    run(
        Command::new(bin("oneprotect-agent", "oneprotect-agent"))
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env("ONEPROTECT_LOG", "warn"),
        CMD_TIMEOUT,
    )
}

/// Enrolls an agent with the agent CLI; returns its state dir and agent id.
async fn enroll_agent(up: &Up, scratch: &Path, name: &str) -> Result<(PathBuf, String)> {
    let admin = up.admin()?;
    let key = up.s("admin_key");
    let r = admin_send(
        &admin,
        "POST",
        "/api/v1/agent-enrollment/tokens",
        &key,
        json!({"ttl_seconds": 600}),
    )
    .await?;
    ensure!(r.status == 201, "token: {} {}", r.status, r.body);
    let token_file = scratch.join(format!("{name}.token"));
    std::fs::write(&token_file, r.body["token"].as_str().context("token")?)?;
    let state = scratch.join(name);
    let o = agent(
        &state,
        &[
            "enroll",
            "--server",
            &up.s("gateway_url"),
            "--token-file",
            &token_file.to_string_lossy(),
            "--ca-bundle",
            &up.s("server_ca"),
        ],
    )?;
    ensure!(
        o.status.success(),
        "oneprotect-agent enroll: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let o = agent(&state, &["status", "--json"])?;
    ensure!(o.status.success(), "status: {}", text(&o.stderr));
    let st: Value = serde_json::from_slice(&o.stdout)?;
    ensure!(
        st["tenant_id"] == up.s("tenant_id").as_str(),
        "enrolled into {} instead of the bootstrap tenant",
        st["tenant_id"]
    );
    Ok((
        state,
        st["agent_id"].as_str().context("agent_id")?.to_owned(),
    ))
}

/// A call through the gateway reaches the demo upstream, which saw the
/// agent's identity and verified the assertion.
fn call_ok(up: &Up, state: &Path, agent_id: &str) -> Result<()> {
    let args = [
        "call",
        "GET",
        "/hello",
        "--fail",
        "-H",
        "x-oneprotect-tenant-id: spoofed",
    ];
    let mut o = agent(state, &args)?;
    // Right after enrollment the projection may not be written yet: the
    // gateway answers a retryable 503 revocation_unavailable (never 200).
    for _ in 0..REFUSAL_POLLS {
        if o.status.success() || !text(&o.stdout).contains("revocation_unavailable") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        o = agent(state, &args)?;
    }
    ensure!(
        o.status.success(),
        "oneprotect-agent call: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let echo: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("the upstream's answer is not JSON: {}", text(&o.stdout)))?;
    let hdr = &echo["identity_headers"];
    ensure!(
        hdr["x-oneprotect-agent-id"] == agent_id
            && hdr["x-oneprotect-tenant-id"] == up.s("tenant_id").as_str(),
        "upstream saw the wrong identity (spoofed header not replaced?): {echo}"
    );
    ensure!(
        echo["assertion"]["verified"] == true && echo["assertion"]["matches_headers"] == true,
        "assertion not verified by the upstream: {echo}"
    );
    Ok(())
}

/// Polls `call` until the agent CLI reports the identity refused (exit 3,
/// 403 agent_revoked).
fn wait_refused(state: &Path) -> Result<()> {
    let mut last = String::new();
    for _ in 0..REFUSAL_POLLS {
        let o = agent(state, &["call", "GET", "/hello", "--fail", "-i"])?;
        let out = text(&o.stdout);
        if o.status.code() == Some(3) {
            ensure!(
                out.starts_with("403") && out.contains("agent_revoked"),
                "refused, but not with 403 agent_revoked: {out}"
            );
            return Ok(());
        }
        last = format!("exit {:?}: {out}{}", o.status.code(), text(&o.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the revoked agent was still not refused; last answer: {last}")
}

async fn revoke(up: &Up, agent_id: &str) -> Result<()> {
    let r = admin_send(
        &up.admin()?,
        "POST",
        &format!("/api/v1/agents/{agent_id}/revoke"),
        &up.s("admin_key"),
        json!({"reason": "devstack test"}),
    )
    .await?;
    ensure!(
        r.status == 200 && r.body["status"] == "revoked",
        "revoke: {} {}",
        r.status,
        r.body
    );
    // Acknowledged (ADR-0022): the stack's one gateway applied it before
    // the answer, over the in-process bus or Redis alike.
    let e = &r.body["enforcement"];
    ensure!(
        e["outcome"] == "confirmed" && e["gateways_live"] == 1 && e["gateways_confirmed"] == 1,
        "revoke enforcement: {}",
        r.body
    );
    Ok(())
}

/// The first call after a confirmed revocation is refused: no polling.
fn refused_at_once(state: &Path) -> Result<()> {
    let o = agent(state, &["call", "GET", "/hello", "--fail", "-i"])?;
    let out = text(&o.stdout);
    ensure!(
        o.status.code() == Some(3) && out.starts_with("403") && out.contains("agent_revoked"),
        "the first call after the confirmed revocation: exit {:?}: {out}{}",
        o.status.code(),
        text(&o.stderr)
    );
    Ok(())
}

fn demo(up: &Up) -> Result<()> {
    let o = run(
        Command::new(bin("oneprotect-dev", "oneprotect-dev"))
            .arg("--data-dir")
            .arg(&up.data)
            .arg("demo"),
        DEMO_TIMEOUT,
    )?;
    let out = text(&o.stdout);
    ensure!(
        o.status.success(),
        "oneprotect-dev demo failed ({}):\n{out}\n{}",
        o.status,
        text(&o.stderr)
    );
    for must in [
        "assertion: verified with published gateway key",
        "every client-sent identity header stripped",
        "403 certificate_superseded",
        "403 agent_revoked",
        "All 7 steps passed",
    ] {
        ensure!(out.contains(must), "demo transcript lacks {must:?}:\n{out}");
    }
    Ok(())
}

/// The whole scenario against one running stack.
async fn scenario(up: &Up, scratch: &Path) -> Result<String> {
    let (state, agent_id) = enroll_agent(up, scratch, "agent-a").await?;
    call_ok(up, &state, &agent_id)?;
    revoke(up, &agent_id).await?;
    refused_at_once(&state)?;
    demo(up)?;
    Ok(agent_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_defaults_sqlite_and_in_process_bus() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let base = free_port_base();
    let up = Up::start(&data, base, &[])?;
    ensure!(up.s("database") == "sqlite", "{}", up.info);
    ensure!(up.s("revocation_bus") == "memory", "{}", up.info);
    ensure!(
        data.join("enroll-api/enroll.db").is_file(),
        "no SQLite file in the data dir"
    );
    for f in ["stack.json", "bootstrap.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(f))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{f} has mode {mode:o}, expected 600");
    }
    let (tenant, key) = (up.s("tenant_id"), up.s("admin_key"));
    let agent_id = scenario(&up, tmp.path()).await?;
    let state = tmp.path().join("agent-a");
    let log = up.log.clone();
    up.stop()?;
    // `up`'s log went to a file: lines, but no ANSI colour escapes (issue 14).
    let log = std::fs::read_to_string(&log)?;
    ensure!(log.contains(" INFO "), "no INFO lines in up's log:\n{log}");
    ensure!(!log.contains('\u{1b}'), "ANSI escapes in up's log file");

    // Restart on the same data dir: same bootstrap tenant and key, and the
    // projection rebuilt from SQLite into a fresh bus still refuses the
    // revoked agent.
    // Same ports: the agent's state remembers the gateway's address.
    let up = Up::start(&data, base, &[])?;
    ensure!(
        up.s("tenant_id") == tenant && up.s("admin_key") == key,
        "the bootstrap tenant/key changed across a restart"
    );
    wait_refused(&state).with_context(|| format!("agent {agent_id} after restart"))?;
    let (state_b, agent_b) = enroll_agent(&up, tmp.path(), "agent-b").await?;
    call_ok(&up, &state_b, &agent_b)?;
    up.stop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_redis() -> Result<()> {
    let url = oneprotect_tests::require_postgres();
    let redis_url = oneprotect_tests::require_redis();
    let schema = oneprotect_tests::unique_name("devstack");
    let prefix = oneprotect_tests::unique_redis_prefix("devstack");
    let mut c = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut c)
        .await?;
    let tmp = tempfile::tempdir()?;
    let res = async {
        let up = Up::start(
            &tmp.path().join("data"),
            free_port_base(),
            &[
                "--database-url",
                &url,
                "--database-schema",
                &schema,
                "--redis",
                &redis_url,
                "--redis-key-prefix",
                &prefix,
            ],
        )?;
        ensure!(up.s("database") == "postgres", "{}", up.info);
        ensure!(up.s("revocation_bus") == "redis", "{}", up.info);
        scenario(&up, tmp.path()).await?;
        // The revocation travelled over Redis under this test's prefix.
        let mut r = redis::Client::open(redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let seq: Option<u64> = redis::cmd("GET")
            .arg(oneprotect_identity::KeySchema::new(prefix.clone()).revocation_seq())
            .query_async(&mut r)
            .await?;
        ensure!(
            seq.unwrap_or(0) > 0,
            "no announcements in Redis under {prefix}"
        );
        let tenants: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".tenants"))
                .fetch_one(&mut c)
                .await?;
        ensure!(
            tenants == 1,
            "expected the bootstrap tenant in {schema}, found {tenants}"
        );
        up.stop()
    }
    .await;
    // Clean up whatever happened.
    let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&mut c)
        .await;
    if let Ok(client) = redis::Client::open(redis_url.as_str()) {
        if let Ok(mut r) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut r)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(keys).query_async(&mut r).await;
            }
        }
    }
    res
}

/// One anonymous client cannot block enrollment for everyone behind the
/// gateway (issue 15, item 14), end to end through the dev stack's real
/// gateway and enroll-api: the gateway sets `x-forwarded-for` to the TCP
/// peer, and the enroll-api trusts it only from the gateway's address
/// (`forwarded.trusted_proxies`, which `up` sets). `curl` bound to
/// 127.0.0.2 sends bogus exchanges until the per-address limit answers 429;
/// then an agent from 127.0.0.1 still enrolls through the same gateway.
/// Before, the limit saw the gateway's address for every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_exhausting_the_exchange_limit_does_not_block_others() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let up = Up::start(&data, free_port_base(), &[])?;
    let url = format!("{}/api/v1/agent-enrollment/exchange", up.s("gateway_url"));
    let body =
        crate::support::enroll::exchange_body(&format!("opet_{}", "B".repeat(43)), "not a csr");
    let mut statuses = Vec::new();
    // The dev stack's burst is 20 (limits.exchange_per_address_burst);
    // bounded at 60 attempts.
    for _ in 0..60 {
        let out = run(
            Command::new("curl")
                .args(["-sS", "--max-time", "10", "--interface", "127.0.0.2"])
                .arg("--cacert")
                .arg(up.s("server_ca"))
                .args(["-o", "/dev/null", "-w", "%{http_code}"])
                .args(["-H", "content-type: application/json"])
                .args(["--data-binary", &body.to_string(), &url]),
            CMD_TIMEOUT,
        )?;
        ensure!(out.status.success(), "curl: {}", text(&out.stderr));
        let status: u16 = text(&out.stdout).trim().parse()?;
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    ensure!(
        statuses.last() == Some(&429),
        "127.0.0.2 was never limited through the gateway: {statuses:?}"
    );
    ensure!(
        statuses[..statuses.len() - 1]
            .iter()
            .all(|s| (400..500).contains(s) && *s != 429),
        "{statuses:?}"
    );
    // Another client (the agent CLI, from 127.0.0.1) enrolls through the
    // same gateway right after.
    let (state, agent_id) = enroll_agent(&up, tmp.path(), "agent-after-flood").await?;
    call_ok(&up, &state, &agent_id)?;
    up.stop()
}
