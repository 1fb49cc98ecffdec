//! Prometheus metrics of one enroll-api instance, in their own registry (so
//! several instances can run in one test process). Served on `GET /metrics`
//! to loopback peers only.
//!
//! Counters whose label values form a small known set are created with
//! every value at 0, so a family is on the page from the start and
//! `rate()`/`increase()` see its first event (a series that appears at 1 has
//! no earlier sample to differ from). `deploy/grafana/` and
//! `deploy/prometheus/` name these metrics; `tests/tests/suite/kit_metrics.rs`
//! checks that every name they use is exported.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use time::OffsetDateTime;

use oneprotect_identity::events::AgentOperation;
use oneprotect_identity::problem;
use oneprotect_identity::AssertionError;

use crate::store::{AnyStore, Store};

/// The outbox gauges count at most this many pending rows (the scrape reads
/// them); a page showing it means "at least this many".
pub const OUTBOX_COUNT_CAP: u32 = 1000;
/// How long the scrape waits for the outbox read before giving up (the
/// gauges then read -1).
const OUTBOX_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Every metric the enroll-api exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rotations: IntCounterVec,
    confirmations: IntCounterVec,
    superseded_use: IntCounterVec,
    reuse_reports: IntCounterVec,
    assertion_refusals: IntCounterVec,
    grace_expired: IntCounter,
    requests: IntCounterVec,
    problems: IntCounterVec,
    outbox_pending: IntGauge,
    outbox_oldest_pending: IntGauge,
    enforcements: IntCounterVec,
    enforcement_seconds: Histogram,
    lagging_gateways: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    counter_vec_n(r, name, help, &[label])
}

