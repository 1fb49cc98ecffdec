//! The commands: each makes its request(s) and writes the answer to `out`
//! as JSON (the server's, unchanged) or as a table.

use std::io::Write;
use std::path::Path;

use clap::ValueEnum;
use oneprotect_identity::{AgentId, TenantId, TokenId};
use serde_json::{json, Value};

use crate::args::{
    AgentCommand, AgentListArgs, CaCommand, CrlArgs, CrlFormat, PageArgs, TokenCommand,
    TokenCreateArgs, TokenListArgs,
};
use crate::client::{Client, ClientOptions, Response};
use crate::error::CliError;
use crate::output::{self, Format};
use crate::settings::Settings;

const TOKENS: &str = "/api/v1/agent-enrollment/tokens";
const AGENTS: &str = "/api/v1/agents";
/// The most pages `--all` follows (500 items each), against a server that
/// never ends a listing.
const MAX_PAGES: usize = 10_000;

/// What every command needs.
#[derive(Debug)]
pub struct Ctx {
    /// Server, CA and key sources.
    pub settings: Settings,
    /// How answers are printed.
    pub format: Format,
    /// Timeouts and transport policy.
    pub opts: ClientOptions,
    /// Whether stdout is a terminal (binary output is refused there).
    pub stdout_is_terminal: bool,
}

impl Ctx {
    fn client(&self) -> Result<Client, CliError> {
        Client::new(
            self.settings.server_url()?,
            self.settings.ca_file.as_deref(),
            &self.opts,
        )
    }
}

fn write_out(out: &mut dyn Write, bytes: &[u8]) -> Result<(), CliError> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::io("writing the output", e))
}

/// The server's JSON as it came, ending in a newline.
fn write_json_body(out: &mut dyn Write, r: &Response) -> Result<(), CliError> {
    write_out(out, &r.body)?;
    if !r.body.ends_with(b"\n") {
        write_out(out, b"\n")?;
    }
    Ok(())
}

