//! `oneprotect-dev`: the one-process local stack and the lifecycle demo.
//!
//! ```text
//! oneprotect-dev up   [--data-dir .data/dev] [--port-base 8443] [--redis URL] [--database-url URL]
//! oneprotect-dev demo [--data-dir .data/dev]
//! ```
//!
//! Exit status: 0 success, 1 failure (for `demo`: a step failed), 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use oneprotect_dev::stack::{DEFAULT_DATA_DIR, DEFAULT_PORT_BASE};
use oneprotect_dev::up::{self, UpOptions};

#[derive(Parser)]
#[command(
    name = "oneprotect-dev",
    version,
    about = "OneProtect local stack and demo"
)]
struct Cli {
    /// Where the stack keeps its state (CA, SQLite file, keys, stack.json).
    #[arg(long, global = true, env = "ONEPROTECT_DEV_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[command(flatten)]
    log: oneprotect_logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start enroll-api, gateway, demo upstream and revocation bus in this process.
    Up {
        /// First of five consecutive ports: gateway +0, enroll-api +1,
        /// gateway admin +2, enroll-api loopback HTTP +3, demo upstream +4.
        #[arg(long, default_value_t = DEFAULT_PORT_BASE)]
        port_base: u16,
        /// Carry revocation state over this Redis instead of the in-process bus.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Key prefix of the revocation projection (Redis keys and channel).
        #[arg(long, default_value = oneprotect_identity::revocation::DEFAULT_PREFIX)]
        redis_key_prefix: String,
        /// Keep records in this PostgreSQL database instead of SQLite.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// PostgreSQL schema (search_path) to use; must exist.
        #[arg(long, requires = "database_url")]
        database_schema: Option<String>,
    },
    /// Run the agent lifecycle against a running `up` and print a transcript.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    oneprotect_logging::init(
        cli.log.log_format,
        oneprotect_logging::Stream::Stderr,
        "RUST_LOG",
        "warn",
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oneprotect-dev: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.command {
            Command::Up {
                port_base,
                redis,
                redis_key_prefix,
                database_url,
                database_schema,
            } => {
                let opts = UpOptions {
                    data_dir: cli.data_dir,
                    port_base,
                    redis,
                    key_prefix: redis_key_prefix,
                    database_url,
                    database_schema,
                };
                run_up(&opts).await
            }
            Command::Demo => oneprotect_dev::demo::run(&cli.data_dir).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oneprotect-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_up(opts: &UpOptions) -> anyhow::Result<()> {
    eprintln!(
        "starting the OneProtect dev stack in {} ...",
        opts.data_dir.display()
    );
    let stack = up::start(opts).await?;
    println!(
        "{}",
        up::banner(&stack.info, "cargo run -q -p oneprotect-dev --")
    );
    wait_for_stop().await?;
    eprintln!("stopping ...");
    stack.shutdown().await;
    eprintln!("stopped");
    Ok(())
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
