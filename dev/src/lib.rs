//! OneProtect's one-process local stack and lifecycle demo.
//!
//! `oneprotect-dev up` runs the enroll-api, the gateway, a demo upstream and
//! the revocation state in **one process** on embedded defaults (SQLite under
//! `.data/dev`, a generated dev CA, an in-process revocation bus), prints the
//! addresses, a bootstrap tenant and admin key and what to try next, and
//! writes the same facts to `<data-dir>/stack.json`. `--database-url` moves
//! the records to PostgreSQL and `--redis` the revocation state to Redis —
//! the production paths — without changing anything else.
//!
//! `oneprotect-dev demo` drives the whole lifecycle against a running `up`
//! with the agent library and prints a transcript with timings.
//!
//! - [`stack`]: ports and the `stack.json` facts;
//! - [`up`]: assembling and stopping the stack;
//! - [`upstream`]: the demo upstream (echoes identity, verifies assertions);
//! - [`demo`]: the scripted lifecycle.
//!
//! Run it: `cargo run -p oneprotect-dev -- up`, then in another shell
//! `cargo run -p oneprotect-dev -- demo`.

pub mod demo;
pub mod stack;
pub mod up;
pub mod upstream;
