//! `oneprotect-gateway --config <file>`: validates the config, then runs the
//! gateway until SIGTERM (graceful) or SIGINT (fast). SIGHUP reloads the
//! trust bundle.

use std::path::PathBuf;

use clap::Parser;

/// mimalloc instead of the system allocator: pingora allocates and frees
/// header maps, buffers and futures on every request (bench/RESULTS.md has
/// the measured difference). Build with `--no-default-features` for the
/// system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OneProtect mTLS gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        env = "ONEPROTECT_GATEWAY_CONFIG",
        default_value = "configs/gateway.toml"
    )]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Print the public half of the configured assertion signing key
    /// (`assertion.key_file`) as the enroll-api's `[[rotation.assertion.keys]]`
    /// entry, and exit.
    #[arg(long)]
    print_assertion_key: bool,
    /// Write a new Ed25519 assertion signing key (PKCS#8 PEM, mode 0600) to
    /// this file, print its public half as above, and exit. Refuses to
    /// overwrite an existing file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["check", "print_assertion_key"])]
    generate_assertion_key: Option<PathBuf>,
    /// The key id for --generate-assertion-key. Defaults to the key's RFC
    /// 7638 thumbprint (what the gateway uses when `assertion.kid` is unset).
    #[arg(long, requires = "generate_assertion_key")]
    kid: Option<String>,
    #[command(flatten)]
    log: oneprotect_logging::LogArgs,
}

/// The enroll-api configuration entry that trusts `signer`.
fn trusted_key_toml(signer: &oneprotect_identity::AssertionSigner) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key());
    format!(
        "[[rotation.assertion.keys]]\nkid = \"{}\"\npublic_key = \"{key}\"",
        signer.kid()
    )
}

fn generate_key(path: &std::path::Path, kid: Option<&str>) -> anyhow::Result<()> {
    use oneprotect_identity::AssertionSigner;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let no_key = |_| anyhow::anyhow!("cannot generate an Ed25519 key");
    let (_, pkcs8) = AssertionSigner::generate("new").map_err(no_key)?;
    let signer = match kid {
        Some(kid) => AssertionSigner::from_pkcs8(kid, &pkcs8),
        None => AssertionSigner::from_pkcs8_thumbprint_kid(&pkcs8),
    }
    .map_err(no_key)?;
    let pem = pem_encode("PRIVATE KEY", &pkcs8);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    println!("{}", trusted_key_toml(&signer));
    Ok(())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn main() {
    if let Err(e) = run() {
        // One clear line, no backtrace: this is an operator error. The
        // gateway's errors print their cause themselves (and keep it as
        // `source()`), so the alternate form would repeat it.
        eprintln!("oneprotect-gateway: {e}");
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    oneprotect_logging::init(
        args.log.log_format,
        oneprotect_logging::Stream::Stdout,
        "RUST_LOG",
        "info",
    );
    if let Some(path) = &args.generate_assertion_key {
        return generate_key(path, args.kid.as_deref());
    }
    // Every file is read here, once: --check, --print-assertion-key and the
    // gateway itself use the same prepared material.
    let prepared =
        oneprotect_gateway::Prepared::load(oneprotect_gateway::Config::read(&args.config)?)?;
    if args.print_assertion_key {
        let Some(signer) = &prepared.signer else {
            anyhow::bail!(
                "assertion.key_file is not set: an ephemeral key has no public half to pin"
            );
        };
        println!("{}", trusted_key_toml(signer));
        return Ok(());
    }
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let cfg = &prepared.config;
    tracing::info!(
        listen = %cfg.listener.listen,
        admin = %cfg.admin.listen,
        routes = cfg.routes.len(),
        "starting oneprotect-gateway"
    );
    let app = oneprotect_gateway::build(prepared)?;
    app.run_forever()
}
