//! The operator kit in `deploy/`: every metric that the Grafana dashboard
//! (`deploy/grafana/oneprotect.json`) and the alert rules
//! (`deploy/prometheus/alerts.yml`) name is exported by a running stack;
//! `promtool` accepts the rules, passes their unit tests
//! (`alerts.test.yml`) and parses every dashboard query; the systemd units
//! pass `systemd-analyze verify` (where systemd is installed).
//!
//! Families with a bounded label set are exported at 0 from the start (see
//! `gateway/src/metrics.rs` and `enroll-api/src/metrics.rs`); the rest
//! (requests by route and status, upstream latency, assertion refusals by
//! reason) appear with their first event, so the stack test drives an
//! enrollment, a request through the gateway and a refused assertion first.
//!
//! `cargo test -p oneprotect-tests --test suite kit_metrics::`

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::stack::Stack;
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{enroll, AgentMetadata};
use oneprotect_agent::state::StateDir;
use oneprotect_identity::headers::IDENTITY_ASSERTION;
use oneprotect_identity::TokenSecret;

/// Poll attempts (50 ms apart) while the projection catches up.
const POLLS: usize = 600;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

fn dashboard_path() -> PathBuf {
    repo().join("deploy/grafana/oneprotect.json")
}

fn alerts_path() -> PathBuf {
    repo().join("deploy/prometheus/alerts.yml")
}

/// Every PromQL expression of the dashboard's panels (rows' nested panels
/// included).
fn dashboard_exprs() -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_owned());
                }
            }
            walk(&p["panels"], out);
        }
    }
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Every rule's `expr` in alerts.yml.
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(alerts_path()).expect("read alerts.yml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push(r["expr"].as_str().expect("expr").to_owned());
        }
    }
    out
}

/// PromQL words that are not metric names: aggregations and functions are
/// recognised by the `(` after them; these are the ones that need not be.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];

