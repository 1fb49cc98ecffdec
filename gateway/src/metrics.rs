//! Prometheus metrics of one gateway instance, in their own registry (so
//! several gateways can run in one test process).
//!
//! Counters whose label values form a small known set are created with
//! every value at 0, so a family is on the page from the start and
//! `rate()`/`increase()` see its first event. `deploy/grafana/` and
//! `deploy/prometheus/` name these metrics; `tests/tests/suite/kit_metrics.rs`
//! checks that every name they use is exported.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use oneprotect_identity::problem;

/// Every `reason` of `connections_closed_total` (see [`Metrics::connections_closed`]).
pub const CLOSE_REASONS: [&str; 10] = [
    "idle_timeout",
    "h2_error",
    "header_timeout",
    "header_too_large",
    "unauthenticated_timeout",
    "unauthenticated_per_source",
    "tunnel_agent_revoked",
    "tunnel_certificate_revoked",
    "tunnel_certificate_superseded",
    "tunnel_revocation_unavailable",
];

/// Every `code` of `revocation_refusals_total`.
pub const REFUSAL_CODES: [&str; 4] = [
    problem::AGENT_REVOKED.code,
    problem::CERTIFICATE_REVOKED.code,
    problem::CERTIFICATE_SUPERSEDED.code,
    problem::REVOCATION_UNAVAILABLE.code,
];

/// The buckets of `client_certificate_remaining_seconds`: 10 min, 1 h,
/// 6 h, 1 d, 3 d, 7 d, 30 d, 90 d, 1 y. Agents rotate at two thirds of the
/// lifetime (default 30 days, so about 10 days left).
const REMAINING_BUCKETS: [f64; 9] = [
    600.0,
    3_600.0,
    21_600.0,
    86_400.0,
    259_200.0,
    604_800.0,
    2_592_000.0,
    7_776_000.0,
    31_536_000.0,
];

