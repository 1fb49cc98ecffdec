//! Prometheus metrics of one enroll-api instance, in their own registry (so
//! several instances can run in one test process). Served on `GET /metrics`
//! to loopback peers only.

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use oneprotect_identity::events::AgentOperation;
use oneprotect_identity::AssertionError;

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
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("static metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
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
        Self {
            registry,
            rotations,
            confirmations,
            superseded_use,
            reuse_reports,
            assertion_refusals,
            grace_expired,
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
