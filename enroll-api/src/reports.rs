//! The consumer of the gateways' superseded-certificate reports (issue 15,
//! item 13).
//!
//! A gateway refuses a superseded certificate itself (403
//! `certificate_superseded`), so the attempt never reaches this service's
//! endpoints; the gateway appends a [`SupersededUse`] to the
//! `{prefix}reports` Redis Stream instead (`oneprotect_gateway::reports`).
//! Each replica reads that stream with the consumer group [`GROUP`]
//! (created at `0` with `MKSTREAM`, so reports written before the first
//! replica started are read too) and, per report, asks the store to record
//! it ([`Store::record_superseded_use`]): the store checks that the
//! certificate is the tenant's agent's and superseded, claims the attempt
//! window (`rotation.reuse_window_secs`) for the certificate and, for the
//! window's first report, writes `agent.certificate.reuse_detected` in the
//! same transaction. So however many gateways and replicas see uses of one
//! certificate, the window gets one event.
//!
//! An entry is acknowledged (`XACK`) only after the store answered; a store
//! or Redis failure leaves it pending and the replica re-reads its own
//! pending entries first after a backoff. Entries another replica left
//! pending (it died) are claimed after [`CLAIM_IDLE`] (`XAUTOCLAIM`). An
//! entry that does not parse is counted and acknowledged (it would never
//! parse). In the one-process dev stack the reports come from the
//! in-process bus instead, with the same processing.

use std::time::Duration;

use oneprotect_identity::events::AgentOperation;
use oneprotect_identity::SupersededUse;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::projection::{Projection, ProjectionConn, ProjectionError};
use crate::store::{AnyStore, ReuseOutcome, Store, SupersededUseRecord};

