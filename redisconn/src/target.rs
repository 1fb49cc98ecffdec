//! Parsing `redis_url` into a [`RedisTarget`], and the key-prefix rule of
//! each topology. No I/O.

use std::fmt;

use redis::{ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

/// The scheme of a Sentinel URL.
pub const SENTINEL_SCHEME: &str = "redis+sentinel";
/// The scheme of a Cluster URL.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// How Redis is deployed behind one `redis_url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://`, or whatever else the `redis` crate accepts
    /// for one node).
    Single,
    /// A master found through Sentinels (`redis+sentinel://`).
    Sentinel,
    /// A Redis Cluster (`redis+cluster://`).
    Cluster,
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::Single => "single node",
            Topology::Sentinel => "sentinel",
            Topology::Cluster => "cluster",
        })
    }
}

/// Why a `redis_url` was refused. No variant carries a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// A single-node URL the `redis` crate refused.
    #[error(
        "not a Redis URL ({0}); expected redis://[user:pass@]host:port[/db], \
         redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db] or \
         redis+cluster://[user:pass@]host:port[,host:port…]"
    )]
    Single(String),
    /// No host listed after `://`.
    #[error("{0}:// lists no host: give at least one host:port")]
    NoHosts(&'static str),
    /// A host without an explicit port.
    #[error("{scheme}:// host {host:?} has no port: every host needs an explicit :port")]
    MissingPort {
        /// The URL's scheme.
        scheme: &'static str,
        /// The host as written (without credentials).
        host: String,
    },
    /// A host the `redis` crate could not parse.
    #[error("{scheme}:// host {host:?}: {reason}")]
    Host {
        /// The URL's scheme.
        scheme: &'static str,
        /// The host as written (without credentials).
        host: String,
        /// The `redis` crate's reason.
        reason: String,
    },
    /// A Sentinel URL without a master name.
    #[error(
        "redis+sentinel:// needs the master name as its path, \
         e.g. redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
    )]
    NoMasterName,
    /// A master name with characters outside `[A-Za-z0-9._-]`.
    #[error("redis+sentinel:// master name {0:?} may only contain A-Z a-z 0-9 . _ -")]
    MasterName(String),
    /// A database number that is not a non-negative integer.
    #[error("redis+sentinel:// database {0:?} is not a non-negative integer")]
    Db(String),
    /// More path than the topology takes.
    #[error("{0}")]
    Path(&'static str),
    /// Query parameters or a fragment.
    #[error("{0}:// URLs take no query parameters or fragment")]
    Query(&'static str),
}

/// Why a key prefix does not fit the topology and shard count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// An unsharded projection on a Cluster without a hash tag.
    #[error(
        "key prefix {prefix:?} has no hash tag: with shards = 1 on a Redis Cluster every key \
         must live in one hash slot (the projection is written with multi-key scripts and read \
         with MGET), so the prefix must contain a non-empty {{…}} tag, e.g. \"{{oneprotect}}:\" \
         (or set shards > 1 to spread the projection over the cluster)"
    )]
    NoHashTag {
        /// The prefix (at most 128 characters of it).
        prefix: String,
    },
    /// A sharded projection whose prefix carries a hash tag (it would put
    /// every shard in the prefix's slot).
    #[error(
        "key prefix {prefix:?} has a hash tag: with shards > 1 each shard's own {{…}} tag must \
         decide the slot, so the prefix must not contain one, e.g. \"oneprotect:\""
    )]
    HashTagWithShards {
        /// The prefix (at most 128 characters of it).
        prefix: String,
    },
}

/// Why a shard count does not fit the topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardsError {
    /// Out of `1..=max`.
    #[error("must be 1..={max}")]
    Range {
        /// The largest shard count.
        max: u16,
    },
    /// More than one shard on a single node or Sentinel.
    #[error(
        "{shards} shards need a Redis Cluster (redis+cluster://): a single node or Sentinel \
         master holds every key anyway, so shard the projection only on a cluster"
    )]
    NeedsCluster {
        /// The configured count.
        shards: u16,
    },
}

/// A parsed `redis_url`: which topology, and the nodes to start from.
#[derive(Clone)]
pub struct RedisTarget {
    pub(crate) kind: Kind,
}

