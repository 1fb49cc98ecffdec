//! `oneprotect`: the command line over the enroll-api's admin HTTP API, for
//! tenant admins and operators: enrollment tokens (create, list, show,
//! revoke), agents (list, show, revoke, events), CA material, CRLs and the
//! service's health and readiness.
//!
//! ```text
//! export ONEPROTECT_SERVER=https://127.0.0.1:8444
//! export ONEPROTECT_CA_FILE=.data/dev/enroll-api/tls/dev-cert.pem
//! oneprotect --admin-key-file admin.key tokens create --ttl 600 --secret-file token
//! oneprotect --admin-key-file admin.key agents list
//! ```
//!
//! The binary is a thin `main.rs` over [`run`]; the settings
//! ([`settings`]), the HTTP client ([`client`]), the tables ([`output`]) and
//! the exit statuses ([`error::exit`]) are plain modules with unit tests.
//! `cli/README.md` documents the commands, settings and exit statuses.

pub mod args;
pub mod client;
pub mod commands;
pub mod error;
pub mod output;
pub mod settings;

use std::io::Write;
use std::time::Duration;

use args::{Cli, Command};
use client::ClientOptions;
use commands::Ctx;
pub use error::CliError;
use output::Format;
use settings::{Flags, Settings};

/// Runs one parsed command line. `env` reads the environment (tests pass
/// their own); answers go to `out`, notes and warnings to stderr.
pub async fn run(
    cli: Cli,
    env: &dyn Fn(&str) -> Option<String>,
    stdout_is_terminal: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let g = &cli.global;
    if g.admin_key.is_some() {
        // The value is not echoed: it may be a real key.
        return Err(CliError::usage(
            "--admin-key is not accepted: a key on the command line is visible to other \
             users (ps, /proc) and stays in shell history. Set ONEPROTECT_ADMIN_KEY or use \
             --admin-key-file PATH (mode 0600)",
        ));
    }
    if let Command::Completions { shell } = &cli.command {
        return commands::completions(*shell, out);
    }
    let file = settings::load_config(g.config.as_deref(), env)?;
    let flags = Flags {
        server: g.server.clone(),
        ca_file: g.ca_file.clone(),
        admin_key_file: g.admin_key_file.clone(),
    };
    let ctx = Ctx {
        settings: Settings::resolve(&flags, env, file),
        format: Format::resolve(g.output, stdout_is_terminal),
        opts: ClientOptions {
            insecure_http: g.insecure_http,
            connect_timeout: Duration::from_secs(g.connect_timeout),
            timeout: Duration::from_secs(g.timeout),
            verbose: g.verbose,
        },
        stdout_is_terminal,
    };
    match &cli.command {
        Command::Status => commands::status(&ctx, out).await,
        Command::Tokens(c) => commands::tokens(&ctx, c, out).await,
        Command::Agents(c) => commands::agents(&ctx, c, out).await,
        Command::Ca(c) => commands::ca(&ctx, c, out).await,
        Command::Crl(a) => commands::crl(&ctx, a, out).await,
        Command::Projection => commands::projection(&ctx, out).await,
        Command::Completions { .. } => Ok(()),
    }
}
