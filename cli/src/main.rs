//! `oneprotect`: the admin command line (see the crate docs and
//! `cli/README.md`). Exit statuses: `oneprotect --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use oneprotect_cli::args::Cli;
use oneprotect_cli::settings::ENV_ADMIN_KEY;
use oneprotect_cli::CliError;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version exit 0, usage errors 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let stdout = std::io::stdout();
    let is_terminal = stdout.is_terminal();
    let mut out = stdout.lock();
    match rt.block_on(oneprotect_cli::run(cli, &env, is_terminal, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing more to say.
        Err(CliError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let key = std::env::var(ENV_ADMIN_KEY).ok();
            eprintln!("error: {}", e.one_line(key.as_deref()));
            ExitCode::from(e.exit_code())
        }
    }
}