#[derive(Clone)]
pub(crate) enum Kind {
    Single(ConnectionInfo),
    Sentinel {
        /// The Sentinels, without credentials.
        sentinels: Vec<ConnectionInfo>,
        /// The monitored master's name.
        master: String,
        /// Credentials and database for the master.
        node: RedisConnectionInfo,
    },
    Cluster {
        /// The seed nodes, with credentials.
        nodes: Vec<ConnectionInfo>,
    },
}

impl fmt::Debug for RedisTarget {
    // Addresses only: credentials never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs = |v: &[ConnectionInfo]| -> Vec<String> {
            v.iter().map(|i| i.addr().to_string()).collect()
        };
        match &self.kind {
            Kind::Single(i) => f
                .debug_struct("Single")
                .field("addr", &i.addr().to_string())
                .finish_non_exhaustive(),
            Kind::Sentinel {
                sentinels, master, ..
            } => f
                .debug_struct("Sentinel")
                .field("sentinels", &addrs(sentinels))
                .field("master", master)
                .finish_non_exhaustive(),
            Kind::Cluster { nodes } => f
                .debug_struct("Cluster")
                .field("nodes", &addrs(nodes))
                .finish_non_exhaustive(),
        }
    }
}

impl RedisTarget {
    /// Parses `url`:
    ///
    /// - `redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db]`:
    ///   the listed hosts are Sentinels (no credentials are sent to them);
    ///   `user:pass` and `db` are for the master they name;
    /// - `redis+cluster://[user:pass@]host:port[,host:port…]`: seed nodes of
    ///   a Redis Cluster (database 0 only), `user:pass` for every node;
    /// - anything else is handed to the `redis` crate as one node
    ///   (`redis://[user:pass@]host[:port][/db]`, as before).
    ///
    /// Hosts in the multi-host forms need an explicit port; IPv6 hosts are
    /// written in brackets (`[::1]:7000`); credentials are percent-encoded
    /// as in any URL. Query parameters are refused there.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let scheme = url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        let kind = match scheme.as_str() {
            SENTINEL_SCHEME => parse_sentinel(after_scheme(url))?,
            CLUSTER_SCHEME => parse_cluster(after_scheme(url))?,
            _ => Kind::Single(
                url.into_connection_info()
                    .map_err(|e| UrlError::Single(e.to_string()))?,
            ),
        };
        Ok(Self { kind })
    }

    /// The topology.
    pub fn topology(&self) -> Topology {
        match self.kind {
            Kind::Single(_) => Topology::Single,
            Kind::Sentinel { .. } => Topology::Sentinel,
            Kind::Cluster { .. } => Topology::Cluster,
        }
    }

    /// Checks that `prefix` works on this topology unsharded: on a Cluster
    /// it must contain a hash tag, so that every key (`{prefix}…`) hashes to
    /// the same slot; other topologies take any prefix.
    pub fn check_key_prefix(&self, prefix: &str) -> Result<(), PrefixError> {
        self.check_layout(prefix, 1)
    }

    /// Checks that `prefix` works on this topology with `shards` shards
    /// (validate the count first with [`RedisTarget::check_shards`]):
    /// unsharded as [`RedisTarget::check_key_prefix`]; sharded, the prefix
    /// must have no hash tag (each shard's tag decides its slot).
    pub fn check_layout(&self, prefix: &str, shards: u16) -> Result<(), PrefixError> {
        let shown = || prefix.chars().take(128).collect();
        match (shards > 1, hash_tag(prefix).is_some()) {
            (true, true) => Err(PrefixError::HashTagWithShards { prefix: shown() }),
            (false, false) if self.topology() == Topology::Cluster => {
                Err(PrefixError::NoHashTag { prefix: shown() })
            }
            _ => Ok(()),
        }
    }

    /// Checks a shard count: `1..=max`, and more than one only on a Cluster.
    pub fn check_shards(&self, shards: u16, max: u16) -> Result<(), ShardsError> {
        if !(1..=max).contains(&shards) {
            return Err(ShardsError::Range { max });
        }
        if shards > 1 && self.topology() != Topology::Cluster {
            return Err(ShardsError::NeedsCluster { shards });
        }
        Ok(())
    }
}