fn write_value(out: &mut dyn Write, v: &Value) -> Result<(), CliError> {
    let mut text =
        serde_json::to_string(v).map_err(|e| CliError::Protocol(format!("encoding JSON: {e}")))?;
    text.push('\n');
    write_out(out, text.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so a reader never sees half a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let name = path
        .file_name()
        .ok_or_else(|| CliError::usage(format!("{} is not a file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let what = || format!("writing {}", path.display());
    std::fs::write(&tmp, bytes).map_err(|e| CliError::io(what(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::io(what(), e)
    })
}

/// `status`.
pub async fn status(ctx: &Ctx, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ctx.client()?;
    let health = client.get("/healthz", None).await?.success()?.json()?;
    let ready = client.get("/readyz", None).await?;
    let ready_err = ready.clone().success().err();
    let ready_body = ready.json().unwrap_or(Value::Null);
    let (admin, admin_err) = match &ctx.settings.key {
        None => (Value::Null, None),
        Some(_) => {
            let key = ctx.settings.admin_key()?;
            match client.get("/api/v1/ca", Some(&key)).await?.success() {
                Ok(r) => (
                    json!({"accepted": true, "tenant_id": r.json()?["tenant_id"]}),
                    None,
                ),
                Err(e) => (json!({"accepted": false}), Some(e)),
            }
        }
    };
    match ctx.format {
        Format::Json => write_value(
            out,
            &json!({
                "server": client.url().to_string(),
                "healthz": health,
                "readyz": ready_body,
                "admin_key": admin,
            }),
        )?,
        Format::Table => {
            let ready_text = match &ready_err {
                None => output::cell(&ready_body, "status"),
                Some(e) => format!("not ready: {e}"),
            };
            let admin_text = match (&ctx.settings.key, &admin_err) {
                (None, _) => "no key configured".to_owned(),
                (Some(_), Some(e)) => format!("refused: {e}"),
                (Some(_), None) => {
                    format!("accepted (tenant {})", output::cell(&admin, "tenant_id"))
                }
            };
            let text = output::key_values(&[
                ("server", client.url().to_string()),
                ("healthz", output::cell(&health, "status")),
                ("readyz", ready_text),
                ("admin key", admin_text),
            ]);
            write_out(out, text.as_bytes())?;
        }
    }
    // Readiness first: an unready server explains a refused key too.
    match ready_err.or(admin_err) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `tokens …`.
pub async fn tokens(ctx: &Ctx, cmd: &TokenCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ctx.client()?;
    let key = ctx.settings.admin_key()?;
    match cmd {
        TokenCommand::Create(args) => token_create(ctx, &client, &key, args, out).await,
        TokenCommand::List(TokenListArgs { status, page }) => {
            let status = status.and_then(|s| s.to_possible_value());
            let status = status.as_ref().map(|s| s.get_name());
            list(
                ctx,
                &client,
                &key,
                TOKENS,
                status,
                page,
                out,
                output::tokens_table,
            )
            .await
        }
        TokenCommand::Show { token_id } => {
            let r = client
                .get(&token_path(*token_id, ""), Some(&key))
                .await?
                .success()?;
            one(ctx, &r, out, output::token_details)
        }
        TokenCommand::Revoke { token_id } => {
            let r = client
                .send(
                    http::Method::POST,
                    &token_path(*token_id, "/revoke"),
                    Some(&key),
                    None,
                )
                .await?
                .success()?;
            one(ctx, &r, out, output::token_details)
        }
    }
}

fn token_path(id: TokenId, rest: &str) -> String {
    format!("{TOKENS}/{id}{rest}")
}

fn agent_path(id: AgentId, rest: &str) -> String {
    format!("{AGENTS}/{id}{rest}")
}

/// Prints one resource: JSON as it came, or key/value lines.
fn one(
    ctx: &Ctx,
    r: &Response,
    out: &mut dyn Write,
    render: fn(&Value) -> String,
) -> Result<(), CliError> {
    match ctx.format {
        Format::Json => write_json_body(out, r),
        Format::Table => write_out(out, render(&r.json()?).as_bytes()),
    }
}

async fn token_create(
    ctx: &Ctx,
    client: &Client,
    key: &oneprotect_identity::AdminKeySecret,
    args: &TokenCreateArgs,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut body = serde_json::Map::new();
    if let Some(ttl) = args.ttl {
        body.insert("ttl_seconds".into(), ttl.into());
    }
    if let Some(n) = args.max_uses {
        body.insert("max_uses".into(), n.into());
    }
    if let Some(d) = &args.description {
        body.insert("description".into(), d.clone().into());
    }
    if !args.labels.is_empty() {
        let labels: serde_json::Map<String, Value> = args
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        body.insert("labels".into(), labels.into());
    }
    // Claim the secret file before the token exists: a file that cannot be
    // written must not cost a secret nobody will see.
    let secret_file = match &args.secret_file {
        Some(p) => Some(SecretFile::create(p)?),
        None => None,
    };
    let r = client
        .post_json(TOKENS, Some(key), &Value::Object(body))
        .await?
        .success()?;
    let mut created = r.json()?;
    let secret = created
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| CliError::Protocol("the created token has no secret".into()))?;
    if let Some(f) = secret_file {
        f.write(&secret)?;
        if let Some(m) = created.as_object_mut() {
            m.remove("token");
        }
        return match ctx.format {
            Format::Json => write_value(out, &created),
            Format::Table => {
                let mut text = output::token_details(&created);
                text.push_str(&format!(
                    "\nThe secret is in {} (mode 0600), shown nowhere else; it cannot be retrieved again.\n",
                    args.secret_file.as_deref().unwrap_or(Path::new("?")).display()
                ));
                write_out(out, text.as_bytes())
            }
        };
    }
    match ctx.format {
        Format::Json => write_json_body(out, &r),
        Format::Table => {
            let mut text = output::token_details(&created);
            text.push_str(
                "\nEnrollment token secret (shown only now; it cannot be retrieved again):\n",
            );
            text.push_str(&format!("  {secret}\n"));
            write_out(out, text.as_bytes())
        }
    }
}

/// A new file for a token secret: created (exclusively, mode 0600) before
/// the request, filled after it, removed when the request fails.
struct SecretFile {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl SecretFile {
    fn create(path: &Path) -> Result<Self, CliError> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let file = o.open(path).map_err(|e| {
            CliError::io(
                format!(
                    "creating the secret file {} (it must not exist yet)",
                    path.display()
                ),
                e,
            )
        })?;
        Ok(SecretFile {
            path: path.to_owned(),
            file: Some(file),
        })
    }

    fn write(mut self, secret: &str) -> Result<(), CliError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| CliError::io("the secret file", std::io::ErrorKind::NotFound.into()))?;
        let r = file
            .write_all(format!("{secret}\n").as_bytes())
            .and_then(|()| file.sync_all());
        match r {
            Ok(()) => {
                // Written: keep it.
                self.path = std::path::PathBuf::new();
                Ok(())
            }
            Err(e) => Err(CliError::io(
                format!("writing the secret file {}", self.path.display()),
                e,
            )),
        }
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One page (or, with `--all`, every page) of a list endpoint.
#[allow(clippy::too_many_arguments)] // one call site per resource; a struct would only rename them
async fn list(
    ctx: &Ctx,
    client: &Client,
    key: &oneprotect_identity::AdminKeySecret,
    base: &str,
    status: Option<&str>,
    page: &PageArgs,
    out: &mut dyn Write,
    render: fn(&Value) -> String,
) -> Result<(), CliError> {
    let mut cursor = page.cursor.clone();
    if let Some(c) = &cursor {
        check_cursor(c)?;
    }
    let mut all: Vec<Value> = Vec::new();
    for _ in 0..MAX_PAGES {
        let path = list_path(base, status, page.limit, cursor.as_deref());
        let r = client.get(&path, Some(key)).await?.success()?;
        let v = r.json()?;
        let next = v
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if !page.all {
            match ctx.format {
                Format::Json => write_json_body(out, &r)?,
                Format::Table => {
                    write_out(out, render(&v).as_bytes())?;
                    if let Some(n) = next {
                        eprintln!("(more: --cursor {n}, or --all)");
                    }
                }
            }
            return Ok(());
        }
        all.extend(output::items(&v).iter().cloned());
        match next {
            Some(n) if Some(&n) != cursor.as_ref() => {
                check_cursor(&n)?;
                cursor = Some(n);
            }
            Some(_) => return Err(CliError::Protocol("the server repeated a cursor".into())),
            None => {
                let v = json!({"items": all, "next_cursor": null});
                return match ctx.format {
                    Format::Json => write_value(out, &v),
                    Format::Table => write_out(out, render(&v).as_bytes()),
                };
            }
        }
    }
    Err(CliError::Protocol(format!(
        "the listing did not end after {MAX_PAGES} pages"
    )))
}

/// Cursors are ids; anything else would need escaping in a query.
fn check_cursor(c: &str) -> Result<(), CliError> {
    if c.is_empty() || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(CliError::usage(format!("{c:?} is not a cursor")));
    }
    Ok(())
}

/// `base?status=&limit=&cursor=` with only the given parameters.
pub fn list_path(
    base: &str,
    status: Option<&str>,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> String {
    let mut q = Vec::new();
    if let Some(s) = status {
        q.push(format!("status={s}"));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if let Some(c) = cursor {
        q.push(format!("cursor={c}"));
    }
    if q.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", q.join("&"))
    }
}

/// `agents …`.
pub async fn agents(ctx: &Ctx, cmd: &AgentCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ctx.client()?;
    let key = ctx.settings.admin_key()?;
    match cmd {
        AgentCommand::List(AgentListArgs { status, page }) => {
            let status = status.and_then(|s| s.to_possible_value());
            let status = status.as_ref().map(|s| s.get_name());
            list(
                ctx,
                &client,
                &key,
                AGENTS,
                status,
                page,
                out,
                output::agents_table,
            )
            .await
        }
        AgentCommand::Show { agent_id } => {
            let r = client
                .get(&agent_path(*agent_id, ""), Some(&key))
                .await?
                .success()?;
            one(ctx, &r, out, output::agent_details)
        }
        AgentCommand::Revoke { agent_id, reason } => {
            let r = client
                .post_json(
                    &agent_path(*agent_id, "/revoke"),
                    Some(&key),
                    &json!({ "reason": reason }),
                )
                .await?
                .success()?;
            one(ctx, &r, out, output::revoked_agent)
        }
        AgentCommand::Events { agent_id } => {
            let r = client
                .get(&agent_path(*agent_id, "/events"), Some(&key))
                .await?
                .success()?;
            one(ctx, &r, out, output::events_table)
        }
    }
}

/// `projection`: the server's view of the revocation projection; exit 6
/// (unavailable) when the projection does not answer, so a script can
/// alert on it.
pub async fn projection(ctx: &Ctx, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ctx.client()?;
    let key = ctx.settings.admin_key()?;
    let r = client
        .get("/api/v1/projection", Some(&key))
        .await?
        .success()?;
    let v = r.json()?;
    one(ctx, &r, out, output::projection_details)?;
    if v["reachable"] == Value::Bool(false) {
        return Err(CliError::Unavailable(format!(
            "the revocation projection does not answer: {}",
            v["error"].as_str().unwrap_or("no detail")
        )));
    }
    Ok(())
}

/// `ca …`.
pub async fn ca(ctx: &Ctx, cmd: &CaCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let client = ctx.client()?;
    match cmd {
        CaCommand::Show { out: file } => {
            let key = ctx.settings.admin_key()?;
            let r = client.get("/api/v1/ca", Some(&key)).await?.success()?;
            let bytes = match ctx.format {
                Format::Json => {
                    let mut b = r.body.to_vec();
                    if !b.ends_with(b"\n") {
                        b.push(b'\n');
                    }
                    b
                }
                Format::Table => {
                    let v = r.json()?;
                    let pem = |name: &str| {
                        v.get(name)
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .ok_or_else(|| CliError::Protocol(format!("no {name} in the answer")))
                    };
                    let mut text = pem("issuing_ca_pem")?;
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&pem("root_pem")?);
                    text.into_bytes()
                }
            };
            emit(file.as_deref(), &bytes, out)
        }
        CaCommand::TrustBundle { out: file } => {
            let r = client.get("/api/v1/trust-bundle", None).await?.success()?;
            if !r.body.starts_with(b"-----BEGIN CERTIFICATE-----") {
                return Err(CliError::Protocol("the trust bundle is not PEM".into()));
            }
            emit(file.as_deref(), &r.body, out)
        }
    }
}

fn emit(file: Option<&Path>, bytes: &[u8], out: &mut dyn Write) -> Result<(), CliError> {
    match file {
        Some(p) => {
            write_file(p, bytes)?;
            eprintln!("wrote {} ({} bytes)", p.display(), bytes.len());
            Ok(())
        }
        None => write_out(out, bytes),
    }
}

/// The CRL encoding for `args`: `--format`, DER by default, PEM for
/// `--chain`. Refuses DER to a terminal (binary noise) and `--chain` as DER.
pub fn crl_format(args: &CrlArgs, stdout_is_terminal: bool) -> Result<CrlFormat, CliError> {
    let format = match (args.chain, args.format) {
        (true, Some(CrlFormat::Der)) => {
            return Err(CliError::usage("--chain is PEM only (drop --format der)"))
        }
        (true, _) => CrlFormat::Pem,
        (false, f) => f.unwrap_or(CrlFormat::Der),
    };
    if format == CrlFormat::Der && args.out.is_none() && stdout_is_terminal {
        return Err(CliError::usage(
            "refusing to write a DER (binary) CRL to a terminal: use --out FILE, \
             --format pem, or redirect stdout",
        ));
    }
    Ok(format)
}

/// The CRL's path: the root's, or `tenant`'s CRL or chain file.
pub fn crl_path(
    args: &CrlArgs,
    tenant: Option<TenantId>,
    format: CrlFormat,
) -> Result<String, CliError> {
    let q = match format {
        CrlFormat::Der => "der",
        CrlFormat::Pem => "pem",
    };
    if args.root {
        return Ok(format!("/api/v1/crl?format={q}"));
    }
    let tenant = args
        .tenant
        .or(tenant)
        .ok_or_else(|| CliError::usage("no tenant: give --tenant ID or an admin key"))?;
    if args.chain {
        Ok(format!("/api/v1/tenants/{tenant}/crl-chain"))
    } else {
        Ok(format!("/api/v1/tenants/{tenant}/crl?format={q}"))
    }
}

/// `crl`.
pub async fn crl(ctx: &Ctx, args: &CrlArgs, out: &mut dyn Write) -> Result<(), CliError> {
    // Usage errors (DER to a terminal) before any request.
    let format = crl_format(args, ctx.stdout_is_terminal)?;
    let client = ctx.client()?;
    let tenant = if !args.root && args.tenant.is_none() {
        let key = ctx.settings.admin_key().map_err(|_| {
            CliError::usage(
                "the tenant's CRL needs --tenant ID, or the admin key to find the key's tenant",
            )
        })?;
        let v = client
            .get("/api/v1/ca", Some(&key))
            .await?
            .success()?
            .json()?;
        let id = v
            .get("tenant_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<TenantId>().ok())
            .ok_or_else(|| CliError::Protocol("no tenant_id in /api/v1/ca".into()))?;
        Some(id)
    } else {
        None
    };
    let path = crl_path(args, tenant, format)?;
    let r = client.get(&path, None).await?.success()?;
    let looks_right = match format {
        // A DER CRL is a SEQUENCE.
        CrlFormat::Der => r.body.first() == Some(&0x30),
        CrlFormat::Pem => r.body.starts_with(b"-----BEGIN X509 CRL-----"),
    };
    if !looks_right {
        return Err(CliError::Protocol(format!(
            "the answer is not a {} CRL",
            if format == CrlFormat::Der {
                "DER"
            } else {
                "PEM"
            }
        )));
    }
    emit(args.out.as_deref(), &r.body, out)
}

/// `completions SHELL`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> Result<(), CliError> {
    use clap::CommandFactory;
    let mut cmd = crate::args::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "oneprotect", &mut buf);
    write_out(out, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crl_args(
        tenant: Option<&str>,
        root: bool,
        chain: bool,
        format: Option<CrlFormat>,
        out: bool,
    ) -> CrlArgs {
        CrlArgs {
            tenant: tenant.map(|t| t.parse().unwrap()),
            root,
            chain,
            format,
            out: out.then(|| "/tmp/x.crl".into()),
        }
    }

    const T: &str = "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10";

    #[test]
    fn crl_paths_and_formats() {
        let key_tenant: Option<TenantId> = Some(T.parse().unwrap());
        let a = crl_args(None, false, false, None, false);
        assert_eq!(crl_format(&a, false).unwrap(), CrlFormat::Der);
        assert_eq!(
            crl_path(&a, key_tenant, CrlFormat::Der).unwrap(),
            format!("/api/v1/tenants/{T}/crl?format=der")
        );
        assert!(crl_path(&a, None, CrlFormat::Der).is_err(), "no tenant");
        let a = crl_args(None, true, false, Some(CrlFormat::Pem), false);
        assert_eq!(crl_format(&a, true).unwrap(), CrlFormat::Pem);
        assert_eq!(
            crl_path(&a, None, CrlFormat::Pem).unwrap(),
            "/api/v1/crl?format=pem"
        );
        let a = crl_args(Some(T), false, true, None, false);
        assert_eq!(crl_format(&a, true).unwrap(), CrlFormat::Pem);
        assert_eq!(
            crl_path(&a, None, CrlFormat::Pem).unwrap(),
            format!("/api/v1/tenants/{T}/crl-chain")
        );
        let a = crl_args(Some(T), false, true, Some(CrlFormat::Der), true);
        assert!(crl_format(&a, false).is_err(), "--chain is PEM only");
    }

    #[test]
    fn der_to_a_terminal_is_refused_with_a_hint() {
        let e = crl_format(&crl_args(Some(T), false, false, None, false), true).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        assert!(e.to_string().contains("--out FILE"), "{e}");
        // To a file, or PEM, or to a pipe: fine.
        crl_format(&crl_args(Some(T), false, false, None, true), true).unwrap();
        crl_format(
            &crl_args(Some(T), false, false, Some(CrlFormat::Pem), false),
            true,
        )
        .unwrap();
        crl_format(&crl_args(Some(T), false, false, None, false), false).unwrap();
    }

    #[test]
    fn list_paths() {
        assert_eq!(list_path(TOKENS, None, None, None), TOKENS);
        assert_eq!(
            list_path(AGENTS, Some("active"), Some(5), Some("abc-1")),
            "/api/v1/agents?status=active&limit=5&cursor=abc-1"
        );
        assert!(check_cursor("a&b=c").is_err());
        assert!(check_cursor("").is_err());
        check_cursor("6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10").unwrap();
    }

    #[test]
    fn write_file_replaces_whole_and_secret_file_is_private_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.pem");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let s = dir.path().join("secret");
        let f = SecretFile::create(&s).unwrap();
        assert!(
            SecretFile::create(&s).is_err(),
            "an existing file is not overwritten"
        );
        f.write("opet_x").unwrap();
        assert_eq!(std::fs::read_to_string(&s).unwrap(), "opet_x\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&s).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Dropped unfilled (the request failed): removed.
        let s2 = dir.path().join("secret2");
        drop(SecretFile::create(&s2).unwrap());
        assert!(!s2.exists());
    }

    #[test]
    fn completions_name_the_commands() {
        let mut buf = Vec::new();
        completions(clap_complete::Shell::Bash, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("oneprotect") && text.contains("tokens") && text.contains("crl"));
    }
}
