//! `oneprotect-bench`: see the library documentation for the scenarios.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use oneprotect_bench::scenarios::{self, Options, Sizes};

#[derive(Parser)]
#[command(
    name = "oneprotect-bench",
    version,
    about = "OneProtect gateway load harness (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario against the gateway, the upstream directly, nginx and HAProxy.
    All {
        /// Small sizes: every scenario in well under two minutes.
        #[arg(long, conflicts_with = "tiny")]
        quick: bool,
        /// Smallest sizes (the smoke test).
        #[arg(long)]
        tiny: bool,
        /// Output directory (JSON, Markdown, SVG, logs).
        #[arg(long, default_value = "bench/out")]
        out: PathBuf,
        /// Where minted identities are cached between runs.
        #[arg(long, default_value = "bench/out/cache")]
        cache: PathBuf,
        /// Redis for the revocation projection (a unique key prefix is used and removed).
        #[arg(
            long,
            env = "ONEPROTECT_BENCH_REDIS_URL",
            default_value = "redis://127.0.0.1:6379"
        )]
        redis_url: String,
        /// Pin the servers under test to these CPUs (a `taskset -c` list: 0,
        /// 0,1 or 0-1); the load runs wherever the scheduler puts it.
        #[arg(long, value_parser = parse_cpu_list)]
        server_cpu: Option<String>,
        /// Worker threads of every server under test: gateway
        /// `runtime.threads`, nginx `worker_processes`, HAProxy `nbthread`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        server_threads: u16,
        /// Skip the nginx baseline.
        #[arg(long)]
        no_nginx: bool,
        /// Skip the HAProxy baseline.
        #[arg(long)]
        no_haproxy: bool,
        /// How the revocation scenario revokes: through the real enroll-api's
        /// admin API (agents enrolled through the real exchange; measures the
        /// whole path), or by writing the Redis projection directly (the
        /// gateway's propagation alone).
        #[arg(long, value_enum, default_value = "enroll-api")]
        revoke_via: scenarios::RevokeVia,
        /// With `--revoke-via enroll-api`, the revocation scenario runs a
        /// second time with this many gateway processes (agents spread across
        /// them; the revoke API waits for all of them, ADR-0022). 1: once.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
        revocation_gateways: u16,
        /// Override: seconds per load run.
        #[arg(long)]
        duration: Option<f64>,
        /// Override: connections.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Override: agent identities.
        #[arg(long)]
        agents: Option<usize>,
        /// Override: agents revoked in the revocation scenario.
        #[arg(long)]
        revocations: Option<usize>,
        /// Run only these scenarios (comma-separated): keepalive, latency,
        /// handshake, handshake-resumed, idle, revocation. Default: all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The gateway's per-connection read buffer under TLS
        /// (`listener.read_buffer_bytes`); default: the gateway's default.
        #[arg(long, value_name = "BYTES")]
        gateway_read_buffer: Option<usize>,
        /// The gateway's per-connection write buffer between TLS and the
        /// socket (`listener.write_buffer_bytes`); default: the gateway's.
        #[arg(long, value_name = "BYTES")]
        gateway_write_buffer: Option<usize>,
        /// The gateway's `listener.http1_fast_path` (ADR-0023): `false`
        /// sends every request through pingora's path, for a same-run A/B.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        gateway_http1_fast_path: bool,
        /// The gateway's `listener.http2_fast_path` (ADR-0028): `false`
        /// serves every HTTP/2 connection on pingora's loop, for a same-run A/B.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        gateway_http2_fast_path: bool,
        /// The gateway's `runtime.work_stealing` (pingora: one work-stealing
        /// runtime, or one single-threaded runtime per thread).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        gateway_work_stealing: bool,
        /// Only this protocol for the load runs (default: both).
        #[arg(long, value_enum)]
        proto: Option<oneprotect_bench::load::Proto>,
    },
    /// Enrollments per second through the real exchange on PostgreSQL (or
    /// SQLite): the enroll-api binary, a private schema, concurrent agents.
    Enroll {
        /// PostgreSQL URL (a private schema is created and dropped with
        /// `psql`); SQLite in the output directory when absent.
        #[arg(long)]
        database_url: Option<String>,
        /// Redis for the projection the relay writes.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// Enrollments (1..=100000).
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
        /// Enrollments in flight at once (1..=1024).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: u32,
        /// Tokens the enrollments are spread over, round-robin (1..=100000).
        /// 1 is a fleet rollout's shared token: every exchange updates its
        /// row, the worst case.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        tokens: u32,
        /// Pin the enroll-api to these CPUs (a `taskset -c` list).
        #[arg(long, value_parser = parse_cpu_list)]
        server_cpu: Option<String>,
        /// Output directory (enroll-api config, data and log).
        #[arg(long, default_value = "bench/out/enroll")]
        out: PathBuf,
    },
    /// Re-render results.md and results.svg from a results.json.
    Render {
        /// The results.json of a run.
        json: PathBuf,
        /// Where to write results.md and results.svg.
        #[arg(long)]
        out: PathBuf,
    },
    /// The trivial upstream (used by `all` as a child process).
    #[command(hide = true)]
    Upstream {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// A `taskset -c` CPU list: digits, commas and dashes only.
fn parse_cpu_list(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split(',').all(|part| {
            let mut ends = part.splitn(2, '-');
            ends.all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a CPU list (e.g. 0, 0,1 or 0-1)"))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Upstream { listen } => {
            anyhow::ensure!(
                listen.ip().is_loopback(),
                "the upstream listens on loopback only"
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(oneprotect_bench::upstream::run(listen))
        }
        Command::Enroll {
            database_url,
            redis_url,
            count,
            concurrency,
            tokens,
            server_cpu,
            out,
        } => {
            std::fs::create_dir_all(&out).context("create the output directory")?;
            let out = std::fs::canonicalize(&out).context("output directory")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let line = rt.block_on(oneprotect_bench::enroll::throughput(
                &out,
                &redis_url,
                database_url.as_deref(),
                count as usize,
                concurrency as usize,
                tokens as usize,
                server_cpu.as_deref(),
            ))?;
            println!("{line}");
            Ok(())
        }
        Command::Render { json, out } => {
            let report: oneprotect_bench::report::Report =
                serde_json::from_slice(&std::fs::read(&json).context("read results.json")?)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("results.md"), report.markdown())?;
            std::fs::write(out.join("results.svg"), report.svg())?;
            println!("wrote {0}/results.md, {0}/results.svg", out.display());
            Ok(())
        }
        Command::All {
            quick,
            tiny,
            out,
            cache,
            redis_url,
            server_cpu,
            server_threads,
            no_nginx,
            no_haproxy,
            revoke_via,
            revocation_gateways,
            duration,
            concurrency,
            agents,
            revocations,
            only,
            gateway_read_buffer,
            gateway_write_buffer,
            gateway_http1_fast_path,
            gateway_http2_fast_path,
            gateway_work_stealing,
            proto,
        } => {
            if let Some(bad) = only
                .iter()
                .find(|o| !scenarios::SCENARIOS.contains(&o.as_str()))
            {
                anyhow::bail!(
                    "--only: unknown scenario {bad:?} (known: {})",
                    scenarios::SCENARIOS.join(", ")
                );
            }
            let mut sizes = if tiny {
                Sizes::tiny()
            } else if quick {
                Sizes::quick()
            } else {
                Sizes::full()
            };
            if let Some(d) = duration {
                sizes.duration = std::time::Duration::from_secs_f64(d.clamp(0.1, 600.0));
            }
            if let Some(c) = concurrency {
                sizes.concurrency = c.clamp(1, 10_000);
            }
            if let Some(a) = agents {
                sizes.agents = a.clamp(1, 100_000);
                sizes.revocations = sizes.revocations.min(sizes.agents);
            }
            if let Some(r) = revocations {
                sizes.revocations = r.clamp(1, sizes.agents);
            }
            // Absolute paths: nginx resolves a relative config path against
            // its own prefix.
            std::fs::create_dir_all(&out).context("create the output directory")?;
            let out = std::fs::canonicalize(&out).context("output directory")?;
            std::fs::create_dir_all(&cache).context("create the cache directory")?;
            let cache = std::fs::canonicalize(&cache).context("cache directory")?;
            let opts = Options {
                sizes,
                out: out.clone(),
                cache,
                redis_url,
                server_cpu,
                server_threads: usize::from(server_threads),
                no_nginx,
                no_haproxy,
                revoke_via,
                revocation_gateways: usize::from(revocation_gateways),
                command: std::env::args().collect::<Vec<_>>().join(" "),
                only,
                gateway_read_buffer,
                gateway_write_buffer,
                gateway_http1_fast_path,
                gateway_http2_fast_path,
                gateway_work_stealing,
                proto,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(scenarios::run_all(&opts))?;
            std::fs::write(
                out.join("results.json"),
                serde_json::to_vec_pretty(&report)?,
            )
            .context("write results.json")?;
            let md = report.markdown();
            std::fs::write(out.join("results.md"), &md).context("write results.md")?;
            std::fs::write(out.join("results.svg"), report.svg()).context("write results.svg")?;
            println!("{md}");
            println!(
                "wrote {0}/results.json, {0}/results.md, {0}/results.svg",
                out.display()
            );
            Ok(())
        }
    }
}
