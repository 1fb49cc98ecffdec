//! Issue 18 §2, the admin command line: the real `oneprotect` binary against
//! a real enroll-api (in-process, SQLite, HTTPS with its dev certificate),
//! run with `std::process::Command` the way a tenant admin or a script would:
//! tokens, an agent that enrolls with a token the CLI made, agents, events,
//! revocation, CRLs (checked by `openssl crl`), CA material, status, the
//! config file, and the exit statuses scripts branch on. The admin key never
//! appears in anything the binary prints.
//!
//! `cargo test -p oneprotect-tests --test suite cli::` (needs `openssl`).

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::enroll::{exchange_body, openssl, openssl_csr, start_with, Db, Env};
use oneprotect_enroll_api::service;

const EX: &str = "/api/v1/agent-enrollment/exchange";

/// Which admin key the binary gets (through `ONEPROTECT_ADMIN_KEY`).
#[derive(Clone, Copy)]
enum Key<'a> {
    None,
    Good,
    This(&'a str),
}

struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.text()))
    }
}

/// The binary with a clean environment: its own HOME and XDG_CONFIG_HOME
/// (so no user config is read) and none of the caller's ONEPROTECT_*.
struct Cli {
    bin: PathBuf,
    home: PathBuf,
    key: String,
    /// Everything any run printed, for the "key never printed" check.
    printed: Arc<Mutex<Vec<String>>>,
}

impl Cli {
    fn new(env: &Env, home: &Path) -> Self {
        Cli {
            bin: oneprotect_tests::ensure_binary("oneprotect-cli", "oneprotect"),
            home: home.to_owned(),
            key: env.key.clone(),
            printed: Arc::default(),
        }
    }

