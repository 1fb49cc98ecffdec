//! Redis topologies for OneProtect's services: one `redis_url` setting
//! names a single node, a Sentinel-managed master or a Redis Cluster.
//!
//! The gateway (revocation reads and the revocation subscription) and the
//! enroll-api (projection writes and the event stream) both open Redis
//! through [`RedisClient`], built on the `redis` crate's own Sentinel and
//! Cluster support:
//!
//! | `redis_url` | topology |
//! |---|---|
//! | `redis://[user:pass@]host[:port][/db]` | one node (the `redis` crate's parser, as before) |
//! | `redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db]` | the master named `master`, found through the listed Sentinels; `user:pass` and `db` are the master's, the Sentinels get no credentials |
//! | `redis+cluster://[user:pass@]host:port[,host:port…]` | a Redis Cluster reached through the listed seed nodes (database 0) |
//!
//! The `redis` crate has no URL form for Sentinel or Cluster; these two
//! schemes are ours. Every host of the multi-host forms needs an explicit
//! port. Validate at startup with [`RedisTarget::parse`],
//! [`RedisTarget::check_shards`] and [`RedisTarget::check_layout`]. An
//! unsharded projection on a Cluster needs a hash tag in the key prefix
//! (e.g. `{oneprotect}:`) so every key is in one slot — the projection's Lua
//! scripts and the gateway's `MGET` touch several keys at once: a Cluster
//! for availability only. A sharded one (`shards > 1`, ADR-0024) takes a
//! prefix without a tag: each shard's keys carry the shard's own tag, and
//! announcements travel over sharded pub/sub
//! ([`RedisClient::shard_subscriber`]).
//!
//! ```
//! use oneprotect_redis::{RedisTarget, Topology};
//!
//! let t = RedisTarget::parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7000").unwrap();
//! assert_eq!(t.topology(), Topology::Cluster);
//! assert!(t.check_key_prefix("oneprotect:").is_err());
//! assert!(t.check_key_prefix("{oneprotect}:").is_ok());
//! ```

mod client;
mod target;

pub use client::{OpenError, RedisClient, RedisConnection, ShardSubscriber};
pub use target::{
    hash_tag, PrefixError, RedisTarget, ShardsError, Topology, UrlError, CLUSTER_SCHEME,
    SENTINEL_SCHEME,
};