fn counter_vec_n(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

/// Creates the series of every value in `values` at 0.
fn zero(c: &IntCounterVec, values: &[&str]) {
    for v in values {
        c.with_label_values(&[v]);
    }
}

/// The `method` label: the request method when it is a standard one, else
/// `other` (any token is a valid method; the label set stays bounded).
fn method_label(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("oneprotect_enroll".into()), None)
            .expect("static registry prefix is valid");
        let rotations = counter_vec(
            &registry,
            "rotations_total",
            "Certificate rotations by outcome (rotated, refused)",
            "outcome",
        );
        let confirmations = counter_vec(
            &registry,
            "confirmations_total",
            "Certificate confirmations by outcome (completed, no_op, refused)",
            "outcome",
        );
        let superseded_use = counter_vec(
            &registry,
            "superseded_certificate_use_total",
            "Agent operations attempted with a superseded certificate (possible key theft)",
            "operation",
        );
        let reuse_reports = counter_vec(
            &registry,
            "reuse_reports_total",
            "Superseded-certificate uses reported by gateways, by outcome (recorded, duplicate, not_superseded, invalid)",
            "outcome",
        );
        let assertion_refusals = counter_vec(
            &registry,
            "assertion_refusals_total",
            "Gateway identity assertions refused by the agent endpoints, by reason",
            "reason",
        );
        let grace_expired = IntCounter::new(
            "rotation_grace_expired_total",
            "Previous certificates superseded because the rotation grace period ended",
        )
        .expect("static metric");
        registry
            .register(Box::new(grace_expired.clone()))
            .expect("registered once");
        let requests = counter_vec_n(
            &registry,
            "requests_total",
            "Requests by method, route template (`none`: no route matched) and response status",
            &["method", "route", "status"],
        );
        let problems = counter_vec(
            &registry,
            "problems_total",
            "Problem (error) answers by problem code",
            "code",
        );
        let outbox_pending = gauge(
            &registry,
            "outbox_pending",
            "Outbox events of every tenant not yet relayed to Redis (read on scrape, at most OUTBOX_COUNT_CAP; -1: the store could not be read)",
        );
        let outbox_oldest_pending = gauge(
            &registry,
            "outbox_oldest_pending_seconds",
            "Age of the oldest outbox event not yet relayed, seconds (0: none pending; -1: the store could not be read)",
        );
        let enforcements = counter_vec(
            &registry,
            "revocation_enforcements_total",
            "Revocations and supersessions answered, by what the gateways confirmed (confirmed, lagging, unconfirmed, not_waited)",
            "outcome",
        );
        let enforcement_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "revocation_enforcement_seconds",
                "From a revocation's commit to the last live gateway's confirmation (or the deadline), seconds",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
            ]),
        )
        .expect("static metric");
        registry
            .register(Box::new(enforcement_seconds.clone()))
            .expect("registered once");
        let lagging_gateways = IntCounter::new(
            "revocation_lagging_gateways_total",
            "Live gateways that had not applied a revocation when its deadline passed (summed over answers)",
        )
        .expect("static metric");
        registry
            .register(Box::new(lagging_gateways.clone()))
            .expect("registered once");
        zero(
            &enforcements,
            &crate::enforce::Outcome::ALL.map(crate::enforce::Outcome::as_str),
        );
        zero(&rotations, &["rotated", "refused"]);
        zero(&confirmations, &["completed", "no_op", "refused"]);
        zero(
            &superseded_use,
            &[
                AgentOperation::Rotate,
                AgentOperation::Confirm,
                AgentOperation::Request,
            ]
            .map(AgentOperation::as_str),
        );
        zero(
            &reuse_reports,
            &["recorded", "duplicate", "not_superseded", "invalid"],
        );
        for kind in problem::ALL {
            problems.with_label_values(&[kind.code]);
        }
        Self {
            registry,
            rotations,
            confirmations,
            superseded_use,
            reuse_reports,
            assertion_refusals,
            grace_expired,
            requests,
            problems,
            outbox_pending,
            outbox_oldest_pending,
            enforcements,
            enforcement_seconds,
            lagging_gateways,
        }
    }

    /// Counts one enforcement (ADR-0022): its outcome, the time from commit
    /// to answer (when it waited) and the gateways that lagged.
    pub fn enforcement(&self, outcome: crate::enforce::Outcome, elapsed: Duration, lagging: usize) {
        self.enforcements
            .with_label_values(&[outcome.as_str()])
            .inc();
        if outcome != crate::enforce::Outcome::NotWaited {
            self.enforcement_seconds.observe(elapsed.as_secs_f64());
        }
        self.lagging_gateways.inc_by(lagging as u64);
    }

    /// Counts one answered request: `route` is the matched route template
    /// (`None`: no route matched), `problem` the problem code of an error
    /// answer.
    pub fn request(
        &self,
        method: &axum::http::Method,
        route: Option<&str>,
        status: axum::http::StatusCode,
        problem: Option<&str>,
    ) {
        self.requests
            .with_label_values(&[
                method_label(method),
                route.unwrap_or("none"),
                status.as_str(),
            ])
            .inc();
        if let Some(code) = problem {
            self.problems.with_label_values(&[code]).inc();
        }
    }

    /// Reads the outbox backlog into the outbox gauges: how many events are
    /// pending (capped at [`OUTBOX_COUNT_CAP`]) and how old the oldest is at
    /// `now`. Both read -1 when the store does not answer within a bound.
    /// The relay reads the same rows (oldest first) on every pass, so this
    /// is one more such read per scrape, and an empty one when all is well.
    pub async fn update_outbox(&self, store: &AnyStore, now: OffsetDateTime) {
        let read = tokio::time::timeout(
            OUTBOX_READ_TIMEOUT,
            store.list_pending_events(OUTBOX_COUNT_CAP),
        )
        .await;
        match read {
            Ok(Ok(rows)) => {
                let age = rows
                    .first()
                    .map_or(0, |r| (now - r.event.occurred_at).whole_seconds().max(0));
                self.outbox_pending.set(rows.len() as i64);
                self.outbox_oldest_pending.set(age);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: outbox backlog not readable");
                self.outbox_pending.set(-1);
                self.outbox_oldest_pending.set(-1);
            }
            Err(_) => {
                tracing::warn!("metrics: outbox backlog read timed out");
                self.outbox_pending.set(-1);
                self.outbox_oldest_pending.set(-1);
            }
        }
    }

    /// Counts a rotation outcome.
    pub fn rotation(&self, outcome: &str) {
        self.rotations.with_label_values(&[outcome]).inc();
    }

    /// Counts a confirmation outcome.
    pub fn confirmation(&self, outcome: &str) {
        self.confirmations.with_label_values(&[outcome]).inc();
    }

    /// Counts `uses` operations attempted with a superseded certificate.
    pub fn superseded_use(&self, op: AgentOperation, uses: u64) {
        self.superseded_use
            .with_label_values(&[op.as_str()])
            .inc_by(uses);
    }

    /// Counts `n` superseded-certificate uses a gateway reported, by what
    /// became of them: `recorded` (the window's event was written),
    /// `duplicate` (the window had its event), `not_superseded` (the store
    /// does not know the certificate as the agent's superseded one),
    /// `invalid` (an unreadable stream entry).
    pub fn reuse_report(&self, outcome: &str, n: u64) {
        self.reuse_reports.with_label_values(&[outcome]).inc_by(n);
    }

    /// Counts a refused assertion by reason.
    pub fn assertion_refused(&self, e: &AssertionError) {
        let reason = format!("{e:?}").to_ascii_lowercase();
        let reason = reason.split(['(', ' ', '{']).next().unwrap_or("other");
        self.assertion_refusals.with_label_values(&[reason]).inc();
    }

    /// Counts previous certificates superseded by the grace sweep.
    pub fn grace_expired(&self, n: u64) {
        self.grace_expired.inc_by(n);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric names (static here).
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
