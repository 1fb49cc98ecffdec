//! The TLS handshake, run by the gateway itself: bounded, counted and
//! logged like the attack surface it is.
//!
//! pingora's listener would run the handshake with a fixed 60 s bound and
//! log every failure at ERROR, so any peer could flood the logs with
//! garbage bytes, and only the failures the certificate verifier saw were
//! counted. The gateway's listener is plain TCP instead, and
//! [`crate::serve::GatewayApp`] hands each accepted socket to
//! [`Handshaker::accept`], which
//!
//! 1. reads a PROXY protocol v2 header first when the TCP peer is in
//!    `listener.trusted_proxies` ([`crate::proxy_protocol`]) and makes its
//!    source address the connection's client address;
//! 2. runs pingora's rustls acceptor (the same one a TLS listener would use,
//!    with the identity callback), the whole of 1 and 2 bounded by
//!    `listener.handshake_timeout_ms` — the socket is closed then;
//! 3. counts every failure in `handshake_failures_total{reason}` with one of
//!    the bounded set of [`REASONS`] (a refused client certificate is
//!    counted by the verifier with its own reason) and logs it at WARN
//!    through a [`LogBudget`]: the first few per interval, then one summary
//!    line of how many were not logged.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use rustls::PeerIncompatible;

use crate::metrics::Metrics;
use crate::proxy_protocol::{read_v2, Cidr, ProxyHeaderError};

/// Every `reason` label of `handshake_failures_total` this module sets.
/// The certificate verifier adds its own (see
/// [`crate::tls::VerifyError::reason`]).
pub const REASONS: [&str; 12] = [
    "timeout",
    "eof",
    "not_tls",
    "protocol_version",
    "no_shared_cipher",
    "no_shared_group",
    "no_shared_signature",
    "incompatible",
    "peer_alert",
    "no_certificate",
    "proxy_protocol",
    "other",
];

/// At most this many handshake failures are logged per [`LOG_INTERVAL`].
pub const LOG_BURST: u32 = 10;
/// See [`LOG_BURST`].
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs the first `burst` events of each interval; then counts. The next
/// event after the interval learns how many were dropped, so its caller can
/// write one summary line.
#[derive(Debug)]
pub struct LogBudget {
    burst: u32,
    interval: Duration,
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What a [`LogBudget`] allows for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Log it; `suppressed` events of the previous interval were not logged
    /// (write a summary line first when it is above 0).
    Log {
        /// Events not logged since the last summary.
        suppressed: u64,
    },
    /// Do not log it (it is counted for the next summary).
    Suppress,
}

impl LogBudget {
    /// `burst` lines per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            state: Mutex::new(BudgetState {
                window_start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// The verdict for one event at `now`.
    pub fn check(&self, now: Instant) -> Budget {
        // Consistent at every unlock: a poisoned lock is still usable.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(st.window_start) >= self.interval {
            st.window_start = now;
            st.logged = 0;
        }
        if st.logged < self.burst {
            st.logged += 1;
            Budget::Log {
                suppressed: std::mem::take(&mut st.suppressed),
            }
        } else {
            st.suppressed += 1;
            Budget::Suppress
        }
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new(LOG_BURST, LOG_INTERVAL)
    }
}

/// Why a handshake failed: a [`REASONS`] label, or `None` when the
/// certificate verifier refused the client certificate (it counted and
/// logged that with its own reason).
pub fn classify(e: &pingora::Error) -> Option<&'static str> {
    // pingora's `explain_err` nests its errors in `cause` (its `source()`
    // is empty): walk the chain, bounded, to the I/O or rustls error.
    let mut cause: Option<&(dyn std::error::Error + Send + Sync + 'static)> = e.cause.as_deref();
    for _ in 0..16 {
        let Some(c) = cause else { break };
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return classify_rustls(r);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return classify_rustls(r);
            }
            use std::io::ErrorKind as K;
            return Some(match io.kind() {
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
                    "eof"
                }
                // tokio-rustls reports a record it cannot parse as InvalidData.
                K::InvalidData => "not_tls",
                _ => "other",
            });
        }
        cause = if let Some(p) = c.downcast_ref::<pingora::Error>() {
            p.cause.as_deref()
        } else if let Some(p) = c.downcast_ref::<Box<pingora::Error>>() {
            p.cause.as_deref()
        } else {
            None
        };
    }
    // pingora 0.9's TLS accept keeps only the message of the I/O error
    // (`explain_err` with a formatted context): read that.
    classify_message(&e.to_string())
}

