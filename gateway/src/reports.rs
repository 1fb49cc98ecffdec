//! Reports of superseded certificates the gateway refused (issue 15,
//! item 13).
//!
//! A superseded certificate presented after its rotation completed may mean
//! its key is in someone else's hands. The gateway refuses it (403
//! `certificate_superseded`) before any upstream sees it, so the enroll-api
//! would never learn of the attempt; instead the gateway reports it:
//!
//! 1. on the request path, [`Reporter::report`] only `try_send`s a
//!    [`SupersededUse`] into a bounded channel ([`QUEUE`]): no I/O, no
//!    await; a full channel drops the report and counts it;
//! 2. a background service ([`ReportSender`]) takes what is queued, folds
//!    the reports of one certificate into one (`uses` adds up), and appends
//!    each to the `{prefix}reports` Redis Stream (`XADD … MAXLEN ~`), or to
//!    the in-process bus in the dev stack. When Redis does not answer, it
//!    keeps what it holds (at most [`HELD`] certificates) and retries with
//!    a backoff;
//! 3. the enroll-api consumes the stream with a consumer group and records
//!    `agent.certificate.reuse_detected` once per certificate and attempt
//!    window (its store de-duplicates, in the transaction that writes the
//!    event).
//!
//! Every refusal of a superseded certificate is reported (each closes its
//! HTTP/1.1 connection, so at least the first use per connection); the
//! counters are `superseded_reports_total{outcome="queued"|"sent"|"dropped"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use oneprotect_identity::{KeySchema, SerialNumber, SupersededUse};
use oneprotect_redis::{OpenError, RedisClient, RedisConnection};
use oneprotect_revocation_bus::MemoryBus;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::conn::ConnIdentity;
use crate::metrics::Metrics;

/// Reports queued between the request path and the sender.
pub const QUEUE: usize = 4096;
/// Certificates the sender holds while Redis does not answer; reports of
/// further ones are dropped (and counted) until it answers again.
pub const HELD: usize = 10_000;
/// The stream is trimmed to about this many entries (`MAXLEN ~`).
pub const STREAM_MAXLEN: u64 = 100_000;
/// The stream entry's `type` field.
pub const ENTRY_TYPE: &str = "certificate.superseded_use";
/// First retry delay after a failed append; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Redis connect and response timeout.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The request path's end: queues a report without waiting.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<SupersededUse>,
    metrics: Metrics,
}

impl Reporter {
    /// Reports one refused use of the connection's (superseded) certificate
    /// on `route`, from `source`.
    pub fn report(&self, conn: &ConnIdentity, route: &str, source: Option<IpAddr>) {
        let id = conn.identity();
        let report = SupersededUse {
            tenant_id: id.tenant(),
            agent_id: id.agent(),
            serial: id.serial(),
            first_seen_ms: oneprotect_identity::revocation::unix_ms_now(),
            uses: 1,
            route: route.to_owned(),
            source_ip: source,
        };
        let outcome = match self.tx.try_send(report) {
            Ok(()) => "queued",
            Err(_) => "dropped",
        };
        self.metrics
            .superseded_reports
            .with_label_values(&[outcome])
            .inc();
    }
}

/// Where the reports go.
enum Sink {
    Redis(RedisClient),
    Memory(MemoryBus),
}

/// The background service that appends the queued reports.
pub struct ReportSender {
    rx: Mutex<Option<mpsc::Receiver<SupersededUse>>>,
    sink: Sink,
    keys: KeySchema,
    metrics: Metrics,
}

/// A reporter and its sender, on Redis at `redis_url` (connects lazily).
pub fn on_redis(
    redis_url: &str,
    keys: KeySchema,
    metrics: Metrics,
) -> Result<(Reporter, ReportSender), OpenError> {
    let client = RedisClient::open(redis_url, REDIS_TIMEOUT)?;
    Ok(pair(Sink::Redis(client), keys, metrics))
}

/// A reporter and its sender on the in-process bus (the dev stack).
pub fn on_memory_bus(
    bus: MemoryBus,
    keys: KeySchema,
    metrics: Metrics,
) -> (Reporter, ReportSender) {
    pair(Sink::Memory(bus), keys, metrics)
}

fn pair(sink: Sink, keys: KeySchema, metrics: Metrics) -> (Reporter, ReportSender) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (
        Reporter {
            tx,
            metrics: metrics.clone(),
        },
        ReportSender {
            rx: Mutex::new(Some(rx)),
            sink,
            keys,
            metrics,
        },
    )
}

/// Folds `report` into `held` (one entry per certificate: the first use's
/// time, route and source, the uses added up). False when it is a new
/// certificate and `held` is full.
pub fn fold(held: &mut HashMap<SerialNumber, SupersededUse>, report: SupersededUse) -> bool {
    if let Some(h) = held.get_mut(&report.serial) {
        h.uses = h.uses.saturating_add(report.uses);
        if report.first_seen_ms < h.first_seen_ms {
            h.first_seen_ms = report.first_seen_ms;
            h.route = report.route;
            h.source_ip = report.source_ip;
        }
        return true;
    }
    if held.len() >= HELD {
        return false;
    }
    held.insert(report.serial, report);
    true
}

impl ReportSender {
    fn count(&self, outcome: &str, n: usize) {
        self.metrics
            .superseded_reports
            .with_label_values(&[outcome])
            .inc_by(n as u64);
    }

