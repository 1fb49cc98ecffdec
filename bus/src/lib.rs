//! The in-process revocation bus: what the Redis revocation projection does,
//! in memory, for the one-process dev stack (`oneprotect-dev up`).
//!
//! Production runs the enroll-api and the gateways as separate processes
//! that meet in Redis (see `oneprotect_identity::revocation` for the key
//! schema and ADR-0004). When all of them run in one process, a
//! [`MemoryBus`] takes Redis' place with the same semantics, so the gateway's
//! fail-closed rules and the enroll-api's relay run unchanged on top of it:
//!
//! - status keys named by [`KeySchema`](oneprotect_identity::KeySchema), whose
//!   values only move **forward** (certificate: active → superseded →
//!   revoked; agent: active → revoked), exactly as the Lua script does;
//! - an optional **expiry** per key (a certificate's NotAfter, unix seconds):
//!   an expired key reads as missing, i.e. *unknown*;
//! - one **monotonically increasing sequence** numbering announcements, read
//!   atomically with a subscription ([`MemoryBus::subscribe`]) so a
//!   subscriber knows which announcements its reads already reflect;
//! - **announcements** to every subscriber in the same JSON as the Redis
//!   channel carries ([`Announcement`]), including `resync` after a rebuild;
//! - a `built_at` marker, so the relay rebuilds the projection from the
//!   store on first start, as it does for a new or flushed Redis.
//!
//! A subscriber that falls more than [`CHANNEL_CAPACITY`] announcements
//! behind is told it lagged (tokio `broadcast`), which the gateway treats as
//! a sequence gap: it distrusts its whole cache. Nothing here can fail or
//! disconnect: the bus lives exactly as long as the process.
//!
//! ```
//! use oneprotect_identity::revocation::Change;
//! use oneprotect_identity::{AgentId, AgentStatus, KeySchema, TenantId};
//! use oneprotect_revocation_bus::MemoryBus;
//!
//! let bus = MemoryBus::new();
//! let keys = KeySchema::default();
//! let (t, a) = (TenantId::random(), AgentId::random());
//! let key = keys.agent_status(&t, &a);
//! let (mut rx, baseline) = bus.subscribe();
//! assert_eq!(baseline, None);
//! let change = Change::Agent { tenant_id: t, agent_id: a, status: AgentStatus::Revoked };
//! assert_eq!(bus.set_status(&key, "revoked", None, &change, true), Some(1));
//! // Forward only: a late `active` does not resurrect the agent.
//! let change = Change::Agent { tenant_id: t, agent_id: a, status: AgentStatus::Active };
//! assert_eq!(bus.set_status(&key, "active", None, &change, true), None);
//! assert_eq!(bus.get(&[key.as_str()]), vec![Some("revoked".to_owned())]);
//! assert!(rx.try_recv().is_ok());
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use oneprotect_identity::revocation::Change;
use oneprotect_identity::Announcement;
use tokio::sync::broadcast;

/// Announcements buffered per subscriber before it is told it lagged.
pub const CHANNEL_CAPACITY: usize = 4096;
/// Gateway reports queued for the enroll-api before new ones are refused
/// (the `{prefix}reports` stream's stand-in).
pub const REPORTS_QUEUED: usize = 10_000;
/// Lifecycle events kept for inspection ([`MemoryBus::recent_events`]).
pub const EVENTS_KEPT: usize = 1000;
/// Expired keys are swept after this many writes.
const SWEEP_EVERY: u64 = 1024;

/// Unix seconds now.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// One announcement as published: the JSON of an [`Announcement`], the same
/// bytes the Redis channel carries.
pub type AnnouncementJson = Arc<str>;

/// A subscription to the announcements.
pub type Subscription = broadcast::Receiver<AnnouncementJson>;

/// One lifecycle event as appended to the bus' bounded event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// The event id.
    pub event_id: String,
    /// The event type, e.g. `agent.revoked.v1`.
    pub event_type: String,
    /// The event as JSON.
    pub data: String,
}

#[derive(Debug)]
struct Entry {
    value: String,
    /// Unix seconds at which the key disappears.
    expires_at: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Entry>,
    seq: u64,
    built_at: Option<i64>,
    writes: u64,
    events: VecDeque<LoggedEvent>,
    events_total: u64,
    reports: VecDeque<Arc<str>>,
    /// The live-gateway hash (`{prefix}gateways`): gateway id → presence JSON.
    gateways: HashMap<String, Arc<str>>,
}

