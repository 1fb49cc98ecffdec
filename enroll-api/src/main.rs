//! `oneprotect-enroll-api`: the enrollment service binary, a thin wrapper
//! over [`oneprotect_enroll_api::cli::main`].
//!
//! ```text
//! oneprotect-enroll-api                      # serve with defaults (dev: SQLite, generated CA)
//! oneprotect-enroll-api -c configs/enroll-api.toml tenant create --name acme
//! oneprotect-enroll-api admin-key create --tenant <id> --name ci
//! ```

fn main() -> std::process::ExitCode {
    oneprotect_enroll_api::cli::main()
}
