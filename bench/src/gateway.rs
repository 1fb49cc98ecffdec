//! The gateway under test: a generated configuration, the
//! `oneprotect-gateway` binary started as a child (optionally pinned to one
//! core), and the revocation projection for the bench agents written to Redis
//! the way the enroll-api writes it (every agent and certificate `active`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use oneprotect_identity::revocation::{Announcement, Change};
use oneprotect_identity::{AgentIdentity, AgentStatus, CertStatus, KeySchema};
use redis::AsyncCommands as _;

use crate::child::{sibling_binary, Server};
use crate::pki::{BenchPki, ServerFiles};

/// Addresses of a started gateway.
pub struct Gateway {
    /// The process.
    pub server: Server,
    /// The mTLS listener.
    pub listen: SocketAddr,
    /// The admin listener (/metrics).
    pub admin: SocketAddr,
}

/// The gateway settings a bench run varies.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// `listener.read_buffer_bytes` (the gateway's default when `None`).
    pub read_buffer: Option<usize>,
    /// `listener.write_buffer_bytes` (the gateway's default when `None`).
    pub write_buffer: Option<usize>,
    /// `listener.http1_fast_path`.
    pub http1_fast_path: bool,
    /// `listener.http2_fast_path`.
    pub http2_fast_path: bool,
    /// `runtime.threads`.
    pub threads: usize,
    /// `runtime.work_stealing`.
    pub work_stealing: bool,
}

/// Writes the gateway configuration.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    files: &ServerFiles,
    redis_url: &str,
    prefix: &str,
    tuning: Tuning,
) -> String {
    let threads = tuning.threads;
    let work_stealing = tuning.work_stealing;
    let read_buffer = tuning
        .read_buffer
        .map_or(String::new(), |b| format!("read_buffer_bytes = {b}\n"));
    let write_buffer = tuning
        .write_buffer
        .map_or(String::new(), |b| format!("write_buffer_bytes = {b}\n"));
    let fast_path = tuning.http1_fast_path;
    let fast_path_h2 = tuning.http2_fast_path;
    format!(
        r#"[listener]
listen = "{listen}"
cert = "{cert}"
key = "{key}"
trust_bundle = "{bundle}"
http1_fast_path = {fast_path}
http2_fast_path = {fast_path_h2}
{read_buffer}{write_buffer}
[admin]
listen = "{admin}"

[revocation]
redis_url = "{redis_url}"
key_prefix = "{prefix}"

[runtime]
threads = {threads}
work_stealing = {work_stealing}
graceful_shutdown_secs = 0

[[routes]]
prefix = "/"
upstreams = ["{upstream}"]
health_check_secs = 0
"#,
        cert = files.cert.display(),
        key = files.key.display(),
        bundle = files.client_roots.display(),
    )
}

/// Starts the gateway binary found next to this one.
pub fn start(
    dir: &Path,
    upstream: SocketAddr,
    files: &ServerFiles,
    redis_url: &str,
    prefix: &str,
    cpus: Option<&str>,
    tuning: Tuning,
) -> anyhow::Result<Gateway> {
    let bin = sibling_binary("oneprotect-gateway")?;
    let listen: SocketAddr = format!("127.0.0.1:{}", crate::child::free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", crate::child::free_port()?).parse()?;
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("gateway.toml");
    std::fs::write(
        &conf,
        config(listen, admin, upstream, files, redis_url, prefix, tuning),
    )?;
    let wrapper = crate::child::wrapper("ONEPROTECT_BENCH_GATEWAY_WRAPPER");
    let mut cmd = crate::child::command(&bin, cpus, &wrapper);
    cmd.arg("--config").arg(&conf).env("RUST_LOG", "warn");
    let log = dir.join("gateway.log");
    let server = crate::child::spawn_ready("gateway", cmd, &log, listen, &wrapper, 20, &log)?;
    Ok(Gateway {
        server,
        listen,
        admin,
    })
}

/// The identities of the bench agents (tenant, agent, serial), parsed with
/// the identity crate exactly as the gateway parses them.
pub fn identities(pki: &BenchPki) -> anyhow::Result<Vec<AgentIdentity>> {
    pki.agents
        .iter()
        .map(|a| {
            let leaf = oneprotect_agent::tls::certs_from_pem(a.cert_pem.as_bytes())?;
            let ca = oneprotect_agent::tls::certs_from_pem(a.chain_pem.as_bytes())?;
            AgentIdentity::from_chain(leaf[0].as_ref(), ca[0].as_ref())
                .context("bench identity does not match the profile")
        })
        .collect()
}

/// Writes `active` for every agent and certificate under `keys`.
pub async fn publish_active(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &KeySchema,
    ids: &[AgentIdentity],
) -> anyhow::Result<()> {
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.set_ex(
                keys.cert_status(&id.tenant(), &id.serial()),
                CertStatus::Active.as_str(),
                86_400,
            )
            .ignore();
            pipe.set_ex(
                keys.agent_status(&id.tenant(), &id.agent()),
                AgentStatus::Active.as_str(),
                86_400,
            )
            .ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    Ok(())
}

/// Marks `id`'s agent revoked and announces it, as the enroll-api does.
pub async fn revoke(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &KeySchema,
    id: &AgentIdentity,
) -> anyhow::Result<()> {
    let () = redis
        .set(
            keys.agent_status(&id.tenant(), &id.agent()),
            AgentStatus::Revoked.as_str(),
        )
        .await?;
    let seq: u64 = redis.incr(keys.revocation_seq(), 1).await?;
    let msg = Announcement {
        seq,
        change: Change::Agent {
            tenant_id: id.tenant(),
            agent_id: id.agent(),
            status: AgentStatus::Revoked,
        },
    };
    let () = redis
        .publish(keys.revocation_channel(), serde_json::to_string(&msg)?)
        .await?;
    Ok(())
}

/// Deletes every key under `keys`' prefix.
pub async fn cleanup(redis: &mut redis::aio::MultiplexedConnection, keys: &KeySchema) {
    let pattern = keys.all_keys_pattern();
    let mut cursor: u64 = 0;
    // Bounded: at most 10,000 SCAN rounds.
    for _ in 0..10_000 {
        let Ok((next, batch)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await
        else {
            return;
        };
        if !batch.is_empty() {
            let _: Result<(), _> = redis.del(batch).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
