//! The per-request revocation check: a moka cache in front of the Redis
//! projection, kept current by the revocation pub/sub channel.
//!
//! # Rules (fail closed)
//!
//! - A request is allowed only when both the certificate (by serial) and the
//!   agent are known `active`.
//! - A cached `revoked`/`superseded` answer refuses at once (403), however
//!   old: those states are terminal.
//! - A cached `active` answer is trusted only while Redis is *confirmed*:
//!   the subscription is up and answered a PING within `max_staleness`
//!   (default 5 s), and the entry was filled in the current cache epoch.
//! - Otherwise one `MGET` of the two status keys decides (and refills the
//!   cache). If Redis does not answer: 503 `revocation_unavailable` with
//!   `Retry-After`.
//! - A missing key means *unknown*, not active: 503
//!   `revocation_unavailable` (retryable — the projection may be being
//!   rebuilt after a Redis flush), never allowed, never cached.
//! - A gap in the announcement sequence, an unparsable announcement, a
//!   `resync` or a reconnect of the subscription starts a new cache epoch:
//!   every cached `active` answer must be confirmed again.
//! - A lookup racing an announcement never overwrites the announced state:
//!   the cache is filled only when no change arrived during the lookup.
//!
//! # Sources
//!
//! The production source is Redis ([`Revocation::new`]): one node, a
//! Sentinel-managed master or a Cluster, as `revocation.redis_url` says
//! ([`oneprotect_redis`]). With Sentinel, every (re)connect asks the
//! Sentinels for the master, so a failover is followed on the next
//! reconnect. With an unsharded Cluster, lookups go through a cluster
//! connection (every key is in the prefix's hash-tag slot) and the
//! subscription sits on one node — a cluster broadcasts `PUBLISH` to every
//! node — moving to the next seed node when it fails; that reconnect
//! distrusts the cache like any other.
//!
//! With a sharded projection (`shards > 1`, ADR-0024) the lookup's `MGET`
//! goes to the tenant's shard (both keys share its tag), and the subscriber
//! `SSUBSCRIBE`s to every shard's channel on one RESP3 cluster connection
//! (each channel on the node owning its slot). Each shard has its own
//! sequence: a gap, a lag seen on two heartbeats, or an unparsable message
//! on any shard distrusts the cache (all of it: simple, and fail-closed).
//! The heartbeat reads every shard's counter through that connection, which
//! confirms the link to every shard's node; a node's connection closing,
//! or the server moving a channel (`sunsubscribe`, a failover or slot
//! migration), ends the subscription: the gateway subscribes again from
//! scratch (fresh slot map) and distrusts the cache. The presence reports
//! each shard's cursor (`applied_by_shard`). The one-process
//! dev stack reads an in-process [`MemoryBus`] instead
//! ([`Revocation::with_memory_bus`]): the same keys, announcements and
//! sequence, so every rule above applies unchanged. A subscriber that lags
//! behind the bus is treated as a sequence gap; the bus being dropped is
//! treated as a lost subscription (answers go stale, then fail closed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use oneprotect_identity::problem::{self, ProblemKind};
use oneprotect_identity::revocation::Change;
use oneprotect_identity::{
    AgentId, AgentStatus, Announcement, CertStatus, GatewayPresence, KeySchema, SerialNumber,
    TenantId,
};
use oneprotect_redis::{OpenError, RedisClient, RedisConnection};
use oneprotect_revocation_bus::MemoryBus;
use tokio::sync::broadcast::error::RecvError;

use crate::config::{redact_url, RevocationConfig};
use crate::conn::ConnIdentity;
use crate::metrics::Metrics;

/// The host name (the kernel's), or `gateway` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "gateway".to_owned())
}

/// The outcome of the check for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Certificate and agent confirmed active.
    Allow,
    /// Refused for good: revoked or superseded (403).
    Refuse(ProblemKind),
    /// Cannot be confirmed now (Redis unreachable or stale, or status
    /// unknown): 503 `revocation_unavailable`.
    Unavailable,
}

#[derive(Debug, Clone, Copy)]
struct Cached<T> {
    status: T,
    epoch: u64,
}

/// Decides from the two statuses (`None` = key missing).
pub fn decide(cert: Option<CertStatus>, agent: Option<AgentStatus>) -> Decision {
    match (cert, agent) {
        (_, Some(AgentStatus::Revoked)) => Decision::Refuse(problem::AGENT_REVOKED),
        (Some(CertStatus::Revoked), _) => Decision::Refuse(problem::CERTIFICATE_REVOKED),
        (Some(CertStatus::Superseded), _) => Decision::Refuse(problem::CERTIFICATE_SUPERSEDED),
        (Some(CertStatus::Active), Some(AgentStatus::Active)) => Decision::Allow,
        _ => Decision::Unavailable,
    }
}

/// Where the revocation state is read from.
enum Source {
    /// The Redis projection (production).
    Redis(RedisClient),
    /// An in-process bus (the one-process dev stack).
    Memory(MemoryBus),
}