    async fn run(&self, args: &[&str], key: Key<'_>) -> Result<Out> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env_remove("ONEPROTECT_SERVER")
            .env_remove("ONEPROTECT_CA_FILE")
            .env_remove("ONEPROTECT_ADMIN_KEY");
        match key {
            Key::None => {}
            Key::Good => {
                cmd.env("ONEPROTECT_ADMIN_KEY", &self.key);
            }
            Key::This(k) => {
                cmd.env("ONEPROTECT_ADMIN_KEY", k);
            }
        }
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        let out = Out {
            code: out.status.code().context("killed by a signal")?,
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let mut printed = self.printed.lock().unwrap();
        printed.push(out.text());
        printed.push(out.stderr.clone());
        Ok(out)
    }

    /// Runs and requires exit status `code`.
    async fn expect(&self, code: i32, args: &[&str], key: Key<'_>) -> Result<Out> {
        let out = self.run(args, key).await?;
        ensure!(
            out.code == code,
            "oneprotect {args:?}: exit {} (want {code})\nstdout: {}\nstderr: {}",
            out.code,
            out.text(),
            out.stderr
        );
        Ok(out)
    }

    fn assert_never_printed(&self, secret: &str) {
        assert!(!secret.is_empty());
        for text in self.printed.lock().unwrap().iter() {
            assert!(!text.contains(secret), "a secret was printed: {text}");
        }
    }
}

/// `openssl crl` reads `file` (`-inform DER` when `der`); returns its text.
fn openssl_crl_text(dir: &Path, file: &str, der: bool) -> Result<String> {
    let mut args = vec!["crl", "-in", file, "-noout", "-text"];
    if der {
        args.extend(["-inform", "DER"]);
    }
    openssl(&args, dir)
}

/// A serial as `openssl crl -text` prints it: upper-case hex without
/// leading zeros.
fn openssl_serial(hex: &str) -> String {
    let s = hex.trim_start_matches('0').to_ascii_uppercase();
    if s.is_empty() {
        "0".into()
    } else {
        s
    }
}

/// The tenant-admin flow: token → enrollment → agents → revocation → CRL,
/// plus every exit status a script can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_the_admin_api_with_documented_exit_codes() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |_| {}).await?;
    let addr = env
        .running
        .as_ref()
        .and_then(|r| r.https_addr)
        .context("https listener")?;
    let server = format!("https://127.0.0.1:{}", addr.port());
    let ca = env.dir.join("tls/dev-cert.pem");
    let ca = ca.to_str().context("utf-8 path")?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let cli = Cli::new(&env, w);
    let g = |rest: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--server".to_owned(),
            server.clone(),
            "--ca-file".into(),
            ca.into(),
        ];
        v.extend(rest.iter().map(|s| (*s).to_owned()));
        v
    };
    let run = |code: i32, rest: &'static [&'static str], key: Key<'static>| {
        let args = g(rest);
        let cli = &cli;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cli.expect(code, &refs, key).await
        }
    };
    // Owned arguments (ids) need the long form.
    macro_rules! cli {
        ($code:expr, $key:expr, $($arg:expr),+ $(,)?) => {{
            let rest: Vec<String> = vec![$($arg.to_string()),+];
            let args = g(&rest.iter().map(String::as_str).collect::<Vec<_>>());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cli.expect($code, &refs, $key).await?
        }};
    }

    // status: up, ready, the key accepted for its tenant.
    let st = run(0, &["status", "-o", "json"], Key::Good).await?.json();
    assert_eq!(st["healthz"]["status"], "ok", "{st}");
    assert_eq!(st["readyz"]["status"], "ready", "{st}");
    assert_eq!(st["admin_key"]["accepted"], true, "{st}");
    assert_eq!(st["admin_key"]["tenant_id"], env.tenant.to_string(), "{st}");
    let table = run(0, &["status", "-o", "table"], Key::None).await?.text();
    assert!(table.contains("readyz     ready"), "{table}");
    assert!(table.contains("no key configured"), "{table}");

    // tokens create, JSON: the server's document, secret included once.
    let created = run(
        0,
        &[
            "tokens",
            "create",
            "--ttl",
            "600",
            "--max-uses",
            "2",
            "--description",
            "cli-e2e",
            "--label",
            "site=lab",
            "-o",
            "json",
        ],
        Key::Good,
    )
    .await?
    .json();
    let token_id = created["token_id"].as_str().context("token_id")?.to_owned();
    assert!(
        created["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("opet_")),
        "{created}"
    );
    assert_eq!(created["status"], "active");
    assert_eq!(created["max_uses"], 2);
    assert_eq!(created["labels"], json!({"site": "lab"}));
    assert_eq!(created["tenant_id"], env.tenant.to_string());

    // tokens create, table: the secret clearly labelled, with the warning.
    let t = run(0, &["tokens", "create", "-o", "table"], Key::Good)
        .await?
        .text();
    assert!(
        t.contains("shown only now; it cannot be retrieved again"),
        "{t}"
    );
    let secret_line = t.lines().last().context("secret line")?.trim();
    assert!(secret_line.starts_with("opet_"), "{t}");

    // tokens create --secret-file: the secret only in a new 0600 file.
    let secret_path = w.join("token");
    let sp = secret_path.to_str().context("utf-8")?;
    let made = cli!(
        0,
        Key::Good,
        "tokens",
        "create",
        "--ttl",
        "600",
        "--secret-file",
        sp,
        "-o",
        "json"
    )
    .json();
    assert!(made.get("token").is_none(), "{made}");
    let enroll_token_id = made["token_id"].as_str().context("token_id")?.to_owned();
    let secret = std::fs::read_to_string(&secret_path)?.trim().to_owned();
    assert!(secret.starts_with("opet_"), "{secret}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_path)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // An existing file is never overwritten, and no token is made for it.
    let before = run(0, &["tokens", "list", "-o", "json"], Key::Good)
        .await?
        .json();
    cli!(1, Key::Good, "tokens", "create", "--secret-file", sp);
    let after = run(0, &["tokens", "list", "-o", "json"], Key::Good)
        .await?
        .json();
    assert_eq!(
        before["items"].as_array().map(Vec::len),
        after["items"].as_array().map(Vec::len)
    );

    // Invalid input: 422 → 5, with the problem on one stderr line.
    let bad = run(5, &["tokens", "create", "--ttl", "5"], Key::Good).await?;
    assert!(bad.stderr.contains("invalid_request"), "{}", bad.stderr);
    assert!(bad.stderr.contains("ttl_seconds"), "{}", bad.stderr);
    assert_eq!(bad.stderr.trim_end().lines().count(), 1, "{}", bad.stderr);

    // list: the created tokens, in JSON and in the table.
    let list = run(0, &["tokens", "list", "-o", "json"], Key::Good)
        .await?
        .json();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|t| t["token_id"].as_str())
        .collect();
    assert!(
        ids.contains(&token_id.as_str()) && ids.contains(&enroll_token_id.as_str()),
        "{list}"
    );
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.get("token").is_none()));
    let table = run(0, &["tokens", "ls", "-o", "table"], Key::Good)
        .await?
        .text();
    assert!(table.starts_with("TOKEN_ID"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&token_id))
        .context("token row")?;
    assert!(
        row.contains("active") && row.contains("0/2") && row.contains("cli-e2e"),
        "{row}"
    );
    // --all with a page size of 1 follows the cursor through every page.
    let all = run(
        0,
        &["tokens", "list", "--all", "--limit", "1", "-o", "json"],
        Key::Good,
    )
    .await?
    .json();
    assert_eq!(
        all["items"].as_array().map(Vec::len),
        list["items"].as_array().map(Vec::len)
    );

    // show, revoke, show again.
    let shown = cli!(0, Key::Good, "tokens", "show", &token_id, "-o", "json").json();
    assert_eq!(shown["token_id"], token_id.as_str());
    assert!(shown.get("token").is_none(), "{shown}");
    let revoked = cli!(0, Key::Good, "tokens", "revoke", &token_id, "-o", "json").json();
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    let shown = cli!(0, Key::Good, "tokens", "show", &token_id, "-o", "table").text();
    assert!(shown.contains("status       revoked"), "{shown}");
    let filtered = run(
        0,
        &["tokens", "list", "--status", "revoked", "-o", "json"],
        Key::Good,
    )
    .await?
    .json();
    let revoked_ids: Vec<&str> = filtered["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|t| t["token_id"].as_str())
        .collect();
    assert_eq!(revoked_ids, vec![token_id.as_str()]);

    // Not found → 3; a malformed id is a usage error → 2.
    let unknown = uuid::Uuid::new_v4().to_string();
    let nf = cli!(3, Key::Good, "tokens", "show", &unknown);
    assert!(nf.stderr.contains("not_found"), "{}", nf.stderr);
    cli!(3, Key::Good, "agents", "show", &unknown);
    run(2, &["tokens", "show", "not-an-id"], Key::Good).await?;

    // A refused key → 4; no key at all → 2 (a settings problem).
    let bad_key = format!("opak_{}", uuid::Uuid::new_v4().simple());
    let refused = cli!(4, Key::This(&bad_key), "tokens", "list");
    assert!(
        refused.stderr.contains("unauthorized"),
        "{}",
        refused.stderr
    );
    let missing = run(2, &["tokens", "list"], Key::None).await?;
    assert!(
        missing.stderr.contains("ONEPROTECT_ADMIN_KEY"),
        "{}",
        missing.stderr
    );
    // The key as a command-line value is refused, and not echoed.
    let on_cmdline = cli!(2, Key::None, "--admin-key", &bad_key, "tokens", "list");
    assert!(
        on_cmdline.stderr.contains("--admin-key-file"),
        "{}",
        on_cmdline.stderr
    );

    // Server down → 6 (connection refused), whatever the command.
    let down = format!("https://127.0.0.1:{}", oneprotect_tests::free_port());
    for args in [vec!["status"], vec!["tokens", "list"]] {
        let mut a = vec![
            "--server",
            down.as_str(),
            "--ca-file",
            ca,
            "--connect-timeout",
            "3",
        ];
        a.extend(args);
        let out = cli.expect(6, &a, Key::Good).await?;
        assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    }
    // A CA that did not issue the server's certificate: TLS refused → 1.
    let other_ca = w.join("other-ca.pem");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=other",
            "-days",
            "1",
            "-keyout",
            "other-ca.key",
            "-out",
            "other-ca.pem",
        ],
        w,
    )?;
    let tls = cli
        .expect(
            1,
            &[
                "--server",
                &server,
                "--ca-file",
                other_ca.to_str().unwrap(),
                "status",
            ],
            Key::None,
        )
        .await?;
    assert!(tls.stderr.contains("TLS"), "{}", tls.stderr);

    // An agent enrolls with the token the CLI wrote to the secret file.
    let csr = openssl_csr(&env.dir, "cli-agent")?;
    let mut body = exchange_body(&secret, &csr);
    body["agent"]["hostname"] = json!("cli-host");
    let enrolled = env.client.send("POST", EX, None, Some(body)).await?;
    ensure!(
        enrolled.status == 201,
        "exchange: {} {}",
        enrolled.status,
        enrolled.body
    );
    let agent_id = enrolled.body["agent_id"]
        .as_str()
        .context("agent_id")?
        .to_owned();
    let serial = enrolled.body["serial"]
        .as_str()
        .context("serial")?
        .to_owned();

    // agents list / show / events.
    let agents = run(0, &["agents", "list", "-o", "json"], Key::Good)
        .await?
        .json();
    assert_eq!(
        agents["items"][0]["agent_id"],
        agent_id.as_str(),
        "{agents}"
    );
    let table = run(
        0,
        &["agents", "list", "-o", "table", "--status", "active"],
        Key::Good,
    )
    .await?
    .text();
    let row = table
        .lines()
        .find(|l| l.starts_with(&agent_id))
        .context("agent row")?;
    assert!(
        row.contains("active") && row.contains("cli-host"),
        "{table}"
    );
    let shown = cli!(0, Key::Good, "agents", "show", &agent_id, "-o", "json").json();
    assert_eq!(shown["current_serial"], serial.as_str());
    assert_eq!(
        shown["spiffe_id"],
        format!(
            "spiffe://oneprotect.test/tenant/{}/agent/{agent_id}",
            env.tenant
        )
        .as_str()
    );
    let events = cli!(0, Key::Good, "agents", "events", &agent_id, "-o", "json").json();
    let types: Vec<&str> = events["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, vec!["agent.enrolled"], "{events}");

    // A CRL before the revocation does not list the serial.
    let crl_before = w.join("before.crl");
    cli!(0, Key::Good, "crl", "--out", crl_before.to_str().unwrap());
    let text = openssl_crl_text(w, "before.crl", true)?;
    assert!(!text.contains(&openssl_serial(&serial)), "{text}");

    // revoke: 0, then the agent, its events and the tenant's CRL show it.
    cli!(2, Key::Good, "agents", "revoke", &agent_id); // --reason is required
    let revoked = cli!(
        0,
        Key::Good,
        "agents",
        "revoke",
        &agent_id,
        "--reason",
        "cli e2e",
        "-o",
        "json"
    )
    .json();
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    assert_eq!(revoked["revocation_reason"], "cli e2e");
    let shown = cli!(0, Key::Good, "agents", "show", &agent_id, "-o", "table").text();
    assert!(shown.contains("revocation_reason      cli e2e"), "{shown}");
    let events = cli!(0, Key::Good, "agents", "events", &agent_id, "-o", "table").text();
    assert!(events.starts_with("OCCURRED_AT"), "{events}");
    assert!(
        events.contains("agent.enrolled") && events.contains("agent.revoked"),
        "{events}"
    );
    let revoked_list = run(
        0,
        &["agents", "list", "--status", "revoked", "-o", "json"],
        Key::Good,
    )
    .await?
    .json();
    assert_eq!(revoked_list["items"][0]["agent_id"], agent_id.as_str());

    // CRL, DER: to a file and to a pipe (stdout is not a terminal here).
    let der_path = w.join("tenant.crl");
    let out = cli!(0, Key::Good, "crl", "--out", der_path.to_str().unwrap());
    assert!(out.stdout.is_empty());
    let der = std::fs::read(&der_path)?;
    assert_eq!(der.first(), Some(&0x30), "DER SEQUENCE tag");
    let text = openssl_crl_text(w, "tenant.crl", true)?;
    assert!(
        text.contains(&openssl_serial(&serial)),
        "serial {serial} not in {text}"
    );
    let piped = run(0, &["crl"], Key::Good).await?;
    assert_eq!(piped.stdout.first(), Some(&0x30));
    // PEM, and the public endpoint by tenant id without any key.
    let tenant = env.tenant.to_string();
    let pem = cli!(0, Key::None, "crl", "--tenant", &tenant, "--format", "pem").text();
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");
    std::fs::write(w.join("tenant.pem"), &pem)?;
    assert!(openssl_crl_text(w, "tenant.pem", false)?.contains(&openssl_serial(&serial)));
    // The root's CRL and the chain file (tenant then root).
    let root = run(0, &["crl", "--root", "--format", "pem"], Key::None)
        .await?
        .text();
    assert!(root.starts_with("-----BEGIN X509 CRL-----"), "{root}");
    let chain = run(0, &["crl", "--chain"], Key::Good).await?.text();
    assert_eq!(
        chain.matches("-----BEGIN X509 CRL-----").count(),
        2,
        "{chain}"
    );
    run(2, &["crl", "--chain", "--format", "der"], Key::Good).await?;
    let nf = run(
        3,
        &["crl", "--tenant", "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10"],
        Key::None,
    )
    .await?;
    assert!(nf.stderr.contains("not_found"), "{}", nf.stderr);

    // CA material: the tenant CA and root as PEM; the public trust bundle.
    let bundle = run(0, &["ca", "show", "-o", "table"], Key::Good)
        .await?
        .text();
    assert_eq!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "{bundle}"
    );
    let ca_json = run(0, &["ca", "show", "-o", "json"], Key::Good)
        .await?
        .json();
    assert_eq!(ca_json["tenant_id"], tenant.as_str());
    let tb = w.join("trust.pem");
    cli!(
        0,
        Key::None,
        "ca",
        "trust-bundle",
        "--out",
        tb.to_str().unwrap()
    );
    let tb = std::fs::read_to_string(&tb)?;
    assert!(tb.starts_with("-----BEGIN CERTIFICATE-----"), "{tb}");
    assert_eq!(ca_json["root_pem"].as_str().map(str::trim), Some(tb.trim()));

    // -v names each request, never a header.
    let verbose = run(0, &["-v", "agents", "list", "-o", "json"], Key::Good).await?;
    assert!(
        verbose.stderr.contains("> GET https://127.0.0.1:"),
        "{}",
        verbose.stderr
    );
    assert!(verbose.stderr.contains("< 200 OK"), "{}", verbose.stderr);

    // Completions.
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let c = cli
            .expect(0, &["completions", shell], Key::None)
            .await?
            .text();
        assert!(
            c.contains("oneprotect") && c.contains("tokens"),
            "{shell}: {c}"
        );
    }

    cli.assert_never_printed(&env.key);
    cli.assert_never_printed(&bad_key);
    Ok(())
}