/// Every metric the gateway exports on the admin listener's `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route prefix (or `none`) and response status.
    pub requests: IntCounterVec,
    /// Failed TLS handshakes by reason: every failure, once (the bounded
    /// reasons of `handshake::REASONS` and the certificate verifier's).
    pub handshake_failures: IntCounterVec,
    /// Revocation cache hits.
    pub revocation_cache_hits: IntCounter,
    /// Revocation cache misses (each costs one Redis lookup).
    pub revocation_cache_misses: IntCounter,
    /// Refusals by problem code (revoked, superseded, unknown, unavailable).
    pub revocation_refusals: IntCounterVec,
    /// 1 while the revocation subscription is up and answering pings.
    pub redis_connected: IntGauge,
    /// The last announcement sequence number seen.
    pub revocation_last_seq: IntGauge,
    /// Announcements Redis' counter is ahead of the last one applied.
    pub revocation_seq_lag: IntGauge,
    /// Milliseconds since Redis was last confirmed (updated on scrape).
    pub revocation_staleness_ms: IntGauge,
    /// Sequence gaps and reconnects that made the cache distrusted.
    pub revocation_cache_resets: IntCounter,
    /// Presence writes to the live set (after applied announcements and on
    /// heartbeats), ADR-0022.
    pub presence_writes: IntCounter,
    /// Trust bundle reloads by outcome (`ok`, `error`).
    pub trust_bundle_reloads: IntCounterVec,
    /// Assertion signing key reloads, by outcome (`ok`, `error`).
    pub assertion_key_reloads: IntCounterVec,
    /// Upstream response latency (request sent to response header), seconds.
    pub upstream_latency: HistogramVec,
    /// Connections the gateway closed, by reason: HTTP/1.1 `idle_timeout`,
    /// `header_timeout`, `header_too_large`; any protocol, without a client
    /// certificate, `unauthenticated_timeout` and `unauthenticated_per_source`;
    /// a tunnel (after an allowed upgrade) whose certificate or agent was
    /// refused, by the problem code (`tunnel_agent_revoked`,
    /// `tunnel_certificate_revoked`, `tunnel_certificate_superseded`,
    /// `tunnel_revocation_unavailable`).
    pub connections_closed: IntCounterVec,
    /// Tunnels opened (an upstream's 101 to an allowed upgrade).
    pub tunnels_opened: IntCounter,
    /// Requests of verified identities by what the fast path did
    /// (ADR-0023, ADR-0028): `served` by it, `declined` to pingora's path
    /// (HTTP/1.1 only), `reset` by the client before the answer (HTTP/2:
    /// the work for it stopped).
    pub fast_path: IntCounterVec,
    /// Reports of refused superseded certificates by outcome: `queued`
    /// (request path), `sent` (appended to the reports stream), `dropped`
    /// (queue or hold full); counted in uses.
    pub superseded_reports: IntCounterVec,
    /// Time left until the client certificate's `notAfter` (seconds; 0 if
    /// past), observed once per verified client certificate, i.e. per full
    /// handshake. Certificates near expiry still in use mean agents that do
    /// not rotate.
    pub client_cert_remaining: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("oneprotect_gateway".into()), None)
            .expect("static registry prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests by route and status"),
            &["route", "status"],
        )
        .expect("static metric");
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "handshake_failures_total",
                "Failed TLS handshakes (and refused client certificates) by reason",
            ),
            &["reason"],
        )
        .expect("static metric");
        let revocation_cache_hits = IntCounter::new(
            "revocation_cache_hits_total",
            "Revocation answers served from cache",
        )
        .expect("static metric");
        let revocation_cache_misses = IntCounter::new(
            "revocation_cache_misses_total",
            "Revocation lookups that went to Redis",
        )
        .expect("static metric");
        let revocation_refusals = IntCounterVec::new(
            Opts::new(
                "revocation_refusals_total",
                "Requests refused by the revocation check",
            ),
            &["code"],
        )
        .expect("static metric");
        let redis_connected = IntGauge::new(
            "redis_connected",
            "1 while the revocation subscription is healthy",
        )
        .expect("static metric");
        let revocation_last_seq = IntGauge::new(
            "revocation_last_seq",
            "Last revocation announcement sequence number applied (the sum over shards when sharded)",
        )
        .expect("static metric");
        let revocation_seq_lag = IntGauge::new(
            "revocation_seq_lag",
            "How far Redis' announcement counter is ahead of the last applied one (the largest over shards)",
        )
        .expect("static metric");
        let revocation_staleness_ms = IntGauge::new(
            "revocation_staleness_ms",
            "Milliseconds since Redis was last confirmed",
        )
        .expect("static metric");
        let presence_writes = IntCounter::new(
            "revocation_presence_writes_total",
            "Writes of this gateway's presence and applied sequence to the live set",
        )
        .expect("static metric");
        let revocation_cache_resets = IntCounter::new(
            "revocation_cache_resets_total",
            "Cache distrusted after a sequence gap or reconnect",
        )
        .expect("static metric");
        let trust_bundle_reloads = IntCounterVec::new(
            Opts::new("trust_bundle_reloads_total", "Trust bundle reloads"),
            &["outcome"],
        )
        .expect("static metric");
        let assertion_key_reloads = IntCounterVec::new(
            Opts::new(
                "assertion_key_reloads_total",
                "Assertion signing key changes applied (ok) or refused (error)",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new("upstream_latency_seconds", "Upstream response latency").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            &["route"],
        )
        .expect("static metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "connections_closed_total",
                "Connections closed by the gateway's limits",
            ),
            &["reason"],
        )
        .expect("static metric");
        let tunnels_opened = IntCounter::new(
            "tunnels_opened_total",
            "Tunnels opened by an upstream's 101 to an allowed upgrade",
        )
        .expect("static metric");
        let fast_path = IntCounterVec::new(
            Opts::new(
                "fast_path_requests_total",
                "Requests of verified identities served by the fast path, declined to pingora's path, or reset by the client before the answer",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let superseded_reports = IntCounterVec::new(
            Opts::new(
                "superseded_reports_total",
                "Refused uses of superseded certificates reported to the enroll-api, by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let client_cert_remaining = Histogram::with_opts(
            HistogramOpts::new(
                "client_certificate_remaining_seconds",
                "Time left until the presented client certificate expires, per verified certificate",
            )
            .buckets(REMAINING_BUCKETS.to_vec()),
        )
        .expect("static metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(handshake_failures.clone()),
            Box::new(revocation_cache_hits.clone()),
            Box::new(revocation_cache_misses.clone()),
            Box::new(revocation_refusals.clone()),
            Box::new(redis_connected.clone()),
            Box::new(revocation_last_seq.clone()),
            Box::new(revocation_seq_lag.clone()),
            Box::new(revocation_staleness_ms.clone()),
            Box::new(revocation_cache_resets.clone()),
            Box::new(presence_writes.clone()),
            Box::new(trust_bundle_reloads.clone()),
            Box::new(assertion_key_reloads.clone()),
            Box::new(upstream_latency.clone()),
            Box::new(connections_closed.clone()),
            Box::new(tunnels_opened.clone()),
            Box::new(fast_path.clone()),
            Box::new(superseded_reports.clone()),
            Box::new(client_cert_remaining.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        fn zero(c: &IntCounterVec, values: &[&str]) {
            for v in values {
                c.with_label_values(&[v]);
            }
        }
        zero(&handshake_failures, &crate::handshake::REASONS);
        zero(&handshake_failures, &crate::tls::chain::VERIFY_REASONS);
        zero(&revocation_refusals, &REFUSAL_CODES);
        zero(&trust_bundle_reloads, &["ok", "error"]);
        zero(&connections_closed, &CLOSE_REASONS);
        zero(&superseded_reports, &["queued", "sent", "dropped"]);
        zero(&fast_path, &["served", "declined", "reset"]);
        Self {
            registry,
            requests,
            handshake_failures,
            revocation_cache_hits,
            revocation_cache_misses,
            revocation_refusals,
            redis_connected,
            revocation_last_seq,
            revocation_seq_lag,
            revocation_staleness_ms,
            revocation_cache_resets,
            presence_writes,
            trust_bundle_reloads,
            assertion_key_reloads,
            upstream_latency,
            connections_closed,
            tunnels_opened,
            fast_path,
            superseded_reports,
            client_cert_remaining,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The families with a known label set are on the page before any event.
    #[test]
    fn bounded_label_sets_start_at_zero() {
        let page = String::from_utf8(Metrics::new().render()).unwrap();
        let mut want = Vec::new();
        for r in crate::handshake::REASONS
            .iter()
            .chain(&crate::tls::chain::VERIFY_REASONS)
        {
            want.push(format!(
                "oneprotect_gateway_handshake_failures_total{{reason=\"{r}\"}} 0"
            ));
        }
        for c in REFUSAL_CODES {
            want.push(format!(
                "oneprotect_gateway_revocation_refusals_total{{code=\"{c}\"}} 0"
            ));
        }
        for r in CLOSE_REASONS {
            want.push(format!(
                "oneprotect_gateway_connections_closed_total{{reason=\"{r}\"}} 0"
            ));
        }
        for o in ["queued", "sent", "dropped"] {
            want.push(format!(
                "oneprotect_gateway_superseded_reports_total{{outcome=\"{o}\"}} 0"
            ));
        }
        want.push("oneprotect_gateway_trust_bundle_reloads_total{outcome=\"error\"} 0".into());
        want.push("oneprotect_gateway_client_certificate_remaining_seconds_count 0".into());
        for line in want {
            assert!(page.contains(&line), "{line} missing:\n{page}");
        }
    }
}
