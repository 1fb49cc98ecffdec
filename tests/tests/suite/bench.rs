//! The bench harness in its smallest mode, so it cannot rot: every scenario
//! runs against the real gateway binary, the direct upstream, nginx and
//! HAProxy (both installed by scripts/prereqs.sh), and writes its JSON, Markdown and SVG. Figures are not
//! asserted — speed is measured by benchmarks, not tests — but every
//! scenario must have produced successful requests and the revocation
//! scenario (through the real enroll-api) must have refused every revoked
//! agent.

use std::process::Command;

#[test]
fn bench_all_tiny_runs_every_scenario_and_writes_reports() {
    let redis = oneprotect_tests::require_redis();
    let gateway = oneprotect_tests::ensure_binary("oneprotect-gateway", "oneprotect-gateway");
    let enroll_api =
        oneprotect_tests::ensure_binary("oneprotect-enroll-api", "oneprotect-enroll-api");
    let bench = oneprotect_tests::ensure_binary("oneprotect-bench", "oneprotect-bench");
    // The harness finds the gateway and the enroll-api next to itself.
    assert_eq!(gateway.parent(), bench.parent());
    assert_eq!(enroll_api.parent(), bench.parent());
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(&bench)
        .args(["all", "--tiny", "--out"])
        .arg(out.path())
        .arg("--cache")
        .arg(out.path().join("cache"))
        .args(["--redis-url", &redis])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    // scripts/prereqs.sh installs both baselines.
    let baselines = ["nginx", "haproxy"];
    for b in baselines {
        assert!(
            runs.iter().any(|r| r["target"] == b),
            "no {b} runs: {json:#}"
        );
    }
    // keepalive, latency, latency-seq1, latency-seq8 direct (4); per proxy:
    // keepalive h1 and h2, latency, latency-seq1, latency-seq8, handshake,
    // handshake-resumed (7).
    assert_eq!(runs.len(), 4 + 7 * (1 + baselines.len()), "{json:#}");
    // Each baseline refused a certificate on its CA's CRL before the runs.
    let notes = json["notes"].to_string();
    for b in baselines {
        assert!(
            notes.contains(&format!(
                "{b}: checked before the runs: a certificate on its CA's CRL is refused"
            )),
            "{notes}"
        );
    }
    for r in runs {
        assert!(r["ok"].as_u64().unwrap() > 0, "no successful request: {r}");
        assert_eq!(r["errors"].as_object().unwrap().len(), 0, "errors: {r}");
    }
    // Full handshakes really were full: the client never resumed.
    for r in runs.iter().filter(|r| r["scenario"] == "handshake") {
        assert_eq!(r["resumed"], 0, "{r}");
    }
    let rev = &json["revocation"];
    assert_eq!(rev["revocations"], rev["refused"], "{rev}");
    // By default through the real enroll-api's admin API.
    assert_eq!(rev["via"], "enroll-api", "{rev}");
    assert_eq!(rev["accepted_after_bound"], 0, "{rev}");
    // Acknowledged revocation (ADR-0022): with one gateway and with three,
    // every answer confirmed, and nothing accepted after an answer.
    for (rev, gateways) in [(rev, 1), (&json["revocation_fleet"], 3)] {
        assert_eq!(rev["gateways"], gateways, "{rev}");
        assert_eq!(rev["answers_confirmed"], rev["revocations"], "{rev}");
        assert_eq!(rev["accepted_after_answer"], 0, "{rev}");
        assert_eq!(rev["revocations"], rev["refused"], "{rev}");
    }
    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(
        md.contains("**Revocation** (via enroll-api, 3 gateways)"),
        "{md}"
    );
    assert!(md.contains("| keepalive | gateway | h1 |"), "{md}");
    assert!(
        md.contains("| **keepalive h1 per server CPU-s vs the better baseline"),
        "{md}"
    );
    for conns in [1, 8] {
        assert!(
            md.contains(&format!(
                "| added latency over direct, closed loop, {conns} conn (gateway)"
            )),
            "{md}"
        );
    }
    let svg = std::fs::read_to_string(out.path().join("results.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// `oneprotect-bench enroll` on PostgreSQL: the real exchange through the
/// enroll-api binary in a private schema; every enrollment succeeds, the
/// summary names the store and the rate, and the schema is dropped after.
#[test]
fn bench_enroll_measures_the_exchange_on_postgres_and_cleans_up() {
    let redis = oneprotect_tests::require_redis();
    let pg = oneprotect_tests::require_postgres();
    oneprotect_tests::ensure_binary("oneprotect-enroll-api", "oneprotect-enroll-api");
    let bench = oneprotect_tests::ensure_binary("oneprotect-bench", "oneprotect-bench");
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(&bench)
        .args(["enroll", "--count", "20", "--concurrency", "4", "--out"])
        .arg(out.path())
        .args(["--redis-url", &redis, "--database-url", &pg])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench enroll failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("enroll: 20 enrollments on PostgreSQL, 4 in flight, 1 token(s):"),
        "{stdout}"
    );
    // The clock stopped only once the relay had published every event, and
    // PostgreSQL (on this machine) was metered.
    assert!(
        stdout.contains("exchanged, projected and streamed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CPU per enrollment: enroll-api"),
        "{stdout}"
    );
    assert!(stdout.contains(", PostgreSQL "), "{stdout}");
    // The private schema is gone.
    let left = Command::new("psql")
        .arg(&pg)
        .args([
            "-Atc",
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'bench_enroll_%'",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");
}
