//! The command line (clap derive). [`Cli::command`] also feeds the shell
//! completions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use oneprotect_identity::{AgentId, TenantId, TokenId};

use crate::client::{DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_TIMEOUT_SECS};
use crate::output::Format;

const AFTER_HELP: &str = "\
Settings (a flag beats the environment, which beats the config file):
  server          --server URL         ONEPROTECT_SERVER     server = \"https://…\"
  CA file         --ca-file PEM        ONEPROTECT_CA_FILE    ca_file = \"…\"
  admin key       --admin-key-file F   ONEPROTECT_ADMIN_KEY  admin_key_file = \"…\"
  config file     --config PATH, else $XDG_CONFIG_HOME/oneprotect/cli.toml,
                  else ~/.config/oneprotect/cli.toml
The admin key is never accepted as a command-line value: a command line is
visible to every user of the machine and stays in shell history.

Exit status:
  0  success
  1  anything else (unexpected answer, TLS certificate that does not verify, file I/O)
  2  usage: bad arguments, or missing/invalid settings
  3  not found (404): no such token, agent or tenant in the key's tenant
  4  admin key refused (401/403)
  5  input or state refused (400/409/413/415/422)
  6  server unavailable: 5xx, 408, 429, connection failed or timed out (retry later)

Example:
  export ONEPROTECT_SERVER=https://127.0.0.1:8444
  export ONEPROTECT_CA_FILE=.data/dev/enroll-api/tls/dev-cert.pem
  oneprotect --admin-key-file ~/.config/oneprotect/admin.key tokens create --ttl 600 --secret-file token
";

/// The OneProtect admin command line: enrollment tokens, agents, CA
/// material, CRLs and service status over the enroll-api's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "oneprotect", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Settings shared by every command.
    #[command(flatten, next_help_heading = "Global options")]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The enroll-api base URL, https://host[:port][/prefix]; plain http://
    /// only to a loopback host (or with --insecure-http).
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// PEM file of the CA(s) that verify the server's certificate; the
    /// system's roots when not given.
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// A file holding the admin key (`opak_…`, mode 0600). Or set
    /// ONEPROTECT_ADMIN_KEY. There is no --admin-key: a key on the command
    /// line is visible to other users (ps) and stays in shell history.
    #[arg(long, global = true, value_name = "PATH")]
    pub admin_key_file: Option<PathBuf>,
    /// Refused, with the reason: see --admin-key-file.
    #[arg(long, global = true, hide = true, value_name = "KEY", num_args = 0..=1)]
    pub admin_key: Option<Option<String>>,
    /// The configuration file (TOML: server, ca_file, admin_key_file).
    /// [default: $XDG_CONFIG_HOME/oneprotect/cli.toml or ~/.config/oneprotect/cli.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Allow plain http:// to a host that is not loopback. The admin key
    /// and token secrets then travel unencrypted: only for a network path
    /// protected otherwise.
    #[arg(long, global = true)]
    pub insecure_http: bool,
    /// Output format [default: table on a terminal, json otherwise]. JSON is
    /// the server's answer unchanged.
    #[arg(long, short = 'o', global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<Format>,
    /// Seconds allowed for the TCP connect and TLS handshake.
    #[arg(long, global = true, value_name = "SECS", default_value_t = DEFAULT_CONNECT_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub connect_timeout: u64,
    /// Seconds allowed for a whole request, connect included.
    #[arg(long, global = true, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Print each request's method, URL, status and time on stderr (never
    /// a header or body).
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Is the server up (/healthz) and ready (/readyz)? With an admin key,
    /// also whether the key is accepted and for which tenant.
    Status,
    /// Enrollment tokens: the one-use (or n-use) secrets agents enroll with.
    #[command(subcommand)]
    Tokens(TokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentCommand),
    /// CA material: the tenant's issuing CA with the root, or the public
    /// trust bundle.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The revocation projection the gateways read, as the server sees it:
    /// backend, reachable, last build, announcement sequence, outbox backlog.
    /// Exits 6 when the projection does not answer. For operators: the server
    /// answers loopback clients only (its host, or an SSH tunnel).
    Projection,
    /// Fetch a certificate revocation list: the key's tenant CA's (default),
    /// another tenant's (--tenant), the root's (--root), or the tenant's
    /// chain file (--chain: tenant then root, PEM).
    Crl(CrlArgs),
    /// Print shell completions: `oneprotect completions bash > /etc/bash_completion.d/oneprotect`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `tokens …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token. The secret is shown once and cannot be retrieved again.
    Create(TokenCreateArgs),
    /// List the tenant's tokens, newest first.
    #[command(visible_alias = "ls")]
    List(TokenListArgs),
    /// Show one token (never its secret).
    #[command(visible_alias = "get")]
    Show {
        /// The token id.
        #[arg(value_parser = parse_id::<TokenId>)]
        token_id: TokenId,
    },
    /// Revoke a token: no agent can enroll with it any more.
    Revoke {
        /// The token id.
        #[arg(value_parser = parse_id::<TokenId>)]
        token_id: TokenId,
    },
}

/// `tokens create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Lifetime in seconds, 60..=2592000 [server default: 3600].
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u64>,
    /// How many enrollments it allows, 1..=10000 [server default: 1].
    #[arg(long, value_name = "N")]
    pub max_uses: Option<u32>,
    /// A note for admins (at most 256 characters).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// A label KEY=VALUE (repeatable, at most 16).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Write the secret to this new file (mode 0600) instead of printing it;
    /// the agent reads it with `--token-file`. The JSON printed then lacks
    /// `token`.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
}

