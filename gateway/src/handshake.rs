//! A configurable deadline for the TLS handshake.
//!
//! pingora 0.9.1 bounds every handshake by a fixed 60 s and has no knob for
//! it. The gateway bounds it tighter (`listener.handshake_timeout_ms`):
//!
//! - pingora's pre-TLS callback registers each accepted socket (its file
//!   descriptor, its two addresses and a generation number) with a deadline;
//! - [`crate::serve::GatewayApp`] deregisters it when the connection arrives
//!   handshaken;
//! - a reaper task shuts down (`shutdown(2)`, both directions) each socket
//!   still registered at its deadline (within 100 ms: it wakes at most ten
//!   times a second, whatever the accept rate), which makes the pending
//!   handshake read end and pingora drop the connection.
//!
//! The address check makes the reaper touch only the socket it registered: a
//! descriptor closed after a failed handshake and reused by another socket
//! (a new client, an upstream or Redis connection) has another pair of
//! addresses (a TCP connection is named by its two addresses).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr as StdAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// A TCP connection's name: its local and peer addresses.
type Name = (StdAddr, StdAddr);

#[derive(Debug, Clone, Copy)]
struct Pending {
    generation: u64,
    name: Name,
}

#[derive(Debug, Default)]
struct State {
    next_generation: u64,
    /// Sockets whose handshake has not finished, by descriptor.
    pending: HashMap<RawFd, Pending>,
    /// Registrations in deadline order (one timeout for all: FIFO).
    queue: VecDeque<(Instant, RawFd, u64)>,
}

/// The handshake deadline: the pre-TLS callback, the deregistration and the
/// reaper share it.
#[derive(Debug)]
pub struct HandshakeDeadline {
    timeout: Duration,
    state: Mutex<State>,
    metrics: Metrics,
}

impl HandshakeDeadline {
    /// A deadline of `timeout` per handshake.
    pub fn new(timeout: Duration, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            state: Mutex::new(State::default()),
            metrics,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every unlock; a panic elsewhere
        // while holding the lock does not make it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an accepted socket.
    pub fn register(&self, fd: RawFd, digest: &SocketDigest) {
        let Some(name) = name_of(digest) else { return };
        let deadline = Instant::now() + self.timeout;
        let mut st = self.state();
        st.next_generation += 1;
        let generation = st.next_generation;
        st.pending.insert(fd, Pending { generation, name });
        st.queue.push_back((deadline, fd, generation));
    }

    /// The socket's handshake finished: it is no longer watched.
    pub fn handshaken(&self, fd: RawFd) {
        self.state().pending.remove(&fd);
    }

    /// Shuts down every socket registered before `now - timeout` whose
    /// handshake has not finished. Returns how many.
    fn reap(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        {
            let mut st = self.state();
            while let Some(&(deadline, fd, generation)) = st.queue.front() {
                if deadline > now {
                    break;
                }
                st.queue.pop_front();
                if let Some(p) = st.pending.get(&fd).copied() {
                    if p.generation == generation {
                        st.pending.remove(&fd);
                        expired.push((fd, p.name));
                    }
                }
            }
        }
        let mut n = 0;
        for (fd, registered) in expired {
            // Only the socket registered under this descriptor.
            if name_of(&SocketDigest::from_raw_fd(fd)) == Some(registered)
                && nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both).is_ok()
            {
                n += 1;
            }
        }
        if n > 0 {
            self.metrics
                .handshake_failures
                .with_label_values(&["timeout"])
                .inc_by(n as u64);
        }
        n
    }

    /// The earliest registered deadline, if any.
    fn next_deadline(&self) -> Option<Instant> {
        self.state().queue.front().map(|&(d, _, _)| d)
    }
}

fn name_of(digest: &SocketDigest) -> Option<Name> {
    match (digest.local_addr()?, digest.peer_addr()?) {
        (SocketAddr::Inet(local), SocketAddr::Inet(peer)) => Some((*local, *peer)),
        _ => None,
    }
}

/// pingora's pre-TLS hook: registers the socket.
pub struct RegisterHandshake(pub Arc<HandshakeDeadline>);

#[async_trait]
impl PreTlsProcess for RegisterHandshake {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        use std::os::fd::AsRawFd;
        if let Some(digest) = stream.get_socket_digest() {
            self.0.register(stream.as_raw_fd(), &digest);
        }
        Ok(())
    }
}

/// How often the reaper may wake up at most.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// The reaper, as a pingora background service.
pub struct Reaper(pub Arc<HandshakeDeadline>);

#[async_trait]
impl BackgroundService for Reaper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let idle_poll = self.0.timeout.max(Duration::from_millis(100));
        loop {
            // At most one wake-up per `REAP_EVERY`, whatever the accept rate:
            // a deadline is kept within that much.
            let soonest = Instant::now() + REAP_EVERY;
            let wake = self
                .0
                .next_deadline()
                .map_or(Instant::now() + idle_poll, |d| d.max(soonest));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => return,
            }
            self.0.reap(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_stalled_socket_is_shut_down_and_a_handshaken_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stalled_client = std::net::TcpStream::connect(addr).unwrap();
        let (stalled, _) = listener.accept().unwrap();
        let mut done_client = std::net::TcpStream::connect(addr).unwrap();
        let (done, _) = listener.accept().unwrap();

        let d = HandshakeDeadline::new(Duration::from_secs(5), Metrics::new());
        let t0 = Instant::now();
        d.register(
            stalled.as_raw_fd(),
            &SocketDigest::from_raw_fd(stalled.as_raw_fd()),
        );
        d.register(
            done.as_raw_fd(),
            &SocketDigest::from_raw_fd(done.as_raw_fd()),
        );
        d.handshaken(done.as_raw_fd());
        assert_eq!(d.reap(t0), 0, "nothing is due before the deadline");
        assert_eq!(d.reap(t0 + Duration::from_secs(6)), 1);

        // The stalled socket's peer sees the end of the stream; the other
        // stays open.
        let mut buf = [0u8; 1];
        assert_eq!(stalled_client.read(&mut buf).unwrap(), 0);
        done_client
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(done_client.read(&mut buf).is_err(), "still open");
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn a_reused_descriptor_is_left_alone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _c1 = std::net::TcpStream::connect(addr).unwrap();
        let (first, _) = listener.accept().unwrap();
        let d = HandshakeDeadline::new(Duration::from_secs(5), Metrics::new());
        let t0 = Instant::now();
        let fd = first.as_raw_fd();
        d.register(fd, &SocketDigest::from_raw_fd(fd));
        // The failed handshake closes the socket; its descriptor number goes
        // to another socket that was never registered.
        drop(first);
        let mut c2 = std::net::TcpStream::connect(addr).unwrap();
        let (second, _) = listener.accept().unwrap();
        if second.as_raw_fd() == fd {
            assert_eq!(d.reap(t0 + Duration::from_secs(6)), 0);
            c2.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            assert!(c2.read(&mut [0u8; 1]).is_err(), "still open");
        } else {
            // The descriptor went elsewhere: nothing to shut down either.
            assert_eq!(d.reap(t0 + Duration::from_secs(6)), 0);
        }
    }
}