/// Settings from `cli.toml` (default location), overridden by the
/// environment and by flags; plain HTTP to loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_settings_from_config_env_and_flags() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |c| {
        c.listen.http = "127.0.0.1:0".into();
    })
    .await?;
    let running = env.running.as_ref().context("running")?;
    let https = running.https_addr.context("https")?;
    let http = running.http_addr.context("http")?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let cli = Cli::new(&env, w);

    // The default config file, with a key file beside it (0600).
    let dir = w.join("config/oneprotect");
    std::fs::create_dir_all(&dir)?;
    let key_file = dir.join("admin.key");
    std::fs::write(&key_file, format!("{}\n", env.key))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::write(
        dir.join("cli.toml"),
        format!(
            "server = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\nadmin_key_file = \"admin.key\"\n",
            https.port(),
            env.dir.join("tls/dev-cert.pem").display()
        ),
    )?;
    let st = cli
        .expect(0, &["status", "-o", "json"], Key::None)
        .await?
        .json();
    assert_eq!(st["admin_key"]["accepted"], true, "{st}");
    let list = cli
        .expect(0, &["tokens", "list", "-o", "json"], Key::None)
        .await?
        .json();
    assert!(list["items"].is_array(), "{list}");

    // The environment's key beats the config's key file; a flag beats both.
    let bad_key = format!("opak_{}", uuid::Uuid::new_v4().simple());
    cli.expect(4, &["tokens", "list"], Key::This(&bad_key))
        .await?;
    let kf = key_file.to_str().unwrap();
    cli.expect(
        0,
        &["--admin-key-file", kf, "tokens", "list"],
        Key::This(&bad_key),
    )
    .await?;
    // A flag's server beats the config's: nothing listens there → 6.
    let down = format!("https://127.0.0.1:{}", oneprotect_tests::free_port());
    cli.expect(6, &["--server", &down, "status"], Key::None)
        .await?;

    // Plain HTTP to loopback needs no flag.
    let plain = format!("http://127.0.0.1:{}", http.port());
    let st = cli
        .expect(0, &["--server", &plain, "status", "-o", "json"], Key::None)
        .await?
        .json();
    assert_eq!(st["readyz"]["status"], "ready", "{st}");

    // An explicit --config that does not exist, or has an unknown key: 2.
    let missing = w.join("missing.toml");
    cli.expect(
        2,
        &["--config", missing.to_str().unwrap(), "status"],
        Key::None,
    )
    .await?;
    let odd = w.join("odd.toml");
    std::fs::write(&odd, "admin_key = \"x\"\n")?;
    let out = cli
        .expect(2, &["--config", odd.to_str().unwrap(), "status"], Key::None)
        .await?;
    assert!(out.stderr.contains("admin_key"), "{}", out.stderr);

    cli.assert_never_printed(&env.key);
    cli.assert_never_printed(&bad_key);
    Ok(())
}