/// The metric names `expr` selects: identifiers outside strings, label
/// matchers (`{…}`) and ranges (`[…]`), not followed by `(` (functions,
/// aggregations), not a keyword, not a label list after `by`/`without`/
/// `on`/`ignoring`/`group_left`/`group_right`, and not `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // After a grouping keyword, the next parenthesised list holds labels.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' || chars[i] == '\'' {
                        let q = chars[i];
                        i += 1;
                        while i < chars.len() && chars[i] != q {
                            if chars[i] == '\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                labels_next = false;
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number or duration (1e3, 0.5, 5m): not a name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = chars.get(j) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    labels_next = call;
                } else if !call && !KEYWORDS.contains(&lower.as_str()) && word != "up" {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn names_of(exprs: &[String]) -> BTreeSet<String> {
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// The families of a Prometheus text page: `name → type` from the `# TYPE`
/// lines.
fn families(page: &str) -> std::collections::BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` is exported on a page with `families`: a family itself, or
/// a histogram's `_bucket`/`_sum`/`_count` series.
fn exported(families: &std::collections::BTreeMap<String, String>, name: &str) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|s| {
        name.strip_suffix(s)
            .and_then(|base| families.get(base))
            .is_some_and(|t| t == "histogram")
    })
}

#[test]
fn kit_metrics_extractor_finds_the_names() {
    let e = r#"sum by (job, instance) (rate(a_total{code="x{y}", le=~"1(\\.0)?"}[5m] offset 1h)) / on (job) group_left (instance) b_seconds_bucket{job=~"$job"} > 0.5e3 and histogram_quantile(0.99, sum by (le) (rate(c_bucket[$__rate_interval]))) or up == 0 unless max without (x) (d:rec)"#;
    let want: BTreeSet<String> = ["a_total", "b_seconds_bucket", "c_bucket", "d:rec"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(metric_names(e), want);

    let dash = names_of(&dashboard_exprs());
    let rules = names_of(&alert_exprs());
    for n in dash.iter().chain(&rules) {
        assert!(
            n.starts_with("oneprotect_gateway_") || n.starts_with("oneprotect_enroll_"),
            "{n}: not a OneProtect metric (a tokenizer slip?)"
        );
    }
    // The dashboard shows every gateway and enroll-api family (27 in all,
    // histograms by their series); the rules watch at least 12.
    assert!(dash.len() >= 27, "{} names: {dash:?}", dash.len());
    assert!(rules.len() >= 12, "{} names: {rules:?}", rules.len());
    for known in [
        "oneprotect_gateway_requests_total",
        "oneprotect_gateway_revocation_refusals_total",
        "oneprotect_gateway_handshake_failures_total",
        "oneprotect_gateway_revocation_staleness_ms",
        "oneprotect_gateway_upstream_latency_seconds_bucket",
        "oneprotect_enroll_outbox_pending",
        "oneprotect_enroll_requests_total",
    ] {
        assert!(dash.contains(known), "{known} not found in the dashboard");
    }
    for known in [
        "oneprotect_gateway_redis_connected",
        "oneprotect_enroll_outbox_oldest_pending_seconds",
        "oneprotect_gateway_client_certificate_remaining_seconds_bucket",
    ] {
        assert!(rules.contains(known), "{known} not found in alerts.yml");
    }
}

/// Every rule has `for`, a `severity` label, `summary` and `description`,
/// and a `runbook` naming a section of docs/operations.md that exists.
#[test]
fn kit_metrics_every_alert_has_a_runbook_section() {
    let text = std::fs::read_to_string(alerts_path()).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| {
            h.trim()
                .to_ascii_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        })
        .collect();
    let mut n = 0;
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().expect("alerting rules only");
            assert!(r["for"].as_str().is_some(), "{name}: no `for`");
            assert!(
                matches!(
                    r["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "{name}: severity"
            );
            for a in ["summary", "description"] {
                assert!(r["annotations"][a].as_str().is_some(), "{name}: no {a}");
            }
            let runbook = r["annotations"]["runbook"].as_str().unwrap_or("");
            let anchor = runbook
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{name}: runbook {runbook:?}"));
            assert_eq!(anchor, name.to_ascii_lowercase(), "{name}: runbook anchor");
            assert!(
                anchors.contains(anchor),
                "{name}: no `### {name}` in docs/operations.md"
            );
            n += 1;
        }
    }
    assert!(n >= 10, "{n} rules");
}

/// `promtool` from PATH; fails with where to get it (the test set of
/// scripts/prereqs.sh installs it).
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|f| f.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool is not on PATH: run `scripts/prereqs.sh test` (Debian/Ubuntu package \
             `prometheus`, Fedora `golang-github-prometheus`, Homebrew `prometheus`)"
        )
    })
}

fn run_ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// promtool accepts the rules and passes their unit tests, and parses every
/// dashboard query (as recording rules, Grafana's variables replaced).
#[test]
fn kit_metrics_promtool_checks_rules_tests_and_dashboard_queries() {
    let promtool = promtool();
    let dir = repo().join("deploy/prometheus");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        assert!(!e.contains('$'), "an unknown Grafana variable in {e}");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = tmp.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let out = run_ok(Command::new(&promtool).arg("check").arg("rules").arg(&file));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// `systemd-analyze verify` has nothing to say about the units (their
/// binaries replaced by stubs, as they are not installed here). Skipped
/// where systemd is not installed (macOS).
#[test]
fn kit_metrics_systemd_units_verify() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit check skipped");
        return;
    };
    assert!(probe.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for b in ["oneprotect-gateway", "oneprotect-enroll-api"] {
        let p = bin.join(b);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for unit in [
        "oneprotect-gateway.service",
        "oneprotect-enroll-api.service",
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        assert!(text.contains("/usr/local/bin/"), "{unit}: ExecStart moved?");
        let local = tmp.path().join(unit);
        std::fs::write(
            &local,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&local)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{said}"
        );
    }
}