/// The hash tag Redis Cluster would hash every key starting with `prefix`
/// by (the key schema's own rule, `oneprotect_identity::revocation`).
pub use oneprotect_identity::revocation::hash_tag;

fn after_scheme(url: &str) -> &str {
    url.split_once("://").map_or("", |(_, r)| r)
}

/// Splits `[userinfo@]hosts[/path]` and parses each host through the
/// `redis` crate (`redis://[userinfo@]host/`), so addresses, IPv6 and
/// percent-encoded credentials follow its rules.
fn nodes(
    scheme: &'static str,
    rest: &str,
    with_credentials: bool,
) -> Result<(Vec<ConnectionInfo>, String, Option<String>), UrlError> {
    if rest.contains(['?', '#']) {
        return Err(UrlError::Query(scheme));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_owned()), h),
        None => (None, authority),
    };
    if hosts.is_empty() {
        return Err(UrlError::NoHosts(scheme));
    }
    let mut out = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
        });
        if !has_port {
            return Err(UrlError::MissingPort {
                scheme,
                host: host.to_owned(),
            });
        }
        let creds = match (&userinfo, with_credentials) {
            (Some(u), true) => format!("{u}@"),
            _ => String::new(),
        };
        let info = format!("redis://{creds}{host}/")
            .into_connection_info()
            .map_err(|e| UrlError::Host {
                scheme,
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        out.push(info);
    }
    Ok((out, path.to_owned(), userinfo))
}

fn parse_sentinel(rest: &str) -> Result<Kind, UrlError> {
    let (sentinels, path, userinfo) = nodes(SENTINEL_SCHEME, rest, false)?;
    let mut parts = path.split('/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() {
        return Err(UrlError::NoMasterName);
    }
    if !master
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(UrlError::MasterName(master.chars().take(64).collect()));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| UrlError::Db(d.chars().take(32).collect()))?,
    };
    if parts.any(|p| !p.is_empty()) {
        return Err(UrlError::Path(
            "redis+sentinel:// takes /master or /master/db as its path, nothing more",
        ));
    }
    // The master's credentials, decoded by the redis crate's own rules.
    let mut node = RedisConnectionInfo::default().set_db(db);
    if let Some(u) = userinfo {
        let parsed = format!("redis://{u}@localhost:1/")
            .into_connection_info()
            .map_err(|e| UrlError::Host {
                scheme: SENTINEL_SCHEME,
                host: "(credentials)".into(),
                reason: e.to_string(),
            })?;
        let s = parsed.redis_settings();
        if let Some(user) = s.username() {
            node = node.set_username(user);
        }
        if let Some(pass) = s.password() {
            node = node.set_password(pass);
        }
    }
    Ok(Kind::Sentinel {
        sentinels,
        master: master.to_owned(),
        node,
    })
}

