//! `oneprotect-gateway --config <file>`: validates the config, then runs the
//! gateway until SIGTERM (graceful) or SIGINT (fast). SIGHUP reloads the
//! trust bundle.

use std::path::PathBuf;

use clap::Parser;

/// OneProtect mTLS gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        env = "ONEPROTECT_GATEWAY_CONFIG",
        default_value = "configs/gateway.toml"
    )]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    if let Err(e) = run() {
        // One clear line (with causes), no backtrace: this is an operator error.
        eprintln!("oneprotect-gateway: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let cfg = oneprotect_gateway::Config::load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    tracing::info!(
        listen = %cfg.listener.listen,
        admin = %cfg.admin.listen,
        routes = cfg.routes.len(),
        "starting oneprotect-gateway"
    );
    let app = oneprotect_gateway::build(cfg)?;
    app.run_forever()
}
