//! Opening command and pub/sub connections for a [`RedisTarget`].

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};

use crate::target::{Kind, RedisTarget, Topology, UrlError};

/// How often a cluster command is retried (redirections and reconnects to
/// another node count). The callers retry on their own, so a few suffice;
/// the `redis` crate's default (16, with backoff) would hold a request far
/// beyond its timeout.
const CLUSTER_RETRIES: u32 = 3;

/// Why [`RedisClient::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL did not parse.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The `redis` crate refused the parsed settings.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

/// A Redis client for one `redis_url`, whatever its topology. Connects
/// lazily; every connection it opens uses the timeout it was built with.
///
/// - **Single node**: connections go to that node.
/// - **Sentinel**: each [`connect`](Self::connect) and
///   [`pubsub`](Self::pubsub) first asks the Sentinels which server is the
///   master now (and checks it says so), so a failover is followed on the
///   next reconnect.
/// - **Cluster**: [`connect`](Self::connect) opens a cluster connection
///   (slot map, redirections). [`pubsub`](Self::pubsub) subscribes on one
///   seed node — a cluster broadcasts `PUBLISH` to every node — and moves on
///   to the next seed node on each call, so a subscriber whose node went
///   away resubscribes elsewhere.
pub struct RedisClient {
    // Boxed: the Sentinel and Cluster clients are large, and callers keep a
    // `RedisClient` next to small alternatives in their own enums.
    inner: Box<Inner>,
    timeout: Duration,
}

enum Inner {
    Single(redis::Client),
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
    Cluster {
        client: ClusterClient,
        nodes: Vec<ConnectionInfo>,
        next: AtomicUsize,
    },
}

impl fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RedisClient");
        match &*self.inner {
            Inner::Single(c) => d.field("addr", &c.get_connection_info().addr().to_string()),
            Inner::Sentinel { master, .. } => d.field("sentinel_master", master),
            Inner::Cluster { nodes, .. } => d.field(
                "cluster_seeds",
                &nodes
                    .iter()
                    .map(|n| n.addr().to_string())
                    .collect::<Vec<_>>(),
            ),
        };
        d.field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Parses `url` (see [`RedisTarget::parse`]) and builds a client whose
    /// connections use `timeout` to connect and per response. Does not
    /// connect.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, OpenError> {
        Ok(Self::new(RedisTarget::parse(url)?, timeout)?)
    }

    /// A client for `target` (see [`RedisClient::open`]).
    pub fn new(target: RedisTarget, timeout: Duration) -> RedisResult<Self> {
        let inner = match target.kind {
            Kind::Single(info) => Inner::Single(redis::Client::open(info)?),
            Kind::Sentinel {
                sentinels,
                master,
                node,
            } => Inner::Sentinel {
                client: tokio::sync::Mutex::new(SentinelClient::build(
                    sentinels,
                    master.clone(),
                    Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node)),
                    SentinelServerType::Master,
                )?),
                master,
            },
            Kind::Cluster { nodes } => Inner::Cluster {
                client: ClusterClient::builder(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES)
                    .build()?,
                nodes,
                next: AtomicUsize::new(0),
            },
        };
        Ok(Self {
            inner: Box::new(inner),
            timeout,
        })
    }

    /// The topology behind this client.
    pub fn topology(&self) -> Topology {
        match *self.inner {
            Inner::Single(_) => Topology::Single,
            Inner::Sentinel { .. } => Topology::Sentinel,
            Inner::Cluster { .. } => Topology::Cluster,
        }
    }

    fn config(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    /// A client for the current master, asked of the Sentinels now.
    async fn sentinel_master(
        &self,
        client: &tokio::sync::Mutex<SentinelClient>,
    ) -> RedisResult<redis::Client> {
        // One lookup at a time (the Sentinel client caches its connections);
        // bounded, since a Sentinel that accepts but never answers would
        // otherwise hold every caller.
        let mut sentinel = client.lock().await;
        match tokio::time::timeout(self.timeout * 2, sentinel.async_get_client()).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "timed out asking the Sentinels for the master",
            ))),
        }
    }

    /// Opens a command connection (multiplexed; cheap to clone).
    pub async fn connect(&self) -> RedisResult<RedisConnection> {
        let conn = match &*self.inner {
            Inner::Single(c) => Conn::Single(
                c.get_multiplexed_async_connection_with_config(&self.config())
                    .await?,
            ),
            Inner::Sentinel { client, .. } => Conn::Single(
                self.sentinel_master(client)
                    .await?
                    .get_multiplexed_async_connection_with_config(&self.config())
                    .await?,
            ),
            Inner::Cluster { client, .. } => Conn::Cluster(client.get_async_connection().await?),
        };
        Ok(RedisConnection(conn))
    }

    /// Opens a pub/sub connection; returns it with the address of the server
    /// it is on (for logs: no credentials). On a Cluster, each call starts
    /// with the seed node after the one used last time, trying each once.
    pub async fn pubsub(&self) -> RedisResult<(PubSub, String)> {
        let bounded = |client: redis::Client| async move {
            let addr = client.get_connection_info().addr().to_string();
            match tokio::time::timeout(self.timeout, client.get_async_pubsub()).await {
                Ok(r) => r.map(|p| (p, addr)),
                Err(_) => Err(RedisError::from((
                    ErrorKind::Io,
                    "timed out opening a pub/sub connection",
                ))),
            }
        };
        match &*self.inner {
            Inner::Single(c) => bounded(c.clone()).await,
            Inner::Sentinel { client, .. } => bounded(self.sentinel_master(client).await?).await,
            Inner::Cluster { nodes, next, .. } => {
                let start = next.load(Ordering::Acquire);
                let mut last = None;
                for i in 0..nodes.len() {
                    let idx = (start + i) % nodes.len();
                    let attempt = match redis::Client::open(nodes[idx].clone()) {
                        Ok(c) => bounded(c).await,
                        Err(e) => Err(e),
                    };
                    match attempt {
                        Ok(v) => {
                            next.store((idx + 1) % nodes.len(), Ordering::Release);
                            return Ok(v);
                        }
                        Err(e) => {
                            tracing::debug!(node = %nodes[idx].addr(), error = %e, "cluster node refused a subscription");
                            last = Some(e);
                        }
                    }
                }
                next.store((start + 1) % nodes.len(), Ordering::Release);
                Err(last.unwrap_or_else(|| {
                    RedisError::from((ErrorKind::InvalidClientConfig, "no cluster seed node"))
                }))
            }
        }
    }
}