struct Inner {
    state: Mutex<State>,
    tx: broadcast::Sender<AnnouncementJson>,
    clock: Clock,
    /// Woken when a report is queued.
    report_queued: tokio::sync::Notify,
    /// Woken (every waiter) when a gateway's presence changes.
    gateways_changed: tokio::sync::Notify,
}

/// The in-memory revocation bus. Cheap to clone: clones share one bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryBus")
            .field("keys", &s.keys.len())
            .field("seq", &s.seq)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

/// The rank of a status: statuses only move to a higher rank (as the Redis
/// script's table: active 1, superseded 2, revoked 3).
fn rank(status: &str) -> Option<u8> {
    match status {
        "active" => Some(1),
        "superseded" => Some(2),
        "revoked" => Some(3),
        _ => None,
    }
}

fn system_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl MemoryBus {
    /// An empty bus on the system clock (expiry in unix seconds, as Redis'
    /// `EXAT`).
    pub fn new() -> Self {
        Self::with_clock(Arc::new(system_now))
    }

    /// An empty bus whose expiry runs on `clock` (tests).
    pub fn with_clock(clock: Clock) -> Self {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                tx,
                clock,
                report_queued: tokio::sync::Notify::new(),
                gateways_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one ever did, the
        // state is still a consistent map (every write is one insert).
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, s: &mut State, change: &Change) -> u64 {
        s.seq += 1;
        let a = Announcement {
            seq: s.seq,
            change: change.clone(),
        };
        // An Announcement always serialises (plain enums, strings, numbers).
        let json = serde_json::to_string(&a).expect("an announcement serialises");
        // No subscriber is not an error (as PUBLISH to nobody).
        let _ = self.inner.tx.send(json.into());
        s.seq
    }

    /// Writes `status` at `key` unless a later status is already there, with
    /// an optional expiry (unix seconds; none clears an earlier one), and,
    /// with `announce`, numbers and publishes `change`. Returns `None` when
    /// nothing was written (a later status is there), `Some(0)` when written
    /// without announcing, else `Some(seq)` of the announcement — the Redis
    /// script's -1 / 0 / seq.
    ///
    /// The write, the number and the publication happen under one lock, so
    /// a subscriber never sees an announcement for a write that did not
    /// happen, nor a number without its announcement.
    pub fn set_status(
        &self,
        key: &str,
        status: &str,
        expires_at: Option<i64>,
        change: &Change,
        announce: bool,
    ) -> Option<u64> {
        let now = (self.inner.clock)();
        let mut s = self.lock();
        let current = s
            .keys
            .get(key)
            .filter(|e| e.expires_at.is_none_or(|t| t > now))
            .and_then(|e| rank(&e.value));
        if let (Some(cur), Some(new)) = (current, rank(status)) {
            if cur > new {
                return None;
            }
        }
        s.keys.insert(
            key.to_owned(),
            Entry {
                value: status.to_owned(),
                expires_at,
            },
        );
        s.writes += 1;
        if s.writes.is_multiple_of(SWEEP_EVERY) {
            s.keys.retain(|_, e| e.expires_at.is_none_or(|t| t > now));
        }
        if !announce {
            return Some(0);
        }
        Some(self.publish(&mut s, change))
    }

    /// Numbers and publishes `change` without writing a key (the `resync`
    /// after a rebuild). Returns its sequence number.
    pub fn announce(&self, change: &Change) -> u64 {
        let mut s = self.lock();
        self.publish(&mut s, change)
    }

    /// The values at `keys` (as `MGET`): `None` for a missing or expired key.
    pub fn get(&self, keys: &[&str]) -> Vec<Option<String>> {
        let now = (self.inner.clock)();
        let s = self.lock();
        keys.iter()
            .map(|k| {
                s.keys
                    .get(*k)
                    .filter(|e| e.expires_at.is_none_or(|t| t > now))
                    .map(|e| e.value.clone())
            })
            .collect()
    }

    /// The last sequence number used; `None` before the first announcement
    /// (as `GET` of a missing counter).
    pub fn seq(&self) -> Option<u64> {
        Some(self.lock().seq).filter(|&n| n > 0)
    }

    /// Subscribes to announcements. Returns the subscription and the
    /// sequence number up to which announcements are already reflected in
    /// what [`get`](Self::get) returns (taken atomically with subscribing:
    /// every later announcement arrives on the subscription).
    pub fn subscribe(&self) -> (Subscription, Option<u64>) {
        let s = self.lock();
        let rx = self.inner.tx.subscribe();
        (rx, Some(s.seq).filter(|&n| n > 0))
    }

    /// Records that the projection was fully built at `unix_secs`.
    pub fn mark_built(&self, unix_secs: i64) {
        self.lock().built_at = Some(unix_secs);
    }

    /// When the projection was built (unix seconds); `None` on a new bus.
    pub fn built_at(&self) -> Option<i64> {
        self.lock().built_at
    }

    /// Whether the projection has been built (a new bus has not).
    pub fn is_built(&self) -> bool {
        self.lock().built_at.is_some()
    }

    /// Appends a lifecycle event to the bounded log (the Redis stream's
    /// stand-in; the oldest are dropped beyond [`EVENTS_KEPT`]).
    pub fn append_event(&self, event: LoggedEvent) {
        let mut s = self.lock();
        if s.events.len() == EVENTS_KEPT {
            s.events.pop_front();
        }
        s.events.push_back(event);
        s.events_total += 1;
    }

    /// The most recent lifecycle events, oldest first, and how many were
    /// ever appended.
    pub fn recent_events(&self) -> (Vec<LoggedEvent>, u64) {
        let s = self.lock();
        (s.events.iter().cloned().collect(), s.events_total)
    }

    /// Queues a gateway's report (the JSON of a
    /// [`SupersededUse`](oneprotect_identity::SupersededUse)) for the
    /// enroll-api; false when [`REPORTS_QUEUED`] are waiting already.
    pub fn push_report(&self, json: Arc<str>) -> bool {
        {
            let mut s = self.lock();
            if s.reports.len() >= REPORTS_QUEUED {
                return false;
            }
            s.reports.push_back(json);
        }
        self.inner.report_queued.notify_one();
        true
    }

    /// Takes up to `max` queued reports, oldest first.
    pub fn take_reports(&self, max: usize) -> Vec<Arc<str>> {
        let mut s = self.lock();
        let n = max.min(s.reports.len());
        s.reports.drain(..n).collect()
    }

    /// Resolves when a report was queued since the last wake-up (one
    /// consumer).
    pub async fn report_queued(&self) {
        self.inner.report_queued.notified().await;
    }

    /// Records a gateway's presence (`HSET {prefix}gateways <id> <json>`)
    /// and wakes everyone waiting in [`MemoryBus::gateways_changed`].
    pub fn put_gateway(&self, id: &str, json: Arc<str>) {
        self.lock().gateways.insert(id.to_owned(), json);
        self.inner.gateways_changed.notify_waiters();
    }

    /// Removes a gateway's presence (`HDEL`), e.g. on a clean shutdown.
    pub fn remove_gateway(&self, id: &str) {
        self.lock().gateways.remove(id);
        self.inner.gateways_changed.notify_waiters();
    }

    /// Every gateway presence recorded (`HGETALL`), as id and JSON.
    pub fn gateways(&self) -> Vec<(String, Arc<str>)> {
        self.lock()
            .gateways
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Resolves at the next presence change. Create the future (and
    /// `enable` it) before reading [`MemoryBus::gateways`] so a change in
    /// between is not missed.
    pub fn gateways_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.gateways_changed.notified()
    }

    /// Drops every key and the built marker, keeping the sequence (as a
    /// Redis `FLUSHDB` would not: there the counter restarts; here keeping
    /// it lets tests check that a rebuild is announced with a fresh number).
    pub fn clear(&self) {
        let mut s = self.lock();
        s.keys.clear();
        s.built_at = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use oneprotect_identity::{AgentId, AgentStatus, CertStatus, KeySchema, TenantId};

    use super::*;

    fn cert_change(status: CertStatus) -> Change {
        Change::Cert {
            serial: "0a".parse().unwrap(),
            status,
        }
    }

    #[test]
    fn statuses_only_move_forward() {
        let bus = MemoryBus::new();
        let k = "p:cert:0a";
        let c = cert_change(CertStatus::Active);
        assert_eq!(bus.set_status(k, "active", None, &c, true), Some(1));
        assert_eq!(bus.set_status(k, "superseded", None, &c, true), Some(2));
        assert_eq!(bus.set_status(k, "active", None, &c, true), None);
        assert_eq!(bus.set_status(k, "revoked", None, &c, true), Some(3));
        assert_eq!(bus.set_status(k, "superseded", None, &c, true), None);
        // Same status again is written (idempotent replay) and announced.
        assert_eq!(bus.set_status(k, "revoked", None, &c, true), Some(4));
        assert_eq!(bus.set_status(k, "revoked", None, &c, false), Some(0));
        assert_eq!(bus.get(&[k]), vec![Some("revoked".into())]);
        assert_eq!(bus.seq(), Some(4));
    }

    #[tokio::test]
    async fn gateway_presence_is_kept_and_wakes_waiters() {
        let bus = MemoryBus::new();
        assert!(bus.gateways().is_empty());
        let changed = bus.gateways_changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        bus.put_gateway("g1", "{\"applied\":1}".into());
        // Woken by the write made after the future was enabled.
        tokio::time::timeout(std::time::Duration::from_secs(5), changed)
            .await
            .expect("woken");
        bus.put_gateway("g1", "{\"applied\":2}".into());
        assert_eq!(
            bus.gateways(),
            vec![("g1".to_owned(), "{\"applied\":2}".into())]
        );
        bus.remove_gateway("g1");
        assert!(bus.gateways().is_empty());
    }

    #[test]
    fn keys_expire_and_expired_keys_are_unknown() {
        let now = Arc::new(AtomicI64::new(1_000));
        let n = now.clone();
        let bus = MemoryBus::with_clock(Arc::new(move || n.load(Ordering::SeqCst)));
        let c = cert_change(CertStatus::Revoked);
        bus.set_status("k", "revoked", Some(1_010), &c, false);
        assert_eq!(bus.get(&["k", "other"]), vec![Some("revoked".into()), None]);
        now.store(1_010, Ordering::SeqCst);
        assert_eq!(bus.get(&["k"]), vec![None]);
        // An expired revoked key no longer holds back a new write.
        assert_eq!(bus.set_status("k", "active", None, &c, false), Some(0));
        assert_eq!(bus.get(&["k"]), vec![Some("active".into())]);
    }

    #[tokio::test]
    async fn subscribers_get_numbered_announcements_after_their_baseline() {
        let bus = MemoryBus::new();
        let keys = KeySchema::new("t:");
        let (t, a) = (TenantId::random(), AgentId::random());
        let change = Change::Agent {
            tenant_id: t,
            agent_id: a,
            status: AgentStatus::Active,
        };
        bus.set_status(&keys.agent_status(&t, &a), "active", None, &change, true);
        let (mut rx, baseline) = bus.subscribe();
        assert_eq!(baseline, Some(1));
        let revoked = Change::Agent {
            tenant_id: t,
            agent_id: a,
            status: AgentStatus::Revoked,
        };
        bus.set_status(&keys.agent_status(&t, &a), "revoked", None, &revoked, true);
        assert_eq!(bus.announce(&Change::Resync), 3);
        let first: Announcement = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(first.seq, 2);
        assert_eq!(first.change, revoked);
        let second: Announcement = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!((second.seq, second.change), (3, Change::Resync));
    }

    #[test]
    fn a_slow_subscriber_is_told_it_lagged() {
        let bus = MemoryBus::new();
        let (mut rx, _) = bus.subscribe();
        for _ in 0..=CHANNEL_CAPACITY {
            bus.announce(&Change::Resync);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    #[test]
    fn built_marker_and_event_log() {
        let bus = MemoryBus::new();
        assert!(!bus.is_built());
        bus.mark_built(5);
        assert!(bus.is_built());
        for i in 0..(EVENTS_KEPT + 5) {
            bus.append_event(LoggedEvent {
                event_id: i.to_string(),
                event_type: "agent.enrolled.v1".into(),
                data: "{}".into(),
            });
        }
        let (events, total) = bus.recent_events();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0].event_id, "5");
        assert_eq!(total, (EVENTS_KEPT + 5) as u64);
        bus.clear();
        assert!(!bus.is_built());
    }
}