/// Classifies a handshake error by its message: rustls' `Display` of its
/// error (which tokio-rustls' I/O error and pingora's context carry), or
/// tokio-rustls' and the OS's I/O messages. The unit test builds the
/// rustls messages from rustls' own values, so a change there fails it.
fn classify_message(msg: &str) -> Option<&'static str> {
    const EOF: [&str; 5] = [
        "tls handshake eof",
        "Connection reset by peer",
        "Broken pipe",
        "connection reset",
        "early eof",
    ];
    if msg.contains("invalid peer certificate") {
        return None;
    }
    if let Some(rest) = msg.split("peer is incompatible: ").nth(1) {
        return Some(match rest.split(|c: char| !c.is_alphanumeric()).next() {
            Some("NoCipherSuitesInCommon") => "no_shared_cipher",
            Some("NoKxGroupsInCommon") => "no_shared_group",
            Some("NoSignatureSchemesInCommon" | "NoCertificateRequestSignatureSchemesInCommon") => {
                "no_shared_signature"
            }
            Some(
                "SupportedVersionsExtensionRequired"
                | "Tls12NotOffered"
                | "Tls12NotOfferedOrEnabled"
                | "ServerDoesNotSupportTls12Or13"
                | "ServerTlsVersionIsDisabledByOurConfig",
            ) => "protocol_version",
            _ => "incompatible",
        });
    }
    Some(if msg.contains("received fatal alert") {
        "peer_alert"
    } else if msg.contains("peer sent no certificates") {
        "no_certificate"
    } else if [
        "received corrupt message",
        "received unexpected",
        "peer misbehaved",
        "cannot decrypt peer's message",
        "peer sent excess record size",
    ]
    .iter()
    .any(|m| msg.contains(m))
    {
        "not_tls"
    } else if EOF.iter().any(|m| msg.contains(m)) {
        "eof"
    } else {
        "other"
    })
}

fn classify_rustls(e: &rustls::Error) -> Option<&'static str> {
    use rustls::Error as E;
    Some(match e {
        E::InvalidCertificate(_) => return None,
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerMisbehaved(_)
        | E::DecryptError => "not_tls",
        E::AlertReceived(_) => "peer_alert",
        E::PeerIncompatible(p) => match p {
            PeerIncompatible::NoCipherSuitesInCommon => "no_shared_cipher",
            PeerIncompatible::NoKxGroupsInCommon => "no_shared_group",
            PeerIncompatible::NoSignatureSchemesInCommon
            | PeerIncompatible::NoCertificateRequestSignatureSchemesInCommon => {
                "no_shared_signature"
            }
            PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig => "protocol_version",
            _ => "incompatible",
        },
        _ => "other",
    })
}

/// Runs each accepted connection's PROXY header read and TLS handshake.
pub struct Handshaker {
    acceptor: Acceptor,
    timeout: Duration,
    trusted_proxies: Vec<Cidr>,
    metrics: Metrics,
    log: LogBudget,
}

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaker")
            .field("timeout", &self.timeout)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

enum Failure {
    Proxy(ProxyHeaderError),
    Tls(Box<pingora::Error>),
}

impl Handshaker {
    /// A handshaker over pingora's rustls `acceptor`.
    pub fn new(
        acceptor: Acceptor,
        timeout: Duration,
        trusted_proxies: Vec<Cidr>,
        metrics: Metrics,
    ) -> Self {
        Self {
            acceptor,
            timeout,
            trusted_proxies,
            metrics,
            log: LogBudget::default(),
        }
    }

    /// Takes a freshly accepted plain TCP connection and returns it with TLS
    /// established, or `None` (counted and logged) when the handshake
    /// failed; the socket is closed then.
    pub async fn accept(&self, stream: Stream) -> Option<Stream> {
        let mut l4: L4Stream = match stream.into_any().downcast::<L4Stream>() {
            Ok(l4) => *l4,
            Err(_) => {
                // The listener is plain TCP: nothing else reaches here.
                self.failed("other", None, "not a TCP stream");
                return None;
            }
        };
        let peer = l4.get_socket_digest().and_then(|d| match d.peer_addr() {
            Some(SocketAddr::Inet(a)) => Some(a.ip()),
            _ => None,
        });
        let via_proxy = peer.is_some_and(|ip| self.trusted_proxies.iter().any(|n| n.contains(ip)));
        let acceptor = &self.acceptor;
        let run = async move {
            if via_proxy {
                if let Some(client) = read_v2(&mut l4).await.map_err(Failure::Proxy)? {
                    let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
                    let _ = digest.peer_addr.set(Some(SocketAddr::Inet(client)));
                    l4.set_socket_digest(digest);
                }
            }
            acceptor.tls_handshake(l4).await.map_err(Failure::Tls)
        };
        match pingora_timeout::timeout(self.timeout, run).await {
            Ok(Ok(tls)) => Some(Box::new(tls) as Stream),
            Ok(Err(Failure::Proxy(e))) => {
                self.failed("proxy_protocol", peer, &e.to_string());
                None
            }
            Ok(Err(Failure::Tls(e))) => {
                if let Some(reason) = classify(&e) {
                    self.failed(reason, peer, &e.to_string());
                }
                None
            }
            Err(_) => {
                self.failed("timeout", peer, "no complete handshake in time");
                None
            }
        }
    }