    /// Appends every held report; those appended leave `held`. Stops at the
    /// first failure (the connection is then dropped).
    async fn flush(
        &self,
        conn: &mut Option<RedisConnection>,
        held: &mut HashMap<SerialNumber, SupersededUse>,
    ) -> Result<(), redis::RedisError> {
        let serials: Vec<SerialNumber> = held.keys().copied().collect();
        for serial in serials {
            let Some(report) = held.get(&serial) else {
                continue;
            };
            let data = serde_json::to_string(report).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Client, "report JSON", e.to_string()))
            })?;
            let uses = report.uses as usize;
            match &self.sink {
                Sink::Memory(bus) => {
                    if !bus.push_report(data.into()) {
                        self.count("dropped", uses);
                        held.remove(&serial);
                        continue;
                    }
                }
                Sink::Redis(client) => {
                    let c = match conn {
                        Some(c) => c,
                        None => conn.insert(client.connect().await?),
                    };
                    let appended = redis::cmd("XADD")
                        .arg(self.keys.reports_stream())
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_MAXLEN)
                        .arg("*")
                        .arg("type")
                        .arg(ENTRY_TYPE)
                        .arg("data")
                        .arg(data)
                        .query_async::<String>(c)
                        .await;
                    if let Err(e) = appended {
                        *conn = None;
                        return Err(e);
                    }
                }
            }
            self.count("sent", uses);
            held.remove(&serial);
        }
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for ReportSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let mut held: HashMap<SerialNumber, SupersededUse> = HashMap::new();
        let mut conn: Option<RedisConnection> = None;
        let mut backoff = MIN_BACKOFF;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let deadline = retry_at;
            let retry = async move {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = rx.recv() => {
                    let Some(first) = got else { return };
                    let mut dropped = 0;
                    for report in std::iter::once(first)
                        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                        .take(QUEUE)
                    {
                        let uses = report.uses as usize;
                        if !fold(&mut held, report) {
                            dropped += uses;
                        }
                    }
                    if dropped > 0 {
                        self.count("dropped", dropped);
                    }
                    if retry_at.is_some() {
                        // Waiting out a backoff: keep folding.
                        continue;
                    }
                }
                () = retry => retry_at = None,
                _ = shutdown.changed() => return,
            }
            match self.flush(&mut conn, &mut held).await {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        held = held.len(),
                        retry_in = ?backoff,
                        "superseded-certificate reports: Redis append failed; will retry"
                    );
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::{AgentId, TenantId};

    fn random_serial() -> SerialNumber {
        let n = (uuid::Uuid::new_v4().as_u128() >> 2) | 1;
        SerialNumber::from_bytes(n.to_be_bytes()).unwrap()
    }

    fn report(serial: SerialNumber, at: i64, route: &str) -> SupersededUse {
        SupersededUse {
            tenant_id: TenantId::random(),
            agent_id: AgentId::random(),
            serial,
            first_seen_ms: at,
            uses: 1,
            route: route.into(),
            source_ip: None,
        }
    }

    #[test]
    fn reports_of_one_certificate_fold_into_one_with_the_first_use() {
        let (a, b) = (random_serial(), random_serial());
        let mut held = HashMap::new();
        assert!(fold(&mut held, report(a, 20, "/late")));
        assert!(fold(&mut held, report(a, 10, "/early")));
        assert!(fold(&mut held, report(b, 30, "/b")));
        assert!(fold(&mut held, report(a, 40, "/later")));
        assert_eq!(held.len(), 2);
        let r = &held[&a];
        assert_eq!(
            (r.uses, r.first_seen_ms, r.route.as_str()),
            (3, 10, "/early")
        );
        assert_eq!(held[&b].uses, 1);
    }

    #[test]
    fn a_full_hold_refuses_new_certificates_but_still_counts_known_ones() {
        let mut held = HashMap::new();
        for i in 0..HELD {
            assert!(fold(&mut held, report(random_serial(), i as i64, "/")));
        }
        assert!(!fold(&mut held, report(random_serial(), 0, "/")));
        let known = *held.keys().next().unwrap();
        assert!(fold(&mut held, report(known, 0, "/")));
        assert_eq!(held.len(), HELD);
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_waiting_and_counts() {
        let metrics = Metrics::new();
        let (reporter, sender) =
            on_memory_bus(MemoryBus::new(), KeySchema::new("t:"), metrics.clone());
        let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
        let id = std::sync::Arc::new(
            oneprotect_identity::AgentIdentity::from_chain(&leaf.cert_der, &ca.cert_der).unwrap(),
        );
        let (signer, _) = oneprotect_identity::AssertionSigner::generate("k").unwrap();
        let ctx = crate::conn::IdentityContext {
            keys: KeySchema::new("t:"),
            assertions: std::sync::Arc::new(crate::assertion::AssertionService::new(
                signer,
                &crate::config::AssertionConfig::default(),
            )),
            xfcc_by: None,
        };
        let conn = ConnIdentity::new(id, &ctx);
        for _ in 0..QUEUE + 3 {
            reporter.report(&conn, "/api", None);
        }
        let count = |o: &str| metrics.superseded_reports.with_label_values(&[o]).get();
        assert_eq!((count("queued"), count("dropped")), (QUEUE as u64, 3));
        drop(sender);
    }
}