/// `oneprotect projection` against an enroll-api writing a real Redis
/// projection: reachable, built, a sequence that moves with a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_the_redis_projection() -> Result<()> {
    let stack = crate::support::stack::Stack::builder("cli_projection")
        .start()
        .await?;
    let addr = stack
        .running
        .as_ref()
        .and_then(|r| r.https_addr)
        .context("https listener")?;
    let work = tempfile::tempdir()?;
    let cli = Cli {
        bin: oneprotect_tests::ensure_binary("oneprotect-cli", "oneprotect"),
        home: work.path().to_owned(),
        key: stack.key.clone(),
        printed: Arc::default(),
    };
    let server = format!("https://127.0.0.1:{}", addr.port());
    let ca = stack.dir.join("tls/dev-cert.pem");
    let ca = ca.to_str().context("utf-8 path")?;
    let status = |out: Out| -> Value { out.json() };
    let args = [
        "--server",
        &server,
        "--ca-file",
        ca,
        "-o",
        "json",
        "projection",
    ];
    let mut before = Value::Null;
    // The enroll-api builds the projection at start, in the background.
    for _ in 0..200 {
        before = status(cli.expect(0, &args, Key::Good).await?);
        if before["built_at"].is_i64() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(before["backend"], "redis", "{before}");
    assert_eq!(before["reachable"], true, "{before}");
    assert!(before["built_at"].is_i64(), "{before}");
    let seq = before["sequence"].as_u64().context("sequence")?;

    // A token revocation writes no projection key; an agent's does. Enroll
    // one and revoke it: the sequence moves on.
    let token = stack.token().await?;
    let dir = tempfile::tempdir()?;
    let csr = openssl_csr(dir.path(), "agent")?;
    let enrolled = stack
        .client
        .send(
            "POST",
            "/api/v1/agent-enrollment/exchange",
            None,
            Some(exchange_body(&token, &csr)),
        )
        .await?;
    let agent = enrolled.body["agent_id"].as_str().context("agent_id")?;
    cli.expect(
        0,
        &[
            "--server",
            &server,
            "--ca-file",
            ca,
            "agents",
            "revoke",
            agent,
            "--reason",
            "test",
        ],
        Key::Good,
    )
    .await?;
    let mut after = Value::Null;
    for _ in 0..200 {
        after = status(cli.expect(0, &args, Key::Good).await?);
        if after["sequence"].as_u64() > Some(seq) && after["outbox_pending"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        after["sequence"].as_u64() > Some(seq),
        "{before} -> {after}"
    );
    assert_eq!(after["outbox_pending"], 0, "{after}");
    let table = cli
        .expect(
            0,
            &[
                "--server",
                &server,
                "--ca-file",
                ca,
                "-o",
                "table",
                "projection",
            ],
            Key::Good,
        )
        .await?
        .text();
    assert!(
        table.contains("reachable") && table.contains("true"),
        "{table}"
    );
    cli.expect(4, &args, Key::This("opak_wrong")).await?;
    cli.assert_never_printed(&stack.key);
    Ok(())
}
