//! Child processes under test: started on loopback, waited for until they
//! accept connections (bounded), killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A running child process, stopped on drop (SIGTERM, then SIGKILL after a
/// bounded wait).
pub struct Server {
    /// Name in reports.
    pub name: String,
    child: Child,
    /// How long [`Server::stop`] waits after SIGTERM on drop.
    stop_grace: Duration,
}

impl Server {
    /// Spawns `cmd` with stdout/stderr sent to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stop_grace: Duration::from_secs(5),
        })
    }

    /// Waits up to `grace` after SIGTERM on drop (a profiler writing its
    /// output needs longer than the default 5 s).
    pub fn set_stop_grace(&mut self, grace: Duration) {
        self.stop_grace = grace;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `timeout`) until `addr` accepts TCP connections; fails
    /// early if the process exits.
    pub fn wait_ready(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
        log: &Path,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: String = tail
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!(
                    "{} exited with {status} before listening on {addr}:\n{tail}",
                    self.name
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not listen on {addr} within {timeout:?} (log: {})",
            self.name,
            log.display()
        )
    }
}

impl Server {
    /// Stops the process: SIGTERM, then SIGKILL if it has not exited within
    /// `grace`. SIGTERM first lets a master process stop its own workers —
    /// a SIGKILLed nginx master leaves its workers running as orphans.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < grace {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(self.stop_grace);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Finds an executable on PATH (or the usual sbin directories).
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The words of environment variable `var` (e.g. `valgrind
/// --tool=callgrind --callgrind-out-file=/tmp/cg.%p`): a command the server
/// under test is run under, for profiling. Empty when unset.
pub fn wrapper(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Spawns `cmd` (made by [`command`] with `wrapper`) as server `name`
/// logging to `log`, and waits until it listens on `listen`: within
/// `ready_secs`, or 180 s under a profiler wrapper (which starts the binary
/// many times slower, and also gets 120 s to stop). `ready_log` is the log
/// shown if it never listens.
pub fn spawn_ready(
    name: &str,
    cmd: Command,
    log: &Path,
    listen: std::net::SocketAddr,
    wrapper: &[String],
    ready_secs: u64,
    ready_log: &Path,
) -> anyhow::Result<Server> {
    let mut server = Server::spawn(name, cmd, log)?;
    let ready = if wrapper.is_empty() { ready_secs } else { 180 };
    if !wrapper.is_empty() {
        server.set_stop_grace(Duration::from_secs(120));
    }
    server.wait_ready(listen, Duration::from_secs(ready), ready_log)?;
    Ok(server)
}

/// The command that runs `bin`: under `wrapper` when one is given (its
/// figures are then the profiler's, not the machine's), else pinned to CPU
/// `cpus` (a `taskset -c` list: `0`, `0,1`, `0-1`) with `taskset` when both
/// are available.
pub fn command(bin: &Path, cpus: Option<&str>, wrapper: &[String]) -> Command {
    if let Some((first, rest)) = wrapper.split_first() {
        let mut cmd = Command::new(first);
        cmd.args(rest).arg(bin);
        return cmd;
    }
    match (cpus, which("taskset")) {
        (Some(c), Some(taskset)) => {
            let mut cmd = Command::new(taskset);
            cmd.arg("-c").arg(c).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

/// A sibling binary of the running one (e.g. `oneprotect-gateway` next to
/// `oneprotect-bench` in `target/release`).
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let mut dirs = vec![me.parent().map(Path::to_path_buf)];
    // Test binaries live in target/<profile>/deps.
    dirs.push(me.parent().and_then(Path::parent).map(Path::to_path_buf));
    for d in dirs.into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (cargo build --release -p oneprotect-gateway)",
        me.display()
    )
}
