//! Shared helpers for OneProtect's end-to-end and contract tests.
//!
//! Tests run against the real services: PostgreSQL and Redis on loopback
//! (see README.md, "Running the tests"; `scripts/test.sh` starts private
//! instances and sets the two variables below). The helpers here find them, fail
//! with a clear message when they are missing (never hang), and hand each test
//! its own Redis key prefix, database schema and free ports so tests can run
//! in parallel on a machine shared with others.
//!
//! Environment:
//! - `ONEPROTECT_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! - `ONEPROTECT_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`)

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The default Redis URL for tests.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The default PostgreSQL URL for tests.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The repository root (where `specs/`, `configs/` and `Cargo.toml` live).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    }
}

fn require_tcp(what: &str, url: &str, default_port: u16, hint: &str) {
    let hp = host_port(url, default_port);
    let addrs: Vec<SocketAddr> = hp
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("{what}: cannot resolve {hp}: {e}"))
        .collect();
    let reachable = addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "{what} is not reachable at {hp}. These tests need a real {what}. {hint}"
    );
}

/// The Redis URL for tests, after checking within 2 s that something listens
/// there. Panics with instructions when Redis is not running.
pub fn require_redis() -> String {
    let url =
        std::env::var("ONEPROTECT_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.into());
    require_tcp(
        "Redis",
        &url,
        6379,
        "Run the tests with `scripts/test.sh` (it starts a private Redis), \
         or point ONEPROTECT_TEST_REDIS_URL at one.",
    );
    url
}

/// The PostgreSQL URL for tests, after checking within 2 s that something
/// listens there. Panics with instructions when PostgreSQL is not running.
pub fn require_postgres() -> String {
    let url = std::env::var("ONEPROTECT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
    require_tcp(
        "PostgreSQL",
        &url,
        5432,
        "Run the tests with `scripts/test.sh` (it starts a private PostgreSQL), \
         or point ONEPROTECT_TEST_DATABASE_URL at one.",
    );
    url
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, safe for Redis key prefixes and
/// PostgreSQL schema names: `<label>_<pid>_<n>_<random>` in `[a-z0-9_]`.
pub fn unique_name(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let rnd = uuid_fragment();
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{label}_{}_{n}_{rnd}", std::process::id())
}

/// A unique Redis key prefix for one test, ending in `:`.
pub fn unique_redis_prefix(label: &str) -> String {
    format!("test:{}:", unique_name(label))
}

fn uuid_fragment() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago, and never handed out
/// before by this test process (the kernel may offer a port again as soon
/// as the probe closes it: two calls in a row once returned the same port
/// for a gateway's listener and its admin listener). Prefer binding port 0
/// and reading the address back; use this only for servers that must be
/// told a port before they bind.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port on 127.0.0.1");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The path of a workspace binary, building it first (debug profile, the
/// target directory this test runs from) so `cargo test --workspace` alone is
/// enough.
///
/// The first call builds every binary of the workspace at once
/// (`cargo build --workspace --bins`, what `scripts/test.sh` runs before the
/// tests, so there it is a no-op). One workspace-wide build resolves
/// features once: building package by package (`-p X --bin Y`) resolved
/// them per package and rebuilt hyper, redis, sqlx and pingora in another
/// feature set for each, which was most of the suite's wall time.
///
/// Cargo does not hold its build lock while tests run, so the nested
/// `cargo build` here does not deadlock; when the binaries are up to date it
/// costs one no-op cargo invocation per test process.
pub fn ensure_binary(package: &str, bin: &str) -> PathBuf {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<bool>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(false));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    // target/debug/deps/suite-<hash> → target/debug
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let path = profile_dir.join(bin);
    if *built {
        assert!(
            path.is_file(),
            "{} ({package}) is not a workspace binary",
            path.display()
        );
        return path;
    }
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", &target_dir);
    // `cargo test` gives this process CARGO_MANIFEST_DIR, CARGO_PKG_* and
    // the like. Passed on, they reach the nested build's build scripts:
    // ring's tracks CARGO_MANIFEST_DIR, so its fingerprint flipped between
    // this build and the next `cargo test`, and ring, rustls, pingora and
    // everything above them were rebuilt on every run.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR")
            || key == "OUT_DIR"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build --workspace --bins failed");
    *built = true;
    assert!(
        path.is_file(),
        "{} ({package}) missing after build",
        path.display()
    );
    path
}

/// Best-effort cleanup for a test's `Drop`: drops PostgreSQL `schema`
/// (CASCADE) and deletes the Redis keys matching `pattern`. Runs on its own
/// thread and runtime, so it works from inside an async test's drop; errors
/// are ignored (the names are unique, leftovers harm nothing).
pub fn drop_schema_and_keys(schema: &str, redis_url: &str, pattern: &str) {
    use sqlx::Connection as _;
    let url = require_postgres();
    let (schema, redis_url, pattern) =
        (schema.to_owned(), redis_url.to_owned(), pattern.to_owned());
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .execute(&mut c)
                    .await;
            }
            let Ok(client) = redis::Client::open(redis_url.as_str()) else {
                return;
            };
            let Ok(Ok(mut c)) = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                client.get_multiplexed_async_connection(),
            )
            .await
            else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
            }
        });
    })
    .join()
    .ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            host_port("redis://127.0.0.1:6380/0", 6379),
            "127.0.0.1:6380"
        );
        assert_eq!(host_port("postgres://u:p@db:5433/test", 5432), "db:5433");
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1/test", 5432),
            "127.0.0.1:5432"
        );
    }

    #[test]
    fn unique_names_differ_and_are_safe() {
        let a = unique_name("My-Test");
        let b = unique_name("My-Test");
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
    }
}