/// A plain-HTTP request to a loopback listener; the body as text.
async fn plain(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let (status, body) = crate::support::stack::plain(addr, method, path, &headers, None).await?;
    Ok(match body {
        Value::String(text) => (status, text),
        other => (status, other.to_string()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_metrics_every_name_in_dashboard_and_rules_is_exported() -> Result<()> {
    let stack = Stack::builder("kit_metrics").gateway().start().await?;
    let gw = stack.gateway();

    // An enrollment through the gateway (the exchange route without identity).
    let roots_pem = std::fs::read(&gw.roots)?;
    let roots = oneprotect_agent::tls::roots_from_pem(&roots_pem)?;
    let server = Endpoint::new(&gw.url, oneprotect_agent::tls::server_only(roots.clone())?)?;
    let (_, token) = stack
        .client
        .create_token(&stack.key, json!({"ttl_seconds": 600}))
        .await?;
    let enrolled = enroll(
        &server,
        &TokenSecret::new(token),
        &AgentMetadata::this_host(),
    )
    .await?;
    let agent = enrolled.issued.agent_id;
    let scratch = tempfile::tempdir()?;
    let state = StateDir::open(scratch.path())?;
    state.store(&enrolled)?;
    let id = state.load()?;

    // A request with the agent's certificate (a full handshake), waiting out
    // the 503s until the projection has the new certificate.
    let ep = Endpoint::new(&gw.url, id.mtls_config(roots)?)?;
    let mut status = 0;
    for _ in 0..POLLS {
        status = ep
            .request(http::Method::GET, "/healthz", &[], None)
            .await?
            .status
            .as_u16();
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(status == 200, "GET /healthz through the gateway: {status}");

    // A malformed identity assertion straight to the enroll-api's agent
    // endpoint: counted in assertion_refusals_total{reason="malformed"}.
    let (status, body) = plain(
        gw.upstream,
        "POST",
        &format!("/api/v1/agents/{agent}/certificate/confirm"),
        &[(IDENTITY_ASSERTION, "not-an-assertion")],
    )
    .await?;
    ensure!(status == 401, "forged assertion: {status} {body}");

    let (status, gw_page) = plain(gw.admin, "GET", "/metrics", &[]).await?;
    ensure!(status == 200, "gateway /metrics: {status}");
    let (status, api_page) = plain(gw.upstream, "GET", "/metrics", &[]).await?;
    ensure!(status == 200, "enroll-api /metrics: {status}");
    let gw_families = families(&gw_page);
    let api_families = families(&api_page);

    let mut referenced = names_of(&dashboard_exprs());
    referenced.extend(names_of(&alert_exprs()));
    ensure!(referenced.len() >= 27, "{referenced:?}");
    let mut missing = Vec::new();
    for name in &referenced {
        let (fams, page) = if name.starts_with("oneprotect_gateway_") {
            (&gw_families, "gateway")
        } else {
            (&api_families, "enroll-api")
        };
        if !exported(fams, name) {
            missing.push(format!("{name} (not on the {page} page)"));
        }
    }
    ensure!(
        missing.is_empty(),
        "named by deploy/ but not exported:\n  {}\n\ngateway:\n{gw_page}\nenroll-api:\n{api_page}",
        missing.join("\n  ")
    );

    // The traffic above reached the series the near-expiry alert and the
    // enrollment panel read.
    let count = crate::support::metrics::value(
        &gw_page,
        "oneprotect_gateway_client_certificate_remaining_seconds_count",
    );
    ensure!(
        count >= 1,
        "no verified client certificate observed:\n{gw_page}"
    );
    let enrollments = crate::support::metrics::value(
        &api_page,
        "oneprotect_enroll_requests_total{method=\"POST\",route=\"/api/v1/agent-enrollment/exchange\",status=\"201\"}",
    );
    ensure!(enrollments == 1, "enrollment not counted:\n{api_page}");
    let pending = api_page
        .lines()
        .find_map(|l| l.strip_prefix("oneprotect_enroll_outbox_pending "))
        .context("outbox_pending")?
        .trim()
        .parse::<i64>()?;
    ensure!(pending >= 0, "the outbox gauge could not read the store");
    Ok(())
}