/// The consumer group every replica reads in.
pub const GROUP: &str = "enroll-api";
/// Entries read per call.
const BATCH: usize = 100;
/// How long one read blocks for new entries.
const BLOCK: Duration = Duration::from_millis(1000);
/// Another replica's pending entry is claimed after this idle time.
pub const CLAIM_IDLE: Duration = Duration::from_secs(60);
/// How often a replica looks for such entries.
const CLAIM_EVERY: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The consumer's settings and parts.
#[derive(Clone)]
pub struct Consumer {
    /// The store that records the reports.
    pub store: AnyStore,
    /// Where the stream (or the bus) is.
    pub projection: Projection,
    /// The service clock (for the window of a report without a time).
    pub clock: SharedClock,
    /// The service metrics.
    pub metrics: Metrics,
    /// The attempt window.
    pub window: Duration,
    /// This replica's consumer name in the group.
    pub name: String,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// One report as read: its stream id (none on the bus) and its data.
struct Entry {
    id: Option<String>,
    report: Option<SupersededUse>,
}

fn parse(data: Option<&str>) -> Option<SupersededUse> {
    serde_json::from_str(data?).ok()
}

fn entry_of(s: &StreamId) -> Entry {
    let data: Option<String> = s.get("data");
    Entry {
        id: Some(s.id.clone()),
        report: parse(data.as_deref()),
    }
}

impl Consumer {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut conn: Option<ProjectionConn> = None;
        let mut backoff = MIN_BACKOFF;
        // After a start or a failure, this replica's own pending entries
        // come first.
        let mut pending_first = true;
        let mut last_claim = tokio::time::Instant::now();
        loop {
            if *stop.borrow() {
                if let Some(c) = conn.as_mut() {
                    self.leave(c).await;
                }
                return;
            }
            let pass = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        let mut c = self.projection.connect().await?;
                        self.join(&mut c).await?;
                        conn.insert(c)
                    }
                };
                let claim = last_claim.elapsed() >= CLAIM_EVERY;
                let entries = self.read(c, pending_first, claim).await?;
                if claim {
                    last_claim = tokio::time::Instant::now();
                }
                let n = entries.len();
                for e in entries {
                    self.handle(c, e).await?;
                }
                Ok::<usize, ProjectionError>(n)
            };
            let mut full_batch = false;
            let wait = match pass.await {
                Ok(n) => {
                    backoff = MIN_BACKOFF;
                    // Own pending entries are read until none are left.
                    pending_first = pending_first && n > 0;
                    full_batch = n >= BATCH;
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "superseded-certificate reports: will retry");
                    conn = None;
                    pending_first = true;
                    let w = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Some(w)
                }
            };
            let bus = conn.as_ref().and_then(ProjectionConn::bus).cloned();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                () = async {
                    match (wait, &bus) {
                        (Some(w), _) => tokio::time::sleep(w).await,
                        // The bus: wait for a report (or poll now and then),
                        // unless a full batch says more are queued.
                        (None, Some(bus)) if !full_batch => {
                            let _ = tokio::time::timeout(BLOCK, bus.report_queued()).await;
                        }
                        // Redis: the read itself blocked; the bus: more queued.
                        (None, _) => {}
                    }
                } => {}
            }
        }
    }

    /// Creates the group (once per stream) on Redis.
    async fn join(&self, c: &mut ProjectionConn) -> Result<(), ProjectionError> {
        let stream = self.projection.keys().reports_stream();
        let Some(r) = c.redis() else { return Ok(()) };
        let created: Result<String, redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(r)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes this replica from the group on a clean stop (its pending
    /// entries, if any, are then claimed by the others).
    async fn leave(&self, c: &mut ProjectionConn) {
        let stream = self.projection.keys().reports_stream();
        if let Some(r) = c.redis() {
            let _: Result<i64, _> = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.name)
                .query_async(r)
                .await;
        }
    }

    async fn read(
        &self,
        c: &mut ProjectionConn,
        pending_first: bool,
        claim: bool,
    ) -> Result<Vec<Entry>, ProjectionError> {
        if let Some(bus) = c.bus() {
            return Ok(bus
                .take_reports(BATCH)
                .iter()
                .map(|json| Entry {
                    id: None,
                    report: parse(Some(json)),
                })
                .collect());
        }
        let stream = self.projection.keys().reports_stream();
        let Some(r) = c.redis() else {
            return Ok(Vec::new());
        };
        if claim {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.name)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(r)
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(
                    entries = reply.claimed.len(),
                    "claimed reports another replica left pending"
                );
                return Ok(reply.claimed.iter().map(entry_of).collect());
            }
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(BATCH);
        if !pending_first {
            cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(&stream)
            .arg(if pending_first { "0" } else { ">" });
        let reply: Option<StreamReadReply> = cmd.query_async(r).await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|s| entry_of(&s))
            .collect())
    }

    /// Records one report, then acknowledges it.
    async fn handle(&self, c: &mut ProjectionConn, e: Entry) -> Result<(), ProjectionError> {
        match e.report {
            None => self.metrics.reuse_report("invalid", 1),
            Some(report) => {
                let uses = u64::from(report.uses.max(1));
                self.metrics.superseded_use(AgentOperation::Request, uses);
                let seen_at = OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(report.first_seen_ms) * 1_000_000,
                )
                .unwrap_or_else(|_| self.clock.now());
                let record = SupersededUseRecord {
                    tenant: report.tenant_id,
                    agent: report.agent_id,
                    serial: report.serial,
                    operation: AgentOperation::Request,
                    route: Some(report.route.clone()),
                    source_ip: report.source_ip,
                    seen_at,
                };
                let outcome = self
                    .store
                    .record_superseded_use(&record, self.window)
                    .await?;
                match outcome {
                    ReuseOutcome::Recorded => {
                        tracing::warn!(
                            tenant = %report.tenant_id, agent = %report.agent_id,
                            serial = %report.serial, route = %report.route, uses = report.uses,
                            "superseded certificate presented through a gateway: possible key theft"
                        );
                        self.metrics.reuse_report("recorded", uses);
                    }
                    ReuseOutcome::Duplicate => self.metrics.reuse_report("duplicate", uses),
                    ReuseOutcome::NotSuperseded => {
                        self.metrics.reuse_report("not_superseded", uses)
                    }
                }
            }
        }
        if let (Some(id), Some(r)) = (e.id, c.redis()) {
            let stream = self.projection.keys().reports_stream();
            let _: i64 = redis::cmd("XACK")
                .arg(&stream)
                .arg(GROUP)
                .arg(&id)
                .query_async(r)
                .await?;
        }
        Ok(())
    }
}
