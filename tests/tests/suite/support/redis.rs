//! `redis-server` children on free loopback ports: [`RedisChild`] for a
//! plain throwaway server, [`RedisProc`] for cluster nodes and Sentinels.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpStream;

use super::fleet::POLLS;

/// A plain `redis-server` (no persistence) on `port`, killed on drop or by
/// [`RedisChild::stop`].
pub(crate) struct RedisChild {
    child: tokio::process::Child,
    pub(crate) port: u16,
}

impl RedisChild {
    pub(crate) async fn start(port: u16) -> Self {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Self { child, port };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on {port} did not start");
    }

    pub(crate) async fn stop(mut self) {
        self.child.kill().await.unwrap();
        let _ = self.child.wait().await;
    }
}

/// A `redis-server` child (data node, cluster node or Sentinel) on
/// 127.0.0.1, killed on drop.
pub(crate) struct RedisProc {
    pub(crate) port: u16,
    child: Option<tokio::process::Child>,
}

impl RedisProc {
    /// Starts `redis-server [conf] --port P --bind 127.0.0.1 … extra` in
    /// `dir` and waits (bounded) until it accepts connections.
    pub(crate) async fn start(dir: &Path, conf: Option<&Path>, extra: &[&str]) -> Result<Self> {
        let port = oneprotect_tests::free_port();
        let mut cmd = tokio::process::Command::new("redis-server");
        if let Some(c) = conf {
            cmd.arg(c);
        }
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(std::fs::File::create(
                dir.join(format!("redis-{port}.log")),
            )?)
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawn redis-server")?;
        let p = Self {
            port,
            child: Some(child),
        };
        for _ in 0..POLLS {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(p);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!(
            "redis-server on port {port} did not start (log: {})",
            dir.display()
        )
    }

    /// Kills the server and waits for it to exit.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // Our own child, by its handle.
            let _ = c.start_kill();
        }
    }
}
