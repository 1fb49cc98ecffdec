//! The real enroll-api for the revocation scenario (`--revoke-via
//! enroll-api`, the default): the `oneprotect-enroll-api` binary next to this
//! one, on SQLite in the run's directory, writing the revocation projection
//! to the bench's Redis prefix. Agents enroll through the real exchange and
//! are revoked through the admin API, so the measured time covers the whole
//! path: API commit → outbox relay → Redis → announcement → gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{enroll, AgentMetadata, Enrolled};
use oneprotect_identity::{AgentId, TokenSecret};

use crate::child::{free_port, sibling_binary, Server};

/// A started enroll-api with one tenant and an admin key.
pub struct EnrollApi {
    /// The process.
    pub server: Server,
    /// Its HTTPS listener.
    pub https: SocketAddr,
    client: Endpoint,
    admin_key: String,
}

fn run_cli(bin: &Path, conf: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "oneprotect-enroll-api {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl EnrollApi {
    /// Starts it in `dir` with Redis at `redis_url` under `prefix`, on
    /// SQLite in `dir`.
    pub fn start(dir: &Path, redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        Self::start_on(dir, redis_url, prefix, None)
    }

    /// [`EnrollApi::start`] on PostgreSQL when `database` is (URL, schema):
    /// the schema must exist.
    pub fn start_on(
        dir: &Path,
        redis_url: &str,
        prefix: &str,
        database: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let bin = sibling_binary("oneprotect-enroll-api")?;
        std::fs::create_dir_all(dir)?;
        let data: PathBuf = dir.join("data");
        let https: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let conf = dir.join("enroll-api.toml");
        std::fs::write(
            &conf,
            format!(
                r#"trust_domain = "{td}"
data_dir = "{data}"
[listen]
https = "{https}"
http = ""
[limits]
exchange_per_address_per_minute = 1000000
exchange_per_address_burst = 100000
exchange_per_token_per_minute = 1000000
exchange_per_token_burst = 100000
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
relay_poll_interval_ms = 200
# A loaded CI machine may starve a gateway for a moment; a lagging answer
# would be reported as such, but the figures are about confirmed ones.
enforcement_deadline_ms = 2000
{database}"#,
                td = crate::pki::TRUST_DOMAIN,
                data = data.display(),
                database = match database {
                    Some((url, schema)) => format!(
                        "[database]\nurl = \"{url}\"\nschema = \"{schema}\"\nmax_connections = 32\n"
                    ),
                    None => String::new(),
                },
            ),
        )?;
        let tenant = run_cli(&bin, &conf, &["tenant", "create", "--name", "bench"])?;
        let tenant = tenant
            .split_whitespace()
            .find(|w| uuid::Uuid::parse_str(w).is_ok())
            .context("tenant create printed no id")?
            .to_owned();
        let key = run_cli(
            &bin,
            &conf,
            &[
                "admin-key",
                "create",
                "--tenant",
                &tenant,
                "--name",
                "bench",
            ],
        )?;
        let admin_key = key
            .split_whitespace()
            .find(|w| w.starts_with("opak_"))
            .context("admin-key create printed no key")?
            .to_owned();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&conf)
            .arg("serve")
            .env("RUST_LOG", "warn");
        let log = dir.join("enroll-api.log");
        let mut server = Server::spawn("enroll-api", cmd, &log)?;
        server.wait_ready(https, Duration::from_secs(30), &log)?;
        let ca = std::fs::read(data.join("tls/dev-cert.pem")).context("enroll-api dev cert")?;
        let roots = oneprotect_agent::tls::roots_from_pem(&ca)?;
        let client = Endpoint::new(
            &format!("https://{https}"),
            oneprotect_agent::tls::server_only(roots)?,
        )?;
        Ok(Self {
            server,
            https,
            client,
            admin_key,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let auth = format!("Bearer {}", self.admin_key);
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let r = self
            .client
            .request(
                method,
                path,
                &headers,
                body.map(|b| b.to_string().into_bytes()),
            )
            .await?;
        anyhow::ensure!(r.status.is_success(), "{path}: {}", r.status);
        Ok(serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null))
    }

    /// The platform trust bundle (PEM) its agent certificates chain to.
    pub async fn trust_bundle(&self) -> anyhow::Result<String> {
        let r = self
            .client
            .request(Method::GET, "/api/v1/trust-bundle", &[], None)
            .await?;
        anyhow::ensure!(r.status.is_success(), "trust bundle: {}", r.status);
        Ok(String::from_utf8(r.body.to_vec())?)
    }

    /// A new enrollment token for `n` uses, valid an hour.
    async fn token(&self, n: usize) -> anyhow::Result<TokenSecret> {
        let created = self
            .call(
                Method::POST,
                "/api/v1/agent-enrollment/tokens",
                Some(serde_json::json!({"ttl_seconds": 3600, "max_uses": n.max(1)})),
            )
            .await?;
        Ok(TokenSecret::new(
            created["token"].as_str().context("token")?,
        ))
    }

    /// Enrolls `n` agents through the real exchange (one token, `n` uses).
    pub async fn enroll_agents(&self, n: usize) -> anyhow::Result<Vec<Enrolled>> {
        let token = self.token(n).await?;
        let meta = AgentMetadata::this_host();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(enroll(&self.client, &token, &meta).await?);
        }
        Ok(out)
    }

    /// Enrolls `n` agents through the real exchange, `concurrency` at a time
    /// (each: a fresh P-256 key and CSR), spread round-robin over `tokens`
    /// tokens (1: one fleet token with `max_uses = n`, every exchange
    /// updating its row; more: as many separate tokens). Returns how many
    /// enrolled and the errors (first few kept).
    pub async fn enroll_concurrently(
        &self,
        n: usize,
        concurrency: usize,
        tokens: usize,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        use futures_util::StreamExt as _;
        let tokens = tokens.clamp(1, n.max(1));
        let mut secrets = Vec::with_capacity(tokens);
        for i in 0..tokens {
            // Token i serves exchanges i, i + tokens, ...
            secrets.push(self.token((n - i).div_ceil(tokens)).await?);
        }
        let meta = AgentMetadata::this_host();
        let results: Vec<anyhow::Result<Enrolled>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let (token, meta) = (&secrets[i % tokens], &meta);
                async move {
                    enroll(&self.client, token, meta)
                        .await
                        .map_err(anyhow::Error::from)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let errors = results
            .into_iter()
            .filter_map(Result::err)
            .take(5)
            .map(|e| format!("{e:#}"))
            .collect();
        Ok((ok, errors))
    }

    /// Issues a token as a marker and waits until its
    /// `agent.enrollment_token.issued` event is on the lifecycle stream
    /// (`stream`): the relay publishes in outbox order, so by then every
    /// event committed before it (every enrollment so far) is projected and
    /// streamed. Polls every 2 ms, up to `timeout`.
    pub async fn wait_relayed(
        &self,
        redis: &mut redis::aio::MultiplexedConnection,
        stream: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let created = self
            .call(
                Method::POST,
                "/api/v1/agent-enrollment/tokens",
                Some(serde_json::json!({"ttl_seconds": 60, "max_uses": 1})),
            )
            .await?;
        let id = created["token_id"].as_str().context("token_id")?.to_owned();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let last: redis::streams::StreamRangeReply =
                redis::AsyncCommands::xrevrange_count(redis, stream, "+", "-", 1).await?;
            let data = last.ids.first().and_then(|e| e.get::<String>("data"));
            if data.is_some_and(|d| d.contains(&id)) {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the relay did not publish the marker event within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Revokes `agent` through the admin API, waiting for the gateways
    /// (ADR-0022); returns the answer's `enforcement.outcome` and
    /// `elapsed_ms` (commit → answer, measured by the enroll-api).
    pub async fn revoke(&self, agent: AgentId) -> anyhow::Result<(String, f64)> {
        let body = self
            .call(
                Method::POST,
                &format!("/api/v1/agents/{agent}/revoke"),
                Some(serde_json::json!({"reason": "bench revocation"})),
            )
            .await?;
        let e = &body["enforcement"];
        Ok((
            e["outcome"].as_str().unwrap_or("missing").to_owned(),
            e["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        ))
    }
}

fn psql(url: &str, sql: &str) -> anyhow::Result<()> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .context("run psql (the PostgreSQL client)")?;
    anyhow::ensure!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// How long the relay may take to publish everything after the exchanges.
const RELAY_TIMEOUT: Duration = Duration::from_secs(120);

/// `oneprotect-bench enroll`: enrollments per second through the real
/// exchange (the enroll-api binary on PostgreSQL in a private schema, or on
/// SQLite), `concurrency` agents at a time over `tokens` tokens, after a
/// warm-up of 50. The clock stops when the relay has projected and streamed
/// the last enrollment ([`EnrollApi::wait_relayed`]). Returns a one-line
/// summary: that rate, the exchanges' own, and the CPU per enrollment of the
/// enroll-api, this client and, when found on this machine, PostgreSQL and
/// Redis. Drops the schema and the Redis keys afterwards.
pub async fn throughput(
    out: &Path,
    redis_url: &str,
    database_url: Option<&str>,
    count: usize,
    concurrency: usize,
    tokens: usize,
    server_cpu: Option<&str>,
) -> anyhow::Result<String> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let keys = oneprotect_identity::KeySchema::new(format!("bench-enroll:{id}:"));
    let schema = format!("bench_enroll_{id}");
    if let Some(url) = database_url {
        psql(url, &format!("CREATE SCHEMA {schema}"))?;
    }
    let res = async {
        let api = EnrollApi::start_on(
            out,
            redis_url,
            keys.prefix(),
            database_url.map(|u| (u, schema.as_str())),
        )?;
        if let Some(cpus) = server_cpu {
            let st = Command::new("taskset")
                .args(["-a", "-p", "-c", cpus, &api.server.pid().to_string()])
                .output()
                .context("taskset")?;
            anyhow::ensure!(st.status.success(), "taskset failed");
        }
        let mut redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await
            .context("connect to Redis")?;
        let (warm, errors) = api
            .enroll_concurrently(50.min(count), concurrency, tokens)
            .await?;
        anyhow::ensure!(errors.is_empty(), "warm-up: {warm} enrolled; {errors:?}");
        api.wait_relayed(&mut redis, &keys.events_stream(), RELAY_TIMEOUT)
            .await?;
        let meter = |name| crate::cpu::find_root_process(name).map(crate::cpu::CpuMeter::start);
        let pg_meter = database_url.and_then(|_| meter("postgres"));
        let redis_meter = meter("redis-server");
        let own = crate::cpu::CpuMeter::start(std::process::id());
        let api_meter = crate::cpu::CpuMeter::start(api.server.pid());
        let t0 = std::time::Instant::now();
        let (ok, errors) = api.enroll_concurrently(count, concurrency, tokens).await?;
        let exchanged = t0.elapsed().as_secs_f64();
        anyhow::ensure!(errors.is_empty(), "{ok} of {count} enrolled; {errors:?}");
        // An enrollment is complete once the relay has projected it (the
        // gateways know the certificate) and streamed its event: the
        // sustained rate and the CPU include that work.
        api.wait_relayed(&mut redis, &keys.events_stream(), RELAY_TIMEOUT)
            .await?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = api_meter.elapsed_cpu();
        // The enroll-api is this process' child: its CPU is in `own` too.
        let client = (own.elapsed_cpu() - cpu).max(0.0);
        let store = if database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        };
        let per_ms = |cpu_s: f64| 1000.0 * cpu_s / ok.max(1) as f64;
        let mut line = format!(
            "enroll: {ok} enrollments on {store}, {concurrency} in flight, {tokens} token(s): \
             {:.0} enrollments/s exchanged, projected and streamed (wall {wall:.2} s; the \
             exchanges alone {:.0}/s, {exchanged:.2} s); CPU per enrollment: enroll-api \
             {:.3} ms, this client (keys, CSRs, TLS) {:.3} ms",
            ok as f64 / wall,
            ok as f64 / exchanged,
            per_ms(cpu),
            per_ms(client),
        );
        // The server side: the enroll-api and, when measured, its
        // PostgreSQL and Redis; the client's share is the agents' in a fleet.
        let mut server = cpu;
        if let Some(m) = pg_meter {
            let s = m.elapsed_cpu();
            server += s;
            line.push_str(&format!(", PostgreSQL {:.3} ms", per_ms(s)));
        }
        if let Some(m) = redis_meter {
            let s = m.elapsed_cpu();
            server += s;
            line.push_str(&format!(", Redis {:.3} ms", per_ms(s)));
        }
        line.push_str(&format!(
            "; server side {:.3} ms: {:.0} enrollments per server CPU-second",
            per_ms(server),
            ok as f64 / server.max(1e-9),
        ));
        anyhow::Ok(line)
    }
    .await;
    if let Some(url) = database_url {
        if let Err(e) = psql(url, &format!("DROP SCHEMA {schema} CASCADE")) {
            eprintln!("warning: {e:#}");
        }
    }
    if let Ok(client) = redis::Client::open(redis_url) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            crate::gateway::cleanup(&mut c, &keys).await;
        }
    }
    res
}
