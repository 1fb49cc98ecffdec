//! `oneprotect-enroll-api`: the enrollment service binary, a thin wrapper
//! over [`oneprotect_enroll_api::cli::main`].
//!
//! ```text
//! oneprotect-enroll-api                      # serve with defaults (dev: SQLite, generated CA)
//! oneprotect-enroll-api -c configs/enroll-api.toml tenant create --name acme
//! oneprotect-enroll-api admin-key create --tenant <id> --name ci
//! ```

/// mimalloc instead of the system allocator: an exchange allocates and
/// frees TLS, HTTP, JSON and certificate buffers (the system allocator's
/// functions were ≈ 10 % of the service's CPU under the enrollment bench;
/// bench/RESULTS.md). Build with `--no-default-features` for the system
/// allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    oneprotect_enroll_api::cli::main()
}