    fn failed(&self, reason: &'static str, peer: Option<IpAddr>, detail: &str) {
        self.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
        if let Budget::Log { suppressed } = self.log.check(Instant::now()) {
            if suppressed > 0 {
                tracing::warn!(
                    suppressed,
                    "handshake failures not logged in the last interval (all are counted in \
                     handshake_failures_total)"
                );
            }
            tracing::warn!(reason, peer = ?peer, detail, "TLS handshake failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_logs_a_burst_then_summarises() {
        let b = LogBudget::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.check(t0), Budget::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(b.check(t0 + Duration::from_secs(1)), Budget::Suppress);
        }
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(b.check(t1), Budget::Log { suppressed: 5 });
        assert_eq!(b.check(t1), Budget::Log { suppressed: 0 });
    }

    fn wrapped(e: rustls::Error) -> Box<pingora::Error> {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        pingora::Error::because(pingora::ErrorType::TLSHandshakeFailure, "tls", io)
    }

    /// As pingora 0.9 reports a failed accept: the message only.
    fn as_pingora(e: impl std::fmt::Display) -> Box<pingora::Error> {
        pingora::Error::explain(
            pingora::ErrorType::TLSHandshakeFailure,
            format!("tls connect error: {e}"),
        )
    }

    #[test]
    fn pingora_messages_map_to_bounded_reasons() {
        use rustls::Error as E;
        let cases: Vec<(String, Option<&str>)> = vec![
            (
                E::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon).to_string(),
                Some("no_shared_group"),
            ),
            (
                E::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon).to_string(),
                Some("no_shared_cipher"),
            ),
            (
                E::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired)
                    .to_string(),
                Some("protocol_version"),
            ),
            (
                E::PeerIncompatible(PeerIncompatible::NullCompressionRequired).to_string(),
                Some("incompatible"),
            ),
            (
                E::InvalidMessage(rustls::InvalidMessage::InvalidContentType).to_string(),
                Some("not_tls"),
            ),
            (
                E::InappropriateMessage {
                    expect_types: vec![rustls::ContentType::Handshake],
                    got_type: rustls::ContentType::ApplicationData,
                }
                .to_string(),
                Some("not_tls"),
            ),
            (
                E::NoCertificatesPresented.to_string(),
                Some("no_certificate"),
            ),
            (
                E::InvalidCertificate(rustls::CertificateError::Expired).to_string(),
                None,
            ),
            (
                E::AlertReceived(rustls::AlertDescription::UnknownCA).to_string(),
                Some("peer_alert"),
            ),
            ("tls handshake eof".into(), Some("eof")),
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionReset).to_string(),
                Some("eof"),
            ),
            ("something new".into(), Some("other")),
        ];
        for (msg, want) in cases {
            let e = as_pingora(&msg);
            assert_eq!(classify(&e), want, "{msg}");
        }
    }

    #[test]
    fn failures_map_to_bounded_reasons() {
        use rustls::Error as E;
        let cases: Vec<(Box<pingora::Error>, Option<&str>)> = vec![
            (
                wrapped(E::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon)),
                Some("no_shared_group"),
            ),
            (
                wrapped(E::PeerIncompatible(
                    PeerIncompatible::NoCipherSuitesInCommon,
                )),
                Some("no_shared_cipher"),
            ),
            (
                wrapped(E::PeerIncompatible(
                    PeerIncompatible::SupportedVersionsExtensionRequired,
                )),
                Some("protocol_version"),
            ),
            (
                wrapped(E::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                Some("not_tls"),
            ),
            (wrapped(E::NoCertificatesPresented), Some("no_certificate")),
            (
                wrapped(E::InvalidCertificate(rustls::CertificateError::Expired)),
                None,
            ),
            (
                wrapped(E::AlertReceived(rustls::AlertDescription::UnknownCA)),
                Some("peer_alert"),
            ),
            (
                pingora::Error::because(
                    pingora::ErrorType::TLSHandshakeFailure,
                    "tls",
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ),
                Some("eof"),
            ),
            (
                pingora::Error::explain(pingora::ErrorType::TLSHandshakeFailure, "x"),
                Some("other"),
            ),
        ];
        for (e, want) in cases {
            let got = classify(&e);
            assert_eq!(got, want, "{e}");
            if let Some(r) = got {
                assert!(REASONS.contains(&r), "{r}");
            }
        }
    }
}
