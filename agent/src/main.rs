//! `oneprotect-agent`: the reference agent's command line.
//!
//! ```text
//! oneprotect-agent --state-dir DIR enroll --server https://127.0.0.1:8443 --token-file T --ca-bundle server-ca.pem
//! oneprotect-agent --state-dir DIR status
//! oneprotect-agent --state-dir DIR call GET /api/v1/hello
//! oneprotect-agent --state-dir DIR run
//! ```
//!
//! Exit status: 0 success, 1 error, 2 usage, 3 the identity was refused for
//! good (revoked or superseded) — `run` never loops on a refused identity.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use http::Method;
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{self, AgentMetadata};
use oneprotect_agent::run::{RunExit, RunPolicy};
use oneprotect_agent::state::{AgentConfig, StateDir};
use oneprotect_agent::{tls, AgentError};
use oneprotect_identity::TokenSecret;

const EXIT_REFUSED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "oneprotect-agent",
    version,
    about = "OneProtect reference agent"
)]
struct Cli {
    /// Where the key, certificate and configuration live (mode 0700).
    #[arg(
        long,
        env = "ONEPROTECT_AGENT_STATE_DIR",
        default_value = "/var/lib/oneprotect-agent"
    )]
    state_dir: PathBuf,
    #[command(flatten)]
    log: oneprotect_logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a key, exchange token + CSR for a certificate, store it.
    Enroll {
        /// The enrollment endpoint, https://host:port (the enroll-api or a gateway in front of it).
        #[arg(long)]
        server: String,
        /// The enrollment token. Prefer --token-file or the environment: a
        /// command line is visible to other users of the machine.
        #[arg(
            long,
            env = "ONEPROTECT_ENROLL_TOKEN",
            hide_env_values = true,
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// A file holding the enrollment token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// PEM roots that verify the servers' TLS certificates.
        #[arg(long)]
        ca_bundle: PathBuf,
        /// The gateway for calls and rotation (defaults to --server).
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Keep the identity fresh: rotate before expiry; exit 3 when revoked.
    Run {
        /// Call this path through the gateway periodically to notice a revocation early.
        #[arg(long)]
        heartbeat: Option<String>,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 60)]
        heartbeat_interval: u64,
        /// Stop after this many rotations.
        #[arg(long)]
        max_rotations: Option<u32>,
        /// Fraction of the last third of the lifetime over which rotation is spread.
        #[arg(long, default_value_t = 0.1)]
        jitter: f64,
    },
    /// Send one request through the gateway with this agent's identity.
    Call {
        /// HTTP method.
        method: String,
        /// Path (and query), e.g. /api/v1/hello.
        path: String,
        /// Request body; `@FILE` reads a file. Sent as application/json.
        #[arg(long)]
        data: Option<String>,
        /// Extra header `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Print status and headers before the body.
        #[arg(short = 'i', long)]
        include: bool,
        /// Exit 1 on an HTTP error status.
        #[arg(long)]
        fail: bool,
    },
    /// Show identity, tenant, serial, expiry and time to rotation.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    oneprotect_logging::init(
        cli.log.log_format,
        oneprotect_logging::Stream::Stderr,
        "ONEPROTECT_LOG",
        "info",
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            let refused = e
                .downcast_ref::<AgentError>()
                .is_some_and(|e| matches!(e, AgentError::Api(p) if p.is_terminal()));
            eprintln!("error: {e:#}");
            if refused {
                ExitCode::from(EXIT_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let state = StateDir::open(&cli.state_dir)?;
    match cli.command {
        Command::Enroll {
            server,
            token,
            token_file,
            ca_bundle,
            gateway,
        } => {
            let token = match (token, token_file) {
                (Some(t), None) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("read token file {}", f.display()))?
                    .trim()
                    .to_owned(),
                _ => anyhow::bail!(
                    "give the token with --token, --token-file or ONEPROTECT_ENROLL_TOKEN"
                ),
            };
            let token = TokenSecret::new(token);
            let ca_pem = std::fs::read(&ca_bundle)
                .with_context(|| format!("read CA bundle {}", ca_bundle.display()))?;
            let endpoint =
                Endpoint::new(&server, tls::server_only(tls::roots_from_pem(&ca_pem)?)?)?;
            let enrolled = enroll::enroll(&endpoint, &token, &AgentMetadata::this_host()).await?;
            state.store_config(
                &AgentConfig {
                    enroll_url: endpoint.url(),
                    gateway_url: gateway.unwrap_or_else(|| endpoint.url()),
                },
                &ca_pem,
            )?;
            state.store(&enrolled)?;
            let i = &enrolled.issued;
            println!("enrolled agent {} of tenant {}", i.agent_id, i.tenant_id);
            println!("identity  {}", i.spiffe_id);
            println!("serial    {}", i.serial);
            println!("expires   {}", i.not_after);
            println!("rotate at {}", i.rotate_after);
            println!("state in  {}", state.path().display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            heartbeat,
            heartbeat_interval,
            max_rotations,
            jitter,
        } => {
            let policy = RunPolicy {
                jitter,
                max_rotations,
                heartbeat_path: heartbeat,
                heartbeat_interval: Duration::from_secs(heartbeat_interval.max(1)),
                ..RunPolicy::default()
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            match oneprotect_agent::run::run(&state, &policy, shutdown).await? {
                RunExit::Stopped => Ok(ExitCode::SUCCESS),
                RunExit::RotationsDone(n) => {
                    println!("rotated {n} time(s); stopping as asked");
                    Ok(ExitCode::SUCCESS)
                }
                RunExit::Refused(p) => {
                    eprintln!(
                        "error: this agent's identity is no longer accepted ({}): {}. \
                         It must be re-enrolled with a new token by an administrator.",
                        p.code, p.title
                    );
                    Ok(ExitCode::from(EXIT_REFUSED))
                }
            }
        }
        Command::Call {
            method,
            path,
            data,
            headers,
            include,
            fail,
        } => {
            let config = state.config()?;
            let id = state.load()?;
            let endpoint =
                Endpoint::new(&config.gateway_url, id.mtls_config(state.server_roots()?)?)?;
            let method: Method = method
                .to_uppercase()
                .parse()
                .context("invalid HTTP method")?;
            let body = match data {
                Some(d) => Some(match d.strip_prefix('@') {
                    Some(file) => std::fs::read(file).with_context(|| format!("read {file}"))?,
                    None => d.into_bytes(),
                }),
                None => None,
            };
            let mut hs: Vec<(String, String)> = Vec::new();
            for h in &headers {
                let (k, v) = h.split_once(':').context("header must be `Name: value`")?;
                hs.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            if body.is_some()
                && !hs
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                hs.push(("content-type".into(), "application/json".into()));
            }
            let hs_ref: Vec<(&str, &str)> =
                hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let resp = endpoint.request(method, &path, &hs_ref, body).await?;
            if include {
                println!("{}", resp.status);
                for (k, v) in &resp.headers {
                    println!("{k}: {}", v.to_str().unwrap_or("<binary>"));
                }
                println!();
            }
            println!("{}", String::from_utf8_lossy(&resp.body));
            if resp.status.is_success() || !fail {
                Ok(ExitCode::SUCCESS)
            } else if resp.problem().is_some_and(|p| p.is_terminal()) {
                Ok(ExitCode::from(EXIT_REFUSED))
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Status { json } => {
            let id = state.load()?;
            let config = state.config()?;
            let now = time::OffsetDateTime::now_utc();
            let i = &id.issued;
            let to_rotation = (i.rotate_after - now).whole_seconds();
            let to_expiry = (i.not_after - now).whole_seconds();
            if json {
                let v = serde_json::json!({
                    "agent_id": i.agent_id,
                    "tenant_id": i.tenant_id,
                    "spiffe_id": i.spiffe_id,
                    "serial": i.serial,
                    "not_before": i.not_before.format(&time::format_description::well_known::Rfc3339)?,
                    "not_after": i.not_after.format(&time::format_description::well_known::Rfc3339)?,
                    "rotate_after": i.rotate_after.format(&time::format_description::well_known::Rfc3339)?,
                    "seconds_to_rotation": to_rotation,
                    "seconds_to_expiry": to_expiry,
                    "gateway_url": config.gateway_url,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("agent      {}", i.agent_id);
                println!("tenant     {}", i.tenant_id);
                println!("identity   {}", i.spiffe_id);
                println!("serial     {}", i.serial);
                println!("valid      {} .. {}", i.not_before, i.not_after);
                println!("rotate at  {} (in {}s)", i.rotate_after, to_rotation);
                println!("expires in {}s", to_expiry);
                println!("gateway    {}", config.gateway_url);
                if to_expiry <= 0 {
                    println!("EXPIRED: re-enroll this agent");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
