//! Errors of the agent library.

use std::path::PathBuf;

use serde::Deserialize;

/// An RFC 9457 problem document returned by the enroll-api or the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiProblem {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code (see `identity::problem`).
    #[serde(default)]
    pub code: String,
    /// Short summary.
    #[serde(default)]
    pub title: String,
    /// Details of this occurrence.
    #[serde(default)]
    pub detail: Option<String>,
}

impl std::fmt::Display for ApiProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.status, self.title, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl ApiProblem {
    /// Whether this answer means the agent's identity is finished: revoked,
    /// superseded, or otherwise refused for good. Retrying cannot help.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.code.as_str(),
            "agent_revoked"
                | "certificate_revoked"
                | "certificate_superseded"
                | "identity_mismatch"
        )
    }
}

/// What can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A URL could not be used (scheme, host, port).
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// A PEM file or key could not be read or parsed.
    #[error("invalid {what}: {reason}")]
    BadPem {
        /// What was being read.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("connection to {addr} failed: {reason}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The request did not complete within the timeout.
    #[error("request to {0} timed out")]
    Timeout(String),
    /// The server answered with an error document.
    #[error("server refused: {0}")]
    Api(ApiProblem),
    /// The server answered something that is not the documented response.
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// Generating the key or the CSR failed.
    #[error("key generation: {0}")]
    Key(String),
    /// Reading or writing the state directory failed.
    #[error("state directory {path}: {source}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory holds no identity yet.
    #[error("no identity in {0}: run `oneprotect-agent enroll` first")]
    NotEnrolled(PathBuf),
}

impl AgentError {
    pub(crate) fn state(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::State {
            path: path.into(),
            source,
        }
    }

    /// Whether retrying later cannot help (revoked, superseded, bad input).
    pub fn is_terminal(&self) -> bool {
        match self {
            AgentError::Api(p) => p.is_terminal(),
            AgentError::NotEnrolled(_) | AgentError::BadUrl { .. } | AgentError::BadPem { .. } => {
                true
            }
            _ => false,
        }
    }
}
