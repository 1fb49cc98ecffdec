//! `oneprotect-bench`: the load harness operators use to size a gateway
//! fleet, and we use to hold the performance goals.
//!
//! Every figure is reported next to a baseline measured in the same run —
//! the upstream directly, nginx with `ssl_verify_client on` and HAProxy with
//! `verify required` (both with every CA's CRL) when they are installed — and
//! as work per *server* CPU-second (from `/proc`), because
//! the load generator shares the machine's cores with the server under test.
//!
//! Scenarios ([`scenarios`]): keep-alive (HTTP/1.1 and h2, one agent per
//! connection), fixed-rate latency (coordinated-omission corrected), full and
//! resumed handshakes, idle-connection memory, and revocation propagation.
//! Output ([`report`]): JSON, a Markdown table and an SVG plot.
//!
//! Run recipe:
//!
//! ```text
//! cargo build --release -p oneprotect-gateway -p oneprotect-bench
//! target/release/oneprotect-bench all --quick      # < 2 minutes
//! target/release/oneprotect-bench all              # full size, for bench/RESULTS.md
//! ```
//!
//! All traffic goes to 127.0.0.1; every run is bounded in time and count.

pub mod child;
pub mod cpu;
pub mod enroll;
pub mod gateway;
pub mod haproxy;
pub mod load;
pub mod nginx;
pub mod pki;
pub mod report;
pub mod scenarios;
pub mod upstream;