/// `tokens list`.
#[derive(Debug, Args)]
pub struct TokenListArgs {
    /// Only tokens with this status.
    #[arg(long, value_enum)]
    pub status: Option<TokenStatus>,
    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// `agents list`.
#[derive(Debug, Args)]
pub struct AgentListArgs {
    /// Only agents with this status.
    #[arg(long, value_enum)]
    pub status: Option<AgentStatus>,
    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// Paging of the list commands.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Page size, 1..=500 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,
    /// Start after this cursor (a previous page's `next_cursor`).
    #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
    pub cursor: Option<String>,
    /// Follow `next_cursor` to the end and print every item as one list.
    #[arg(long)]
    pub all: bool,
}

/// A token's status, as the API filters by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable.
    Active,
    /// Revoked by an admin.
    Revoked,
    /// Past its expiry.
    Expired,
    /// Every use spent.
    UsedUp,
}

/// An agent's status, as the API filters by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Enrolled and not revoked.
    Active,
    /// Revoked.
    Revoked,
}

/// `agents …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List the tenant's agents.
    #[command(visible_alias = "ls")]
    List(AgentListArgs),
    /// Show one agent: identity, host, certificate serials and expiry.
    #[command(visible_alias = "get")]
    Show {
        /// The agent id.
        #[arg(value_parser = parse_id::<AgentId>)]
        agent_id: AgentId,
    },
    /// Revoke an agent: gateways refuse it within the propagation bound,
    /// on open connections too. Not reversible.
    Revoke {
        /// The agent id.
        #[arg(value_parser = parse_id::<AgentId>)]
        agent_id: AgentId,
        /// Why (recorded in the agent and its event, 1..=256 characters).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// The agent's lifecycle events, oldest first (at most 1000).
    Events {
        /// The agent id.
        #[arg(value_parser = parse_id::<AgentId>)]
        agent_id: AgentId,
    },
}

/// `ca …`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The key's tenant issuing CA and the root (admin). Table output: the
    /// two certificates as one PEM file, issuing CA first.
    Show {
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The public trust bundle (root certificates, PEM) that verifies every
    /// agent chain. No admin key needed.
    TrustBundle {
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `crl`.
#[derive(Debug, Args)]
pub struct CrlArgs {
    /// This tenant's CRL (public: no admin key needed) [default: the admin
    /// key's tenant].
    #[arg(long, value_name = "TENANT_ID", value_parser = parse_id::<TenantId>, conflicts_with = "root")]
    pub tenant: Option<TenantId>,
    /// The root CA's CRL (it lists revoked tenant CAs).
    #[arg(long)]
    pub root: bool,
    /// The tenant's chain file: its CRL then the root's, PEM (what nginx
    /// `ssl_crl` and Envoy `crl` load).
    #[arg(long, conflicts_with = "root")]
    pub chain: bool,
    /// DER or PEM [default: der; pem for --chain]. DER is refused on a
    /// terminal: use --out or --format pem.
    #[arg(long, value_enum)]
    pub format: Option<CrlFormat>,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// A CRL's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CrlFormat {
    /// Binary DER (`application/pkix-crl`), as `openssl crl -inform DER` reads.
    Der,
    /// PEM (`-----BEGIN X509 CRL-----`).
    Pem,
}

/// A canonical id; upper-case hex is accepted and lowered.
fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim().to_ascii_lowercase().parse().map_err(|_| {
        format!("{s:?} is not an id (a UUID like 6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10)")
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ids_and_labels_parse() {
        let id = "6F1E0C9A-3A51-4C1B-9A57-0C7F2F6D8E10";
        let t: TokenId = parse_id(id).unwrap();
        assert_eq!(t.to_string(), id.to_ascii_lowercase());
        assert!(parse_id::<TokenId>("nope").is_err());
        assert_eq!(
            parse_label("site=lab=1").unwrap(),
            ("site".into(), "lab=1".into())
        );
        assert!(parse_label("=x").is_err());
        assert!(parse_label("x").is_err());
    }

    #[test]
    fn global_flags_go_anywhere_and_defaults_hold() {
        let cli = Cli::try_parse_from([
            "oneprotect",
            "tokens",
            "list",
            "--server",
            "https://h:1",
            "-o",
            "json",
            "--all",
        ])
        .unwrap();
        assert_eq!(cli.global.server.as_deref(), Some("https://h:1"));
        assert_eq!(cli.global.output, Some(Format::Json));
        assert_eq!(cli.global.connect_timeout, DEFAULT_CONNECT_TIMEOUT_SECS);
        assert_eq!(cli.global.timeout, DEFAULT_TIMEOUT_SECS);
        assert!(matches!(
            cli.command,
            Command::Tokens(TokenCommand::List(TokenListArgs {
                page: PageArgs { all: true, .. },
                ..
            }))
        ));
    }

    #[test]
    fn usage_errors_are_refused_by_clap() {
        for args in [
            vec!["oneprotect", "crl", "--root", "--chain"],
            vec!["oneprotect", "tokens", "show", "not-an-id"],
            vec![
                "oneprotect",
                "agents",
                "revoke",
                "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10",
            ],
            vec!["oneprotect", "tokens", "list", "--limit", "0"],
            vec!["oneprotect", "tokens", "list", "--all", "--cursor", "x"],
            vec!["oneprotect", "--timeout", "0", "status"],
        ] {
            let e = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