/// The revocation checker shared by every request and the subscriber.
pub struct Revocation {
    cfg: RevocationConfig,
    keys: KeySchema,
    source: Source,
    conn: ArcSwapOption<RedisConnection>,
    certs: moka::sync::Cache<SerialNumber, Cached<CertStatus>>,
    agents: moka::sync::Cache<(TenantId, AgentId), Cached<AgentStatus>>,
    /// Bumped when the whole cache is distrusted.
    epoch: AtomicU64,
    /// Bumped on every applied change (guards lookups racing announcements).
    generation: AtomicU64,
    start: Instant,
    /// Milliseconds since `start` when Redis was last confirmed; 0 = never.
    last_ok_ms: AtomicU64,
    /// The subscriber could not connect: skip lookups while stale.
    redis_down: AtomicBool,
    /// Woken when a certificate or agent turns revoked or superseded (the
    /// tunnels re-check at once).
    refused: tokio::sync::Notify,
    /// The last announcement sequence applied per shard (0: none yet);
    /// reported in this gateway's presence ([`GatewayPresence`]).
    applied: Vec<AtomicU64>,
    /// Woken when `applied` moves: the presence writer reports it at once.
    applied_changed: tokio::sync::Notify,
    /// This gateway process' id in the live set (a random UUID).
    gateway_id: String,
    /// Its name in the live set.
    gateway_name: String,
    /// The addresses it serves agents on (set once the listener is known).
    gateway_addr: std::sync::OnceLock<String>,
    metrics: Metrics,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Redis(_) => redact_url(&self.cfg.redis_url),
            Source::Memory(_) => "in-process bus".to_owned(),
        };
        f.debug_struct("Revocation")
            .field("source", &source)
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl Revocation {
    /// A checker for `cfg`. Does not connect yet.
    pub fn new(cfg: &RevocationConfig, metrics: Metrics) -> Result<Self, OpenError> {
        let client =
            RedisClient::open(&cfg.redis_url, Duration::from_millis(cfg.redis_timeout_ms))?;
        Ok(Self::with_source(cfg, Source::Redis(client), metrics))
    }

    /// A checker reading `bus` instead of Redis (`cfg.redis_url` is not
    /// used; every other setting is). For the one-process dev stack only.
    pub fn with_memory_bus(cfg: &RevocationConfig, bus: MemoryBus, metrics: Metrics) -> Self {
        Self::with_source(cfg, Source::Memory(bus), metrics)
    }

    fn with_source(cfg: &RevocationConfig, source: Source, metrics: Metrics) -> Self {
        let ttl = Duration::from_secs(cfg.cache_ttl_secs);
        Self {
            keys: KeySchema::sharded(cfg.key_prefix.clone(), cfg.shards),
            source,
            conn: ArcSwapOption::empty(),
            certs: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(ttl)
                .build(),
            agents: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(ttl)
                .build(),
            epoch: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            start: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            redis_down: AtomicBool::new(false),
            refused: tokio::sync::Notify::new(),
            applied: (0..cfg.shards.max(1)).map(|_| AtomicU64::new(0)).collect(),
            applied_changed: tokio::sync::Notify::new(),
            gateway_id: uuid::Uuid::new_v4().to_string(),
            gateway_name: cfg.gateway_name.clone().unwrap_or_else(host_name),
            gateway_addr: std::sync::OnceLock::new(),
            metrics,
            cfg: cfg.clone(),
        }
    }

    /// The key schema.
    pub fn keys(&self) -> &KeySchema {
        &self.keys
    }

    /// Records the addresses this gateway serves agents on, as its presence
    /// shows them (the first call wins).
    pub fn set_gateway_addr(&self, addr: String) {
        let _ = self.gateway_addr.set(addr);
    }

    /// Records `shard`'s subscriber cursor as applied, waking the presence
    /// writer when it moved. Called wherever a cursor moves (a
    /// subscription's baseline, [`Self::apply`], a lag or gap), so the
    /// presence never runs ahead of the cache.
    fn note_applied(&self, shard: u16, last_seq: Option<u64>) {
        let seq = last_seq.unwrap_or(0);
        let Some(cell) = self.applied.get(usize::from(shard)) else {
            return;
        };
        if cell.swap(seq, Ordering::AcqRel) != seq {
            let total = self
                .applied
                .iter()
                .map(|a| a.load(Ordering::Acquire))
                .fold(0u64, u64::saturating_add);
            self.metrics
                .revocation_last_seq
                .set(total.min(i64::MAX as u64) as i64);
            self.applied_changed.notify_one();
        }
    }

    /// This gateway's presence now, or `None` while Redis is not confirmed
    /// (then it is not renewed, and drops out of the live set when its
    /// cached answers stop being trusted).
    fn presence(&self) -> Option<GatewayPresence> {
        let staleness = self.staleness()?;
        let left = self.cfg.max_staleness().checked_sub(staleness)?;
        let applied: Vec<u64> = self
            .applied
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect();
        Some(GatewayPresence {
            gateway_id: self.gateway_id.clone(),
            name: self.gateway_name.clone(),
            addr: self.gateway_addr.get().cloned().unwrap_or_default(),
            applied: applied.first().copied().unwrap_or(0),
            applied_by_shard: if self.keys.is_sharded() {
                applied
            } else {
                Vec::new()
            },
            confirmed_until_ms: oneprotect_identity::revocation::unix_ms_now()
                .saturating_add(left.as_millis() as i64),
        })
    }

    /// Writes this gateway's presence to the live set (`HSET
    /// {prefix}gateways`), if it is confirmed. A failure is logged at debug
    /// and retried on the next change or heartbeat.
    async fn write_presence(&self) {
        let Some(p) = self.presence() else {
            return;
        };
        // A presence always serialises (strings and numbers).
        let json = serde_json::to_string(&p).expect("a presence serialises");
        match &self.source {
            Source::Memory(bus) => {
                bus.put_gateway(&self.gateway_id, json.into());
                self.metrics.presence_writes.inc();
            }
            Source::Redis(_) => {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(self.keys.gateways())
                    .arg(&self.gateway_id)
                    .arg(json);
                if self.presence_command(cmd).await {
                    self.metrics.presence_writes.inc();
                }
            }
        }
    }

    /// Runs one live-set command on the command connection, with the lookup
    /// timeout; a failure is logged at debug and drops the connection (the
    /// next change or heartbeat retries). Whether it succeeded.
    async fn presence_command(&self, cmd: redis::Cmd) -> bool {
        let Some(mut conn) = self.connection().await else {
            return false;
        };
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        match tokio::time::timeout(timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "live-set write failed");
                self.conn.store(None);
                false
            }
            Err(_) => {
                tracing::debug!("live-set write timed out");
                self.conn.store(None);
                false
            }
        }
    }

    /// Removes this gateway from the live set (a clean shutdown), so no
    /// revocation waits for it.
    async fn remove_presence(&self) {
        match &self.source {
            Source::Memory(bus) => bus.remove_gateway(&self.gateway_id),
            Source::Redis(_) => {
                let mut cmd = redis::cmd("HDEL");
                cmd.arg(self.keys.gateways()).arg(&self.gateway_id);
                self.presence_command(cmd).await;
            }
        }
    }

    /// Reports this gateway's presence until `shutdown`: at once after each
    /// applied announcement (a burst is folded into one write: the writer
    /// reports the cursor as it is when it runs), and every `heartbeat_ms`;
    /// removes it on shutdown.
    async fn run_presence(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.heartbeat_ms.max(1));
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.write_presence().await;
            tokio::select! {
                () = self.applied_changed.notified() => {}
                () = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => {}
            }
        }
        self.remove_presence().await;
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "never".
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn mark_ok(&self) {
        self.last_ok_ms.store(self.now_ms(), Ordering::Release);
    }

    /// How long ago Redis was last confirmed; `None` if never.
    pub fn staleness(&self) -> Option<Duration> {
        match self.last_ok_ms.load(Ordering::Acquire) {
            0 => None,
            t => Some(Duration::from_millis(self.now_ms().saturating_sub(t))),
        }
    }

    /// Whether cached answers may be trusted now.
    pub fn is_confirmed(&self) -> bool {
        self.staleness()
            .is_some_and(|s| s <= self.cfg.max_staleness())
    }

    /// The `Retry-After` value for a 503.
    pub fn retry_after_secs(&self) -> u64 {
        self.cfg.retry_after_secs
    }

    /// Distrusts every cached `active` answer.
    fn reset(&self, why: &'static str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.revocation_cache_resets.inc();
        tracing::info!(why, "revocation cache distrusted");
    }

    /// The per-request check for the connection's identity.
    pub async fn check(&self, conn: &ConnIdentity) -> Decision {
        match self.check_cached(conn) {
            Some(decision) => decision,
            // Boxed: the Redis lookup's state would otherwise enlarge every
            // request's future, also where the cache answers (nearly always).
            None => Box::pin(self.check_uncached(conn)).await,
        }
    }

    /// The answer from the cache, when it has a trusted one.
    fn check_cached(&self, conn: &ConnIdentity) -> Option<Decision> {
        let id = conn.identity();
        let epoch = self.epoch.load(Ordering::Acquire);
        let cert = self.certs.get(&id.serial());
        let agent = self.agents.get(&(id.tenant(), id.agent()));
        let cached = decide(cert.map(|c| c.status), agent.map(|a| a.status));
        if let Decision::Refuse(_) = cached {
            self.metrics.revocation_cache_hits.inc();
            return Some(cached);
        }
        if cached == Decision::Allow
            && cert.is_some_and(|c| c.epoch == epoch)
            && agent.is_some_and(|a| a.epoch == epoch)
            && self.is_confirmed()
        {
            self.metrics.revocation_cache_hits.inc();
            return Some(Decision::Allow);
        }
        None
    }

    /// The check when the cache has no trusted answer: one Redis lookup.
    async fn check_uncached(&self, conn: &ConnIdentity) -> Decision {
        let id = conn.identity();
        let serial = id.serial();
        let agent_key = (id.tenant(), id.agent());
        let epoch = self.epoch.load(Ordering::Acquire);
        self.metrics.revocation_cache_misses.inc();
        if self.redis_down.load(Ordering::Acquire) && !self.is_confirmed() {
            return Decision::Unavailable;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some((cert, agent)) = self.lookup(conn.redis_keys()).await else {
            return Decision::Unavailable;
        };
        let decision = decide(cert, agent);
        let unchanged = self.generation.load(Ordering::Acquire) == generation;
        if unchanged || matches!(decision, Decision::Refuse(_)) {
            if let Some(status) = cert {
                self.certs.insert(serial, Cached { status, epoch });
            }
            if let Some(status) = agent {
                self.agents.insert(agent_key, Cached { status, epoch });
            }
        }
        decision
    }

    async fn connection(&self) -> Option<RedisConnection> {
        let Source::Redis(client) = &self.source else {
            return None;
        };
        if let Some(c) = self.conn.load_full() {
            return Some((*c).clone());
        }
        match client.connect().await {
            Ok(c) => {
                self.conn.store(Some(Arc::new(c.clone())));
                Some(c)
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis connect failed");
                None
            }
        }
    }

    /// One `MGET` of the certificate and agent status keys.
    async fn lookup(&self, keys: [&str; 2]) -> Option<(Option<CertStatus>, Option<AgentStatus>)> {
        if let Source::Memory(bus) = &self.source {
            let mut values = bus.get(&keys).into_iter();
            let mut next = || values.next().flatten();
            let (c, a) = (next(), next());
            return Some((
                c.and_then(|s| s.parse().ok()),
                a.and_then(|s| s.parse().ok()),
            ));
        }
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        let mut conn = self.connection().await?;
        let res: Result<redis::RedisResult<(Option<String>, Option<String>)>, _> =
            tokio::time::timeout(
                timeout,
                redis::cmd("MGET").arg(&keys[..]).query_async(&mut conn),
            )
            .await;
        match res {
            Ok(Ok((c, a))) => Some((
                c.and_then(|s| s.parse().ok()),
                a.and_then(|s| s.parse().ok()),
            )),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis lookup failed");
                self.conn.store(None);
                None
            }
            Err(_) => {
                tracing::debug!("redis lookup timed out");
                self.conn.store(None);
                None
            }
        }
    }

    /// Applies one announcement of `shard`; `last_seq` is the subscriber's
    /// cursor on that shard.
    fn apply(&self, shard: u16, payload: &[u8], last_seq: &mut Option<u64>) {
        let Ok(a) = serde_json::from_slice::<Announcement>(payload) else {
            self.reset("unparsable announcement");
            return;
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        let in_order = match *last_seq {
            None => true,
            Some(l) if a.seq == l + 1 => true,
            Some(l) if a.seq <= l => false,
            Some(_) => {
                self.reset("announcement sequence gap");
                true
            }
        };
        *last_seq = Some(last_seq.map_or(a.seq, |l| l.max(a.seq)));
        let epoch = self.epoch.load(Ordering::Acquire);
        // A resync or gap wakes no tunnel at once (each would look itself
        // up in Redis together): their next periodic check confirms them.
        let refuses = match &a.change {
            Change::Cert { status, .. } => *status != CertStatus::Active,
            Change::Agent { status, .. } => *status != AgentStatus::Active,
            Change::Resync => false,
        };
        match a.change {
            Change::Cert { serial, status } => {
                if in_order || status != CertStatus::Active {
                    self.certs.insert(serial, Cached { status, epoch });
                } else {
                    self.certs.invalidate(&serial);
                }
            }
            Change::Agent {
                tenant_id,
                agent_id,
                status,
            } => {
                let k = (tenant_id, agent_id);
                if in_order || status != AgentStatus::Active {
                    self.agents.insert(k, Cached { status, epoch });
                } else {
                    self.agents.invalidate(&k);
                }
            }
            Change::Resync => {
                self.certs.invalidate_all();
                self.agents.invalidate_all();
                self.reset("resync announced");
            }
        }
        if refuses {
            self.refused.notify_waiters();
        }
        self.note_applied(shard, *last_seq);
    }

    /// Watches a tunnel's connection (after an allowed upgrade) until its
    /// certificate or agent is refused; returns the refusal, or
    /// `revocation_unavailable` when the state cannot be confirmed, as a
    /// request would get it. A revocation or supersession announced on the
    /// channel is acted on at once; one missed (a lost subscription) is
    /// found by the re-check every `heartbeat_ms`, which trusts the cache
    /// only while Redis is confirmed: so at most `max_staleness_ms +
    /// heartbeat_ms` after Redis holds it. A refusal by another route's
    /// request on the same connection does not end the tunnel early; the
    /// tunnel's own check does.
    pub async fn watch_tunnel(&self, conn: &ConnIdentity) -> ProblemKind {
        let every = Duration::from_millis(self.cfg.heartbeat_ms.max(1));
        loop {
            let refused = self.refused.notified();
            tokio::pin!(refused);
            // Registered before the check: a refusal announced while the
            // check runs still wakes this loop.
            refused.as_mut().enable();
            match self.check(conn).await {
                Decision::Allow => {}
                Decision::Refuse(kind) => return kind,
                Decision::Unavailable => return problem::REVOCATION_UNAVAILABLE,
            }
            tokio::select! {
                () = &mut refused => {}
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Runs the subscriber until `shutdown` turns true: subscribes to the
    /// revocation channel, applies announcements, PINGs every
    /// `heartbeat_ms` to confirm the link, and reconnects (distrusting the
    /// cache) after any failure.
    ///
    /// Beside it runs the presence writer: this gateway's entry in the live
    /// set, renewed on every applied announcement and heartbeat while Redis
    /// is confirmed (ADR-0022).
    pub async fn run_subscriber(&self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let presence = self.run_presence(shutdown.clone());
        let subscriber = async {
            match &self.source {
                Source::Memory(bus) => self.run_bus_subscriber(bus, shutdown).await,
                Source::Redis(client) if self.keys.is_sharded() => {
                    self.run_sharded_subscriber(client, shutdown).await
                }
                Source::Redis(_) => self.run_redis_subscriber(shutdown).await,
            }
        };
        tokio::join!(presence, subscriber);
    }

    async fn run_redis_subscriber(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let heartbeat = Duration::from_millis(self.cfg.heartbeat_ms);
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        let channel = self.keys.revocation_channel();
        let mut failures: u64 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.subscribe(&channel, timeout).await {
                Ok((mut sink, mut stream, baseline, node)) => {
                    failures = 0;
                    self.subscription_up();
                    tracing::info!(channel = %channel, %node, "revocation subscription up");
                    let mut last_seq = baseline;
                    self.note_applied(0, last_seq);
                    let mut lagging = false;
                    let mut tick = tokio::time::interval(heartbeat);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(m) => {
                                    self.apply(0, m.get_payload_bytes(), &mut last_seq);
                                    self.mark_ok();
                                }
                                None => break,
                            },
                            _ = tick.tick() => {
                                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                                    Ok(Ok(_)) => self.mark_ok(),
                                    _ => break,
                                }
                                if let Err(why) = self.check_lag(&mut last_seq, &mut lagging).await {
                                    tracing::error!(error = %why, "revocation projection layout changed");
                                    break;
                                }
                            }
                            _ = shutdown.changed() => return,
                        }
                    }
                    self.metrics.redis_connected.set(0);
                    tracing::warn!(
                        "revocation subscription lost; serving cached answers until max_staleness"
                    );
                }
                Err(e) => self.subscription_failed(&mut failures, &e),
            }
            if !self.pause(heartbeat, &mut shutdown).await {
                return;
            }
        }
    }

    /// A (re)subscription is up: Redis confirmed now, every cached `active`
    /// answer distrusted (announcements may have been missed meanwhile),
    /// the command connection dropped (it may be dead too).
    fn subscription_up(&self) {
        self.redis_down.store(false, Ordering::Release);
        self.conn.store(None);
        self.reset("subscribed");
        self.mark_ok();
        self.metrics.redis_connected.set(1);
    }

    /// A subscription attempt failed: lookups are skipped while stale; one
    /// warning on the first failure, then one per ~minute.
    fn subscription_failed(&self, failures: &mut u64, error: &str) {
        self.redis_down.store(true, Ordering::Release);
        *failures += 1;
        if *failures == 1 || failures.is_multiple_of(60) {
            tracing::warn!(
                error,
                failures = *failures,
                "cannot subscribe to the revocation channel(s)"
            );
        }
    }

    /// Waits one heartbeat before the next attempt; `false` on shutdown.
    async fn pause(
        &self,
        heartbeat: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => true,
            _ = shutdown.changed() => false,
        }
    }

    /// Compares the announcement cursor with Redis' counter. A lag seen on
    /// two heartbeats in a row is not a message in flight: an announcement
    /// was lost (or its publisher died between `INCR` and `PUBLISH`), so the
    /// cache is distrusted and the cursor moves to the counter.
    ///
    /// The same read checks the projection's recorded shard count: an
    /// enroll-api switched to another layout under a running gateway writes
    /// keys and announcements this gateway no longer reads, so a mismatch is
    /// an `Err` — the subscription ends and is not renewed (the gateway
    /// fails closed at `max_staleness`) until the settings agree again.
    async fn check_lag(
        &self,
        last_seq: &mut Option<u64>,
        lagging: &mut bool,
    ) -> Result<(), String> {
        if let Source::Memory(bus) = &self.source {
            if let Some(current) = bus.seq() {
                let lag = self.lag_seen(0, current, last_seq, lagging);
                self.metrics.revocation_seq_lag.set(lag);
            }
            return Ok(());
        }
        let Some(mut conn) = self.connection().await else {
            return Ok(());
        };
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        // One slot: unsharded, every key carries the prefix (and its tag).
        let res = tokio::time::timeout(
            timeout,
            redis::cmd("MGET")
                .arg(self.keys.revocation_seq())
                .arg(self.keys.projection_shards())
                .query_async::<(Option<u64>, Option<u16>)>(&mut conn),
        )
        .await;
        let Ok(Ok((current, layout))) = res else {
            return Ok(());
        };
        self.check_layout(layout)?;
        if let Some(current) = current {
            let lag = self.lag_seen(0, current, last_seq, lagging);
            self.metrics.revocation_seq_lag.set(lag);
        }
        Ok(())
    }

    /// Compares `shard`'s cursor with its counter `current`: a lag seen on
    /// two heartbeats in a row distrusts the cache and moves the cursor to
    /// the counter. Returns the lag left (for the gauge).
    fn lag_seen(
        &self,
        shard: u16,
        current: u64,
        last_seq: &mut Option<u64>,
        lagging: &mut bool,
    ) -> i64 {
        let lag = current.saturating_sub(last_seq.unwrap_or(0));
        if lag == 0 {
            *lagging = false;
        } else if *lagging {
            self.reset("announcement missed (sequence lag)");
            *last_seq = Some(current);
            *lagging = false;
            self.note_applied(shard, *last_seq);
            return 0;
        } else {
            *lagging = true;
        }
        lag.min(i64::MAX as u64) as i64
    }

    /// The subscriber over an in-process bus: the same loop as over Redis,
    /// where the heartbeat confirms the link (the bus cannot be unreachable
    /// while it exists) and checks the sequence lag.
    async fn run_bus_subscriber(
        &self,
        bus: &MemoryBus,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let (mut rx, baseline) = bus.subscribe();
        self.redis_down.store(false, Ordering::Release);
        self.reset("subscribed");
        self.mark_ok();
        self.metrics.redis_connected.set(1);
        tracing::info!("revocation subscription up (in-process bus)");
        let mut last_seq = baseline;
        self.note_applied(0, last_seq);
        let mut lagging = false;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(payload) => {
                        self.apply(0, payload.as_bytes(), &mut last_seq);
                        self.mark_ok();
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "revocation announcements missed (subscriber lagged)");
                        self.reset("announcement sequence gap");
                        last_seq = bus.seq();
                        self.note_applied(0, last_seq);
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    self.mark_ok();
                    // The bus has no layout to change: never an error.
                    let _ = self.check_lag(&mut last_seq, &mut lagging).await;
                }
                _ = shutdown.changed() => return,
            }
        }
        // Unreachable while the bus lives (this checker holds a clone); kept
        // fail-closed: stop confirming, so cached answers go stale.
        self.metrics.redis_connected.set(0);
        self.redis_down.store(true, Ordering::Release);
        let _ = shutdown.wait_for(|s| *s).await;
    }

    async fn subscribe(
        &self,
        channel: &str,
        timeout: Duration,
    ) -> Result<
        (
            redis::aio::PubSubSink,
            redis::aio::PubSubStream,
            Option<u64>,
            String,
        ),
        String,
    > {
        let Source::Redis(client) = &self.source else {
            return Err("not a Redis source".into());
        };
        let fut = async {
            let (pubsub, node) = client.pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(channel).await?;
            // Announcements up to the counter's value are already reflected
            // in the keys we will read.
            let mut conn = client.connect().await?;
            let seq: Option<u64> = redis::cmd("GET")
                .arg(self.keys.revocation_seq())
                .query_async(&mut conn)
                .await?;
            let layout = self.read_layout(&mut conn).await?;
            Ok::<_, redis::RedisError>((sink, stream, seq, node, layout))
        };
        match tokio::time::timeout(timeout * 4, fut).await {
            Ok(Ok((sink, stream, seq, node, layout))) => {
                self.check_layout(layout)?;
                Ok((sink, stream, seq, node))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// `{prefix}projection:shards`, as the enroll-api recorded it.
    async fn read_layout(&self, conn: &mut RedisConnection) -> redis::RedisResult<Option<u16>> {
        redis::cmd("GET")
            .arg(self.keys.projection_shards())
            .query_async(conn)
            .await
    }

    /// Whether the projection's recorded shard count is this gateway's
    /// (none recorded counts as 1: an enroll-api that never rebuilt, or
    /// keys written by hand). A mismatch keeps the gateway unconfirmed —
    /// it would read keys in the wrong places — with an error saying so.
    fn check_layout(&self, recorded: Option<u16>) -> Result<(), String> {
        let ours = self.keys.shards();
        if recorded.unwrap_or(1) == ours {
            return Ok(());
        }
        Err(format!(
            "the projection is written in {} shard(s) ({}), but revocation.shards = {ours}: \
             set both to the same value (refusing to confirm Redis meanwhile)",
            recorded.unwrap_or(1),
            self.keys.projection_shards()
        ))
    }

    /// The subscriber over a sharded projection (ADR-0024): `SSUBSCRIBE`
    /// to every shard's channel on one RESP3 cluster connection, a cursor
    /// and gap detection per shard; every heartbeat reads each shard's
    /// counter through that connection (confirming each shard's node and
    /// checking the lag). A closed node connection or a server-side
    /// `sunsubscribe` (the slot moved) ends the subscription; the next one
    /// starts from scratch and distrusts the cache.
    async fn run_sharded_subscriber(
        &self,
        client: &RedisClient,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let heartbeat = Duration::from_millis(self.cfg.heartbeat_ms);
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms);
        let n = self.keys.shards();
        let channels: Vec<String> = (0..n).map(|k| self.keys.revocation_channel_of(k)).collect();
        let by_channel: std::collections::HashMap<&[u8], u16> = channels
            .iter()
            .zip(0u16..)
            .map(|(c, k)| (c.as_bytes(), k))
            .collect();
        let mut failures: u64 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.shard_subscribe(client, &channels, timeout).await {
                Ok((mut sub, baseline)) => {
                    failures = 0;
                    self.subscription_up();
                    tracing::info!(shards = n, "revocation subscription up (sharded pub/sub)");
                    let mut cursors = baseline;
                    for (k, c) in (0u16..).zip(&cursors) {
                        self.note_applied(k, *c);
                    }
                    let mut lagging = vec![false; usize::from(n)];
                    let mut tick = tokio::time::interval(heartbeat);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let why = loop {
                        tokio::select! {
                            push = sub.pushes.recv() => {
                                let Some(push) = push else { break "push channel closed".to_owned() };
                                if let Err(why) = self.on_shard_push(&push, &by_channel, &mut cursors) {
                                    break why.to_owned();
                                }
                            }
                            _ = tick.tick() => {
                                let current = match self.read_shards(&mut sub.conn, timeout).await {
                                    Ok(current) => current,
                                    Err(why) => break why,
                                };
                                self.mark_ok();
                                let mut worst = 0;
                                for (k, c) in (0u16..).zip(current) {
                                    let i = usize::from(k);
                                    if let Some(c) = c {
                                        worst = worst.max(self.lag_seen(k, c, &mut cursors[i], &mut lagging[i]));
                                    }
                                }
                                self.metrics.revocation_seq_lag.set(worst);
                            }
                            _ = shutdown.changed() => return,
                        }
                    };
                    self.metrics.redis_connected.set(0);
                    tracing::warn!(
                        %why,
                        "sharded revocation subscription lost; serving cached answers until max_staleness"
                    );
                }
                Err(e) => self.subscription_failed(&mut failures, &e),
            }
            if !self.pause(heartbeat, &mut shutdown).await {
                return;
            }
        }
    }

    /// Subscribes to every shard channel, then reads every shard's counter
    /// (announcements up to it are reflected in the keys lookups will read)
    /// and checks the recorded layout.
    async fn shard_subscribe(
        &self,
        client: &RedisClient,
        channels: &[String],
        timeout: Duration,
    ) -> Result<(oneprotect_redis::ShardSubscriber, Vec<Option<u64>>), String> {
        let mut sub = client
            .shard_subscriber(channels)
            .await
            .map_err(|e| e.to_string())?;
        let baseline = self.read_shards(&mut sub.conn, timeout * 4).await?;
        Ok((sub, baseline))
    }

    /// One push of the sharded subscription: an `smessage` is applied to
    /// its shard's cursor; a closed node connection or a server-side
    /// `sunsubscribe` (the slot moved) is an `Err` saying why the
    /// subscription must end; anything else (confirmations) is ignored.
    fn on_shard_push(
        &self,
        push: &redis::PushInfo,
        by_channel: &std::collections::HashMap<&[u8], u16>,
        cursors: &mut [Option<u64>],
    ) -> Result<(), &'static str> {
        match push.kind {
            redis::PushKind::SMessage => {
                if let [redis::Value::BulkString(ch), redis::Value::BulkString(payload), ..] =
                    push.data.as_slice()
                {
                    if let Some(&k) = by_channel.get(ch.as_slice()) {
                        self.apply(k, payload, &mut cursors[usize::from(k)]);
                        self.mark_ok();
                    }
                }
                Ok(())
            }
            redis::PushKind::Disconnection => Err("a node's connection closed"),
            redis::PushKind::SUnsubscribe => Err("a shard channel moved (sunsubscribe)"),
            _ => Ok(()),
        }
    }

    /// Every shard's counter (one `GET` per shard: different slots) and the
    /// recorded layout, read through `conn` within `timeout`: the sharded
    /// subscriber's baseline and heartbeat. A read that succeeds proves the
    /// link to every shard's node. `Err` says why the subscription must
    /// end: a failure, or a layout that is not this gateway's.
    async fn read_shards(
        &self,
        conn: &mut RedisConnection,
        timeout: Duration,
    ) -> Result<Vec<Option<u64>>, String> {
        let fut = async {
            let layout = self.read_layout(&mut *conn).await?;
            let mut seqs = Vec::with_capacity(usize::from(self.keys.shards()));
            for k in 0..self.keys.shards() {
                seqs.push(
                    redis::cmd("GET")
                        .arg(self.keys.revocation_seq_of(k))
                        .query_async::<Option<u64>>(&mut *conn)
                        .await?,
                );
            }
            Ok::<_, redis::RedisError>((layout, seqs))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok((layout, seqs))) => {
                self.check_layout(layout)?;
                Ok(seqs)
            }
            Ok(Err(e)) => Err(format!("reading the shard counters failed: {e}")),
            Err(_) => Err("the shard counters did not answer in time".into()),
        }
    }

    /// Updates the staleness gauge (called on scrape).
    pub fn update_gauges(&self) {
        let ms = self
            .staleness()
            .map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64);
        self.metrics.revocation_staleness_ms.set(ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table_fails_closed() {
        use AgentStatus as A;
        use CertStatus as C;
        assert_eq!(decide(Some(C::Active), Some(A::Active)), Decision::Allow);
        assert_eq!(
            decide(Some(C::Revoked), Some(A::Active)),
            Decision::Refuse(problem::CERTIFICATE_REVOKED)
        );
        assert_eq!(
            decide(Some(C::Superseded), Some(A::Active)),
            Decision::Refuse(problem::CERTIFICATE_SUPERSEDED)
        );
        assert_eq!(
            decide(Some(C::Active), Some(A::Revoked)),
            Decision::Refuse(problem::AGENT_REVOKED)
        );
        assert_eq!(
            decide(None, Some(A::Revoked)),
            Decision::Refuse(problem::AGENT_REVOKED)
        );
        assert_eq!(decide(None, Some(A::Active)), Decision::Unavailable);
        assert_eq!(decide(Some(C::Active), None), Decision::Unavailable);
        assert_eq!(decide(None, None), Decision::Unavailable);
    }

    fn checker() -> Revocation {
        Revocation::new(&RevocationConfig::default(), Metrics::new()).unwrap()
    }

    #[tokio::test]
    async fn memory_bus_source_reads_keys_and_follows_announcements() {
        let bus = MemoryBus::new();
        let r = Arc::new(Revocation::with_memory_bus(
            &RevocationConfig::default(),
            bus.clone(),
            Metrics::new(),
        ));
        let keys = r.keys().clone();
        let serial: SerialNumber = "0a".parse().unwrap();
        let (t, a) = (TenantId::random(), AgentId::random());
        let (ck, ak) = (keys.cert_status(&t, &serial), keys.agent_status(&t, &a));
        assert_eq!(r.lookup([&ck, &ak]).await, Some((None, None)));
        assert!(!r.is_confirmed());
        let agent_change = |status| Change::Agent {
            tenant_id: t,
            agent_id: a,
            status,
        };
        bus.set_status(
            &ck,
            "active",
            None,
            &Change::Cert {
                serial,
                status: CertStatus::Active,
            },
            true,
        );
        bus.set_status(
            &ak,
            "active",
            None,
            &agent_change(AgentStatus::Active),
            true,
        );
        assert_eq!(
            r.lookup([&ck, &ak]).await,
            Some((Some(CertStatus::Active), Some(AgentStatus::Active)))
        );

        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let r = r.clone();
            async move { r.run_subscriber(rx).await }
        });
        for _ in 0..500 {
            if r.is_confirmed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(r.is_confirmed(), "the bus subscriber confirms the link");
        bus.set_status(
            &ak,
            "revoked",
            None,
            &agent_change(AgentStatus::Revoked),
            true,
        );
        let mut seen = None;
        for _ in 0..500 {
            seen = r.agents.get(&(t, a)).map(|c| c.status);
            if seen == Some(AgentStatus::Revoked) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen, Some(AgentStatus::Revoked), "announcement applied");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("subscriber stops on shutdown")
            .unwrap();
    }

    #[test]
    fn sharded_cursors_detect_gaps_per_shard_and_reach_the_presence() {
        let cfg = RevocationConfig {
            redis_url: "redis+cluster://127.0.0.1:1".into(),
            key_prefix: "p:".into(),
            shards: 4,
            ..RevocationConfig::default()
        };
        let r = Revocation::new(&cfg, Metrics::new()).unwrap();
        assert!(r.keys().is_sharded());
        let (t, a) = (TenantId::random(), AgentId::random());
        let msg = |seq: u64| {
            format!(
                r#"{{"seq":{seq},"kind":"agent","tenant_id":"{t}","agent_id":"{a}","status":"active"}}"#
            )
        };
        let e0 = r.epoch.load(Ordering::Relaxed);
        let (mut c0, mut c2) = (Some(10), Some(3));
        r.apply(0, msg(11).as_bytes(), &mut c0);
        // Shard 2's own sequence: 4 follows its 3, whatever shard 0 is at.
        r.apply(2, msg(4).as_bytes(), &mut c2);
        assert_eq!((c0, c2), (Some(11), Some(4)));
        assert_eq!(
            r.epoch.load(Ordering::Relaxed),
            e0,
            "no gap on either shard"
        );
        // 4 -> 6 on shard 2 is a gap: the cache is distrusted.
        r.apply(2, msg(6).as_bytes(), &mut c2);
        assert_eq!(r.epoch.load(Ordering::Relaxed), e0 + 1);
        r.mark_ok();
        let p = r.presence().expect("confirmed");
        assert_eq!(p.applied_by_shard, vec![11, 0, 6, 0]);
        assert_eq!(p.applied, 11);
        assert_eq!(p.applied_on(2), 6);
        // A lag on two heartbeats moves only that shard's cursor.
        let mut lagging = false;
        assert_eq!(r.lag_seen(3, 5, &mut None, &mut lagging), 5);
        let mut c3 = None;
        r.lag_seen(3, 5, &mut c3, &mut lagging);
        assert_eq!(c3, Some(5));
        assert_eq!(r.presence().unwrap().applied_by_shard, vec![11, 0, 6, 5]);

        // The recorded layout must be this gateway's.
        assert!(r.check_layout(Some(4)).is_ok());
        let e = r.check_layout(Some(12)).unwrap_err();
        assert!(
            e.contains("12 shard(s)") && e.contains("revocation.shards = 4"),
            "{e}"
        );
        assert!(r.check_layout(None).is_err(), "absent reads as 1");
        let unsharded = checker();
        assert!(unsharded.check_layout(None).is_ok());
        assert!(unsharded.check_layout(Some(1)).is_ok());
        assert!(unsharded.check_layout(Some(3)).is_err());
        assert!(unsharded.presence().is_none(), "never confirmed");
        unsharded.mark_ok();
        assert!(unsharded.presence().unwrap().applied_by_shard.is_empty());
    }

    #[test]
    fn announcements_update_in_order_and_gaps_reset() {
        let r = checker();
        let serial: SerialNumber = "0a".parse().unwrap();
        let mut seq = Some(4);
        let msg = |seq: u64, status: &str| {
            format!(r#"{{"seq":{seq},"kind":"cert","serial":"0a","status":"{status}"}}"#)
        };
        let e0 = r.epoch.load(Ordering::Relaxed);
        r.apply(0, msg(5, "active").as_bytes(), &mut seq);
        assert_eq!(seq, Some(5));
        assert_eq!(r.epoch.load(Ordering::Relaxed), e0);
        assert_eq!(r.certs.get(&serial).unwrap().status, CertStatus::Active);
        // Gap: 5 -> 7 distrusts the cache but applies the change.
        r.apply(0, msg(7, "revoked").as_bytes(), &mut seq);
        assert_eq!(r.epoch.load(Ordering::Relaxed), e0 + 1);
        assert_eq!(r.certs.get(&serial).unwrap().status, CertStatus::Revoked);
        // A late `active` (seq 6) must not resurrect a revoked certificate.
        r.apply(0, msg(6, "active").as_bytes(), &mut seq);
        assert!(r.certs.get(&serial).is_none());
        assert_eq!(seq, Some(7));
        r.apply(0, b"not json", &mut seq);
        assert_eq!(r.epoch.load(Ordering::Relaxed), e0 + 2);
    }
}
