//! Log set-up shared by OneProtect's binaries.
//!
//! Every binary logs through `tracing` with an `EnvFilter` (`RUST_LOG`, or the
//! binary's own variable) and one of two formats:
//!
//! - `text` (the default): human-readable lines. ANSI colour only when the
//!   log stream is a terminal and `NO_COLOR` is unset, so a log file or a
//!   pipe to a shipper never carries escape sequences.
//! - `json`: one JSON object per line (timestamp, level, target, fields,
//!   span), for log shippers. Never coloured.
//!
//! The format comes from `--log-format` or `ONEPROTECT_LOG_FORMAT`
//! ([`LogArgs`], flattened into each binary's clap arguments).

use std::io::IsTerminal;

/// The environment variable that chooses the log format.
pub const FORMAT_ENV: &str = "ONEPROTECT_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The stream logs go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The `--log-format` option, for `#[command(flatten)]`.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LogArgs {
    /// Log format: `text` (coloured only on a terminal) or `json` (one object
    /// per line, for log shippers).
    #[arg(long, value_enum, env = FORMAT_ENV, default_value_t, global = true)]
    pub log_format: LogFormat,
}

/// Whether text logs on `stream` get ANSI colour: only on a terminal, and
/// never with `NO_COLOR` set (<https://no-color.org>).
pub fn use_colour(stream: Stream, no_color: Option<&std::ffi::OsStr>) -> bool {
    if no_color.is_some_and(|v| !v.is_empty()) {
        return false;
    }
    match stream {
        Stream::Stdout => std::io::stdout().is_terminal(),
        Stream::Stderr => std::io::stderr().is_terminal(),
    }
}

/// Installs the global subscriber. The filter is read from `filter_env`
/// (e.g. `RUST_LOG`), else `default_filter`. Does nothing if a subscriber is
/// already installed (tests may call it twice).
pub fn init(format: LogFormat, stream: Stream, filter_env: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(filter_env)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let colour = use_colour(stream, std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let res = match (format, stream) {
        (LogFormat::Text, Stream::Stdout) => builder.with_ansi(colour).try_init(),
        (LogFormat::Text, Stream::Stderr) => builder
            .with_ansi(colour)
            .with_writer(std::io::stderr)
            .try_init(),
        (LogFormat::Json, Stream::Stdout) => builder.json().with_ansi(false).try_init(),
        (LogFormat::Json, Stream::Stderr) => builder
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    // An already-installed subscriber is not an error worth stopping for.
    drop(res);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn no_color_turns_colour_off_whatever_the_stream() {
        let off = std::ffi::OsStr::new("1");
        assert!(!use_colour(Stream::Stdout, Some(off)));
        assert!(!use_colour(Stream::Stderr, Some(off)));
    }

    #[test]
    fn colour_follows_the_terminal() {
        // Under `cargo test` the streams are whatever the runner gave us:
        // the answer must match IsTerminal exactly.
        assert_eq!(
            use_colour(Stream::Stderr, None),
            std::io::stderr().is_terminal()
        );
        assert_eq!(
            use_colour(Stream::Stdout, None),
            std::io::stdout().is_terminal()
        );
    }

    #[test]
    fn log_format_flag_parses_and_defaults_to_text() {
        let c = Cli::try_parse_from(["x"]).unwrap();
        // The default holds unless the environment chose otherwise.
        if std::env::var_os(FORMAT_ENV).is_none() {
            assert_eq!(c.log.log_format, LogFormat::Text);
        }
        let c = Cli::try_parse_from(["x", "--log-format", "json"]).unwrap();
        assert_eq!(c.log.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
    }
}
