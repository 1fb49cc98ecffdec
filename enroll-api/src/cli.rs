//! The command line: `serve` (default), `ca init`, `tenant create`,
//! `admin-key create`, `projection rebuild`. The functions behind the commands are public so tests
//! drive them in-process (the dev stack and the suite do); they fail with a
//! [`CliError`] that keeps its cause.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use uuid::Uuid;

use oneprotect_identity::{AdminKeySecret, TenantId};

use crate::ca::{Ca, CaError};
use crate::config::{Config, ConfigError};
use crate::projection::ProjectionError;
use crate::secrets::SecretError;
use crate::service::{self, StartError};
use crate::store::{NewAdminKey, Store, StoreError, Tenant};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A tenant or key name is empty, too long or has a control character.
    #[error("name must be 1..=128 printable characters")]
    InvalidName,
    /// The requested leaf lifetime is outside the profile's bounds.
    #[error("leaf lifetime must be {min}..={max} seconds")]
    LeafLifetime {
        /// The shortest allowed, in seconds.
        min: u64,
        /// The longest allowed, in seconds.
        max: u64,
    },
    /// `--tenant` is not a canonical UUID.
    #[error("--tenant must be a canonical UUID")]
    TenantArgument,
    /// The tenant does not exist.
    #[error("no tenant {0}")]
    NoTenant(TenantId),
    /// `projection rebuild` without `redis.url`.
    #[error("redis.url is not configured")]
    NoRedis,
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The store, the CA or the pepper failed (commands open and use them
    /// as the service does), or the service did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Waiting for a shutdown signal failed.
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

// The store, CA and secret errors have one home, `StartError`; a command
// that meets one reports it the same way.
impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Start(e.into())
    }
}

impl From<CaError> for CliError {
    fn from(e: CaError) -> Self {
        CliError::Start(e.into())
    }
}

impl From<SecretError> for CliError {
    fn from(e: SecretError) -> Self {
        CliError::Start(e.into())
    }
}

/// OneProtect enrollment API.
#[derive(Debug, Parser)]
#[command(name = "oneprotect-enroll-api", version)]
pub struct Cli {
    /// Configuration file (TOML). Without it, defaults plus environment.
    #[arg(long, short, env = "ONEPROTECT_ENROLL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format.
    #[command(flatten)]
    pub log: oneprotect_logging::LogArgs,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// CA management.
    Ca {
        /// CA subcommand.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Tenant management.
    Tenant {
        /// Tenant subcommand.
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Tenant-admin API keys.
    AdminKey {
        /// Admin key subcommand.
        #[command(subcommand)]
        command: AdminKeyCommand,
    },
    /// The Redis revocation projection.
    Projection {
        /// Projection subcommand.
        #[command(subcommand)]
        command: ProjectionCommand,
    },
}

/// `projection …`
#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Rewrite every agent and certificate status in Redis from the store,
    /// then announce a `resync` (after a Redis flush or restore).
    Rebuild,
}

/// `ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the platform root CA in `ca.dir` (refuses to replace one).
    Init,
}

/// `tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its id.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Agent certificate lifetime in seconds (default: `ca.default_leaf_lifetime_secs`).
        #[arg(long)]
        leaf_lifetime_secs: Option<u64>,
    },
}

/// `admin-key …`
#[derive(Debug, Subcommand)]
pub enum AdminKeyCommand {
    /// Create an admin key for a tenant and print it (shown only this once).
    Create {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
}

fn check_name(name: &str) -> Result<(), CliError> {
    let n = name.chars().count();
    if (1..=128).contains(&n) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(CliError::InvalidName)
    }
}

/// `tenant create`: stores the tenant and creates its issuing CA.
pub async fn tenant_create(
    cfg: &Config,
    name: &str,
    leaf_lifetime_secs: Option<u64>,
) -> Result<TenantId, CliError> {
    check_name(name)?;
    let lifetime = leaf_lifetime_secs.unwrap_or(cfg.ca.default_leaf_lifetime_secs);
    let d = std::time::Duration::from_secs(lifetime);
    use oneprotect_identity::profile::{MAX_LEAF_LIFETIME, MIN_LEAF_LIFETIME};
    let out_of_bounds = CliError::LeafLifetime {
        min: MIN_LEAF_LIFETIME.as_secs(),
        max: MAX_LEAF_LIFETIME.as_secs(),
    };
    if !(MIN_LEAF_LIFETIME..=MAX_LEAF_LIFETIME).contains(&d) {
        return Err(out_of_bounds);
    }
    let clock = service::system_clock();
    let store = service::open_store(cfg).await?;
    let ca = service::open_ca(cfg, clock.clone())?;
    let tenant = Tenant {
        id: TenantId::random(),
        name: name.to_owned(),
        leaf_lifetime_secs: i64::try_from(lifetime).map_err(|_| out_of_bounds)?,
        created_at: clock.now(),
    };
    store.create_tenant(&tenant).await?;
    ca.tenant_ca_pem(tenant.id)?;
    Ok(tenant.id)
}