/// A sharded pub/sub subscription on a Cluster ([`RedisClient::shard_subscriber`]):
/// a RESP3 cluster connection (one connection per node, commands and
/// subscriptions together) and the pushes it receives.
///
/// `pushes` carries every `smessage` (data: channel, payload), the server's
/// `ssubscribe`/`sunsubscribe` confirmations (a `sunsubscribe` the client
/// did not ask for means the slot moved, e.g. a failover) and a
/// `disconnection` when a node's connection closed. The `redis` crate
/// resubscribes on its own after such events; a caller that must not miss
/// a message should treat them as a gap (and may resubscribe from scratch).
pub struct ShardSubscriber {
    /// The cluster connection: read the shards' keys through it, so that a
    /// read that succeeds proves the connection to that shard's node lives.
    pub conn: RedisConnection,
    /// The pushes.
    pub pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

impl fmt::Debug for ShardSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardSubscriber").finish_non_exhaustive()
    }
}

impl RedisClient {
    /// Subscribes to `channels` with `SSUBSCRIBE` (one command per channel,
    /// each routed to the node owning the channel's slot), on a new RESP3
    /// cluster connection. Only on a Cluster; bounded by four times the
    /// client's timeout.
    pub async fn shard_subscriber(&self, channels: &[String]) -> RedisResult<ShardSubscriber> {
        let Inner::Cluster { nodes, .. } = &*self.inner else {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "sharded pub/sub needs a Redis Cluster",
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = ClusterClient::builder(nodes.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(CLUSTER_RETRIES)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()?;
        let fut = async {
            let mut conn = client.get_async_connection().await?;
            for c in channels {
                conn.ssubscribe(c).await?;
            }
            Ok::<_, RedisError>(conn)
        };
        let conn = match tokio::time::timeout(self.timeout * 4, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(RedisError::from((
                    ErrorKind::Io,
                    "timed out subscribing to the shard channels",
                )))
            }
        };
        Ok(ShardSubscriber {
            conn: RedisConnection(Conn::Cluster(conn)),
            pushes: rx,
        })
    }
}

/// A command connection: one multiplexed connection to a single node (or
/// the Sentinel-resolved master), or a cluster connection that routes each
/// command by its keys. Use it like any `redis::aio` connection
/// (`cmd.query_async(&mut conn)`); cloning shares the connection.
#[derive(Clone)]
pub struct RedisConnection(Conn);

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Conn::Single(_) => "RedisConnection(single)",
            Conn::Cluster(_) => "RedisConnection(cluster)",
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
