//! What can go wrong, and the exit status each failure gives a script.

use std::time::Duration;

/// The exit statuses, as `--help` and `cli/README.md` document them.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Anything not listed below (an unexpected answer, a file that cannot
    /// be written, a TLS certificate that does not verify).
    pub const OTHER: u8 = 1;
    /// Usage: bad arguments (clap's own status), or settings that are
    /// missing or invalid (no server, unreadable key file, plain HTTP to a
    /// remote host).
    pub const USAGE: u8 = 2;
    /// 404: the token, agent or tenant does not exist in the key's tenant.
    pub const NOT_FOUND: u8 = 3;
    /// 401 or 403: the admin key was refused.
    pub const AUTH: u8 = 4;
    /// 400, 409, 413, 415 or 422: the server refused the input or the
    /// resource's state.
    pub const INVALID: u8 = 5;
    /// The server is unavailable: 5xx, 408, 429, a connection that failed or
    /// timed out. Retrying later may help.
    pub const UNAVAILABLE: u8 = 6;
}

/// The exit status for an HTTP error status.
pub fn exit_for_status(status: u16) -> u8 {
    match status {
        404 => exit::NOT_FOUND,
        401 | 403 => exit::AUTH,
        400 | 409 | 413 | 415 | 422 => exit::INVALID,
        408 | 429 | 500..=599 => exit::UNAVAILABLE,
        _ => exit::OTHER,
    }
}

/// An RFC 9457 problem document as the enroll-api sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Problem {
    /// The fixed title of the problem kind.
    #[serde(default)]
    pub title: Option<String>,
    /// The stable machine-readable code.
    #[serde(default)]
    pub code: Option<String>,
    /// What happened in this occurrence.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A failure of one command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Missing or invalid settings, or a request the CLI refuses to make.
    #[error("{0}")]
    Usage(String),
    /// The server answered with an error status.
    #[error("{}", api_message(.status, .problem))]
    Api {
        /// The HTTP status.
        status: u16,
        /// The problem document, when the body was one.
        problem: Option<Problem>,
    },
    /// No connection could be made (DNS, refused, reset).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The TLS handshake failed because the server's certificate did not
    /// verify (or another TLS protocol error).
    #[error("TLS with {addr} failed: {reason} (is --ca-file the CA that issued the server's certificate?)")]
    Tls {
        /// `host:port`.
        addr: String,
        /// What rustls said.
        reason: String,
    },
    /// Connect or the whole request took longer than allowed.
    #[error("{what} timed out after {}s", .after.as_secs_f64())]
    Timeout {
        /// `connect` or `request`.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The answer was not what the API documents (too large, not JSON).
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The server answered, and says a part it depends on is unavailable
    /// (`projection`: the revocation projection does not answer).
    #[error("{0}")]
    Unavailable(String),
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn api_message(status: &u16, problem: &Option<Problem>) -> String {
    let status = *status;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    match problem {
        Some(p) => {
            let title = p.title.as_deref().unwrap_or(reason);
            let mut m = match &p.code {
                Some(code) => format!("{title} ({code}, HTTP {status})"),
                None => format!("{title} (HTTP {status})"),
            };
            if let Some(d) = &p.detail {
                m.push_str(": ");
                m.push_str(d);
            }
            m
        }
        None => format!("HTTP {status} {reason} (the answer is not a problem document)"),
    }
}

impl CliError {
    /// The exit status this failure gives.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Api { status, .. } => exit_for_status(*status),
            CliError::Connect { .. } | CliError::Timeout { .. } | CliError::Unavailable(_) => {
                exit::UNAVAILABLE
            }
            CliError::Tls { .. } | CliError::Protocol(_) | CliError::Io { .. } => exit::OTHER,
        }
    }

    /// A usage error.
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    /// A local file error.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            what: what.into(),
            source,
        }
    }

    /// The one line printed on stderr: the message (every variant's
    /// message already names its cause), control characters (a server's
    /// detail could hold a newline) as spaces, and `secret` (the admin key,
    /// should a hostile server echo it) redacted.
    pub fn one_line(&self, secret: Option<&str>) -> String {
        one_line(&self.to_string(), secret)
    }
}

/// `text` on one line (control characters as spaces), with `secret`
/// replaced by `[redacted]`.
pub fn one_line(text: &str, secret: Option<&str>) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if let Some(s) = secret.filter(|s| !s.is_empty()) {
        line = line.replace(s, "[redacted]");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_documented_exit_codes() {
        for (status, code) in [
            (404, 3),
            (401, 4),
            (403, 4),
            (400, 5),
            (409, 5),
            (413, 5),
            (415, 5),
            (422, 5),
            (408, 6),
            (429, 6),
            (500, 6),
            (502, 6),
            (503, 6),
            (504, 6),
            (405, 1),
            (302, 1),
            (418, 1),
        ] {
            assert_eq!(exit_for_status(status), code, "{status}");
        }
    }

    #[test]
    fn error_kinds_map_to_exit_codes() {
        let api = |status| CliError::Api {
            status,
            problem: None,
        };
        assert_eq!(api(404).exit_code(), exit::NOT_FOUND);
        assert_eq!(api(401).exit_code(), exit::AUTH);
        assert_eq!(api(422).exit_code(), exit::INVALID);
        assert_eq!(api(503).exit_code(), exit::UNAVAILABLE);
        assert_eq!(CliError::usage("x").exit_code(), exit::USAGE);
        let connect = CliError::Connect {
            addr: "127.0.0.1:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(connect.exit_code(), exit::UNAVAILABLE);
        let timeout = CliError::Timeout {
            what: "connect",
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.exit_code(), exit::UNAVAILABLE);
        let tls = CliError::Tls {
            addr: "h:1".into(),
            reason: "bad cert".into(),
        };
        assert_eq!(tls.exit_code(), exit::OTHER);
        assert_eq!(CliError::Protocol("x".into()).exit_code(), exit::OTHER);
    }

    #[test]
    fn problem_messages_name_title_code_status_and_detail_on_one_line() {
        let e = CliError::Api {
            status: 422,
            problem: Some(Problem {
                title: Some("Request fields are missing or invalid".into()),
                code: Some("invalid_request".into()),
                detail: Some("ttl_seconds must be\n60..=2592000".into()),
            }),
        };
        assert_eq!(
            e.one_line(None),
            "Request fields are missing or invalid (invalid_request, HTTP 422): \
             ttl_seconds must be 60..=2592000"
        );
        let bare = CliError::Api {
            status: 502,
            problem: None,
        };
        assert_eq!(
            bare.one_line(None),
            "HTTP 502 Bad Gateway (the answer is not a problem document)"
        );
        let no_code = CliError::Api {
            status: 404,
            problem: Some(Problem::default()),
        };
        assert_eq!(no_code.one_line(None), "Not Found (HTTP 404)");
    }

    #[test]
    fn one_line_redacts_the_secret() {
        let e = CliError::Protocol("echo opak_secret123 back".into());
        let line = e.one_line(Some("opak_secret123"));
        assert!(!line.contains("opak_secret123"), "{line}");
        assert!(line.contains("[redacted]"));
        // An empty secret redacts nothing (and does not loop).
        assert_eq!(one_line("a\tb", Some("")), "a b");
    }

    #[test]
    fn io_errors_keep_their_cause_in_the_line() {
        let e = CliError::io(
            "write /x",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        );
        assert_eq!(e.one_line(None), "write /x: denied");
        assert_eq!(e.exit_code(), exit::OTHER);
    }
}