/// `admin-key create`: stores the key's keyed hash and returns the key.
pub async fn admin_key_create(
    cfg: &Config,
    tenant: TenantId,
    name: &str,
) -> Result<AdminKeySecret, CliError> {
    check_name(name)?;
    let store = service::open_store(cfg).await?;
    if store.fetch_tenant(tenant).await?.is_none() {
        return Err(CliError::NoTenant(tenant));
    }
    let pepper = crate::secrets::Pepper::load(&cfg.pepper_file(), cfg.secrets.generate_pepper)?;
    let key = crate::secrets::new_admin_key()?;
    store
        .create_admin_key(&NewAdminKey {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            name: name.to_owned(),
            key_hash: pepper.hash(key.expose_secret()),
            created_at: service::system_clock().now(),
        })
        .await?;
    Ok(key)
}

/// `projection rebuild`: rewrites the whole projection from the store.
pub async fn projection_rebuild(cfg: &Config) -> Result<crate::projection::RebuildStats, CliError> {
    let url = cfg.redis.url.as_deref().ok_or(CliError::NoRedis)?;
    let store = service::open_store(cfg).await?;
    let projection =
        crate::projection::Projection::new(url, &cfg.redis.key_prefix, cfg.redis.shards)?;
    let mut conn = projection.connect().await?;
    Ok(conn.rebuild(&store, service::system_clock().now()).await?)
}

/// `serve`: runs until Ctrl-C / SIGTERM.
pub async fn serve(cfg: &Config) -> Result<(), CliError> {
    let state = service::build_state(cfg, service::system_clock()).await?;
    let running = service::start(cfg, state).await?;
    let stop = async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        Ok::<(), std::io::Error>(())
    };
    stop.await.map_err(CliError::Signal)?;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn run_command(cli: Cli) -> Result<(), CliError> {
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cfg).await,
        Command::Ca {
            command: CaCommand::Init,
        } => {
            Ca::init(&cfg.ca_dir(), &cfg.trust_domain, &service::system_clock())?;
            println!("root CA created in {}", cfg.ca_dir().display());
            Ok(())
        }
        Command::Tenant {
            command:
                TenantCommand::Create {
                    name,
                    leaf_lifetime_secs,
                },
        } => {
            let id = tenant_create(&cfg, &name, leaf_lifetime_secs).await?;
            println!("{id}");
            Ok(())
        }
        Command::AdminKey {
            command: AdminKeyCommand::Create { tenant, name },
        } => {
            let tenant: TenantId = tenant.parse().map_err(|_| CliError::TenantArgument)?;
            let key = admin_key_create(&cfg, tenant, &name).await?;
            // The one place the key leaves the process.
            println!("{}", key.expose_secret());
            Ok(())
        }
        Command::Projection {
            command: ProjectionCommand::Rebuild,
        } => {
            let s = projection_rebuild(&cfg).await?;
            println!(
                "projection rebuilt: {} tenants, {} agents, {} certificates (resync seq {})",
                s.tenants, s.agents, s.certificates, s.seq
            );
            Ok(())
        }
    }
}

/// The binary's entry point: parses arguments, sets up logging (stderr,
/// `RUST_LOG`, default `info`), runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    oneprotect_logging::init(
        cli.log.log_format,
        oneprotect_logging::Stream::Stderr,
        "RUST_LOG",
        "info",
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_command(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_reported_through_start_error_unchanged() {
        let store = || StoreError::Database(sqlx::Error::PoolClosed);
        let e = CliError::from(store());
        assert!(matches!(e, CliError::Start(StartError::Store(_))), "{e:?}");
        assert_eq!(e.to_string(), store().to_string());
        assert_eq!(crate::error_chain(&e), crate::error_chain(&store()));
    }
}