fn parse_cluster(rest: &str) -> Result<Kind, UrlError> {
    let (nodes, path, _) = nodes(CLUSTER_SCHEME, rest, true)?;
    if !path.is_empty() {
        return Err(UrlError::Path(
            "redis+cluster:// takes no path: a Redis Cluster has only database 0",
        ));
    }
    Ok(Kind::Cluster { nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        match RedisTarget::parse(url) {
            Ok(t) => panic!("{url} parsed as {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn single_node_urls_parse_as_before() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://:pw@h:6380/2",
            "redis://h",
        ] {
            let t = RedisTarget::parse(url).unwrap();
            assert_eq!(t.topology(), Topology::Single, "{url}");
        }
        assert!(err("http://h:1").contains("not a Redis URL"));
        assert!(err("nonsense").contains("not a Redis URL"));
    }

    #[test]
    fn sentinel_urls() {
        let t =
            RedisTarget::parse("redis+sentinel://u:p%40ss@10.0.0.1:26379,[::1]:26380/mymaster/3")
                .unwrap();
        assert_eq!(t.topology(), Topology::Sentinel);
        let Kind::Sentinel {
            sentinels,
            master,
            node,
        } = &t.kind
        else {
            panic!("not sentinel")
        };
        assert_eq!(sentinels.len(), 2);
        assert_eq!(master, "mymaster");
        assert_eq!(node.db(), 3);
        assert_eq!(node.username(), Some("u"));
        assert_eq!(node.password(), Some("p@ss"));
        // The Sentinels get no credentials.
        assert!(sentinels
            .iter()
            .all(|s| s.redis_settings().password().is_none()));
        // Credentials never reach Debug.
        assert!(!format!("{t:?}").contains("p@ss"));
        assert!(!format!("{t:?}").contains("p%40ss"));

        let t = RedisTarget::parse("REDIS+SENTINEL://h:26379/m").unwrap();
        assert_eq!(t.topology(), Topology::Sentinel);
        assert!(err("redis+sentinel://h:26379").contains("master name"));
        assert!(err("redis+sentinel://h:26379/").contains("master name"));
        assert!(err("redis+sentinel://h/m").contains("no port"));
        assert!(err("redis+sentinel:///m").contains("lists no host"));
        assert!(err("redis+sentinel://h:1,/m").contains("no port"));
        assert!(err("redis+sentinel://h:1/m/x").contains("database"));
        assert!(err("redis+sentinel://h:1/m/-1").contains("database"));
        assert!(err("redis+sentinel://h:1/m/0/x").contains("nothing more"));
        assert!(err("redis+sentinel://h:1/m a").contains("master name"));
        assert!(err("redis+sentinel://h:1/m?x=1").contains("query"));
    }

    #[test]
    fn cluster_urls() {
        let t = RedisTarget::parse("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!(t.topology(), Topology::Cluster);
        let Kind::Cluster { nodes } = &t.kind else {
            panic!("not cluster")
        };
        assert_eq!(nodes.len(), 2);
        assert!(nodes
            .iter()
            .all(|n| n.redis_settings().password() == Some("pw")));
        assert!(!format!("{t:?}").contains("pw"));
        assert!(RedisTarget::parse("redis+cluster://h:7000/").is_ok());
        assert!(err("redis+cluster://h:7000/0").contains("no path"));
        assert!(err("redis+cluster://h").contains("no port"));
        assert!(err("redis+cluster://").contains("lists no host"));
        assert!(err("redis+cluster://h:99999").contains("h:99999"));
    }

    #[test]
    fn cluster_prefixes_need_a_hash_tag() {
        let cluster = RedisTarget::parse("redis+cluster://h:7000").unwrap();
        let single = RedisTarget::parse("redis://h:6379").unwrap();
        for ok in ["{oneprotect}:", "x:{t}:", "{a}", "{a}{b}"] {
            assert!(cluster.check_key_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["oneprotect:", "{}:", "{oneprotect:", "}x{", "x{}{y}"] {
            let e = cluster.check_key_prefix(bad).unwrap_err().to_string();
            assert!(e.contains("hash tag"), "{bad}: {e}");
            assert!(single.check_key_prefix(bad).is_ok());
        }
        assert_eq!(hash_tag("p:{ten}:x"), Some("ten"));
    }

    #[test]
    fn sharded_layouts_need_a_cluster_and_an_untagged_prefix() {
        let cluster = RedisTarget::parse("redis+cluster://h:7000").unwrap();
        let single = RedisTarget::parse("redis://h:6379").unwrap();
        assert!(cluster.check_layout("oneprotect:", 16).is_ok());
        let e = cluster.check_layout("{op}:", 16).unwrap_err().to_string();
        assert!(e.contains("must not contain"), "{e}");
        assert!(cluster.check_layout("{op}:", 1).is_ok());
        assert!(cluster.check_layout("op:", 1).is_err());
        assert!(cluster.check_shards(16, 1024).is_ok());
        assert_eq!(
            cluster.check_shards(0, 1024),
            Err(ShardsError::Range { max: 1024 })
        );
        assert!(cluster.check_shards(1025, 1024).is_err());
        assert!(single.check_shards(1, 1024).is_ok());
        let e = single.check_shards(4, 1024).unwrap_err().to_string();
        assert!(e.contains("need a Redis Cluster"), "{e}");
    }
}
