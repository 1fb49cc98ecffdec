//! Results: a JSON file, a Markdown table and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::load::LoadResult;

/// One measured run against one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// `keepalive`, `latency`, `latency-seq1`, `latency-seq8`, `handshake`, `handshake-resumed`.
    pub scenario: String,
    /// `gateway`, `nginx`, `direct`.
    pub target: String,
    /// `h1` or `h2`.
    pub proto: String,
    /// Connections.
    pub concurrency: usize,
    /// Target rate (req/s) for latency runs.
    pub rate: Option<f64>,
    /// Wall time, s.
    pub duration_s: f64,
    /// Successful requests.
    pub ok: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Successful requests per wall second.
    pub per_s: f64,
    /// CPU seconds used by the server under test (and its children).
    pub server_cpu_s: f64,
    /// Successful requests per server CPU-second.
    pub per_server_cpu_s: f64,
    /// Latency percentiles, µs.
    pub p50_us: u64,
    /// p90.
    pub p90_us: u64,
    /// p99.
    pub p99_us: u64,
    /// p99.9.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// TLS connections made.
    pub connections: u64,
    /// Of which resumed.
    pub resumed: u64,
    /// Connections the upstream accepted during the run (keep-alive check).
    pub upstream_connections: Option<u64>,
}

impl RunRecord {
    /// Builds a record from a load result and the server's CPU time.
    #[allow(clippy::too_many_arguments)] // one flat record, built in one place
    pub fn new(
        scenario: &str,
        target: &str,
        proto: &str,
        concurrency: usize,
        rate: Option<f64>,
        r: &LoadResult,
        server_cpu_s: f64,
        upstream_connections: Option<u64>,
    ) -> Self {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| {
            if r.ok == 0 {
                0
            } else {
                r.hist.value_at_quantile(p)
            }
        };
        Self {
            scenario: scenario.into(),
            target: target.into(),
            proto: proto.into(),
            concurrency,
            rate,
            duration_s: secs,
            ok: r.ok,
            errors: r.errors.clone(),
            per_s: r.ok as f64 / secs,
            server_cpu_s,
            per_server_cpu_s: if server_cpu_s > 0.0 {
                r.ok as f64 / server_cpu_s
            } else {
                0.0
            },
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if r.ok == 0 { 0 } else { r.hist.max() },
            connections: r.connections,
            resumed: r.resumed,
            upstream_connections,
        }
    }
}

/// The revocation propagation scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// How revocations were made (`enroll-api`: the admin API; `redis`:
    /// projection write + announcement).
    pub via: String,
    /// Agents revoked.
    pub revocations: usize,
    /// Of those, refused before the scenario ended.
    pub refused: usize,
    /// Time from revocation to the first refused request, ms.
    pub p50_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Requests sent after the revocation was visible and still accepted.
    pub accepted_after_visible: u64,
    /// Of those, sent later than `bound_ms` after the revocation.
    pub accepted_after_bound: u64,
    /// The bound, ms.
    pub bound_ms: f64,
    /// Gateway processes the agents were spread over.
    #[serde(default = "one")]
    pub gateways: usize,
    /// Via the enroll-api: time from the revoke API's 200 to the agent's
    /// announcement on the revocation channel, p50 ms.
    #[serde(default)]
    pub announce_p50_ms: Option<f64>,
    /// p99 of the same.
    #[serde(default)]
    pub announce_p99_ms: Option<f64>,
    /// Via the enroll-api: the revoke call's duration (it answers once every
    /// live gateway applied the revocation, ADR-0022), p50 ms.
    #[serde(default)]
    pub answer_p50_ms: Option<f64>,
    /// p99 of the same.
    #[serde(default)]
    pub answer_p99_ms: Option<f64>,
    /// Via the enroll-api: answers whose `enforcement.outcome` was
    /// `confirmed`.
    #[serde(default)]
    pub answers_confirmed: Option<usize>,
    /// Via the enroll-api: the answers' `enforcement.elapsed_ms` (commit →
    /// every live gateway confirmed, measured by the enroll-api), p50 ms.
    #[serde(default)]
    pub enforcement_p50_ms: Option<f64>,
    /// p99 of the same.
    #[serde(default)]
    pub enforcement_p99_ms: Option<f64>,
    /// Requests sent after the revoke call answered and still accepted
    /// (must be 0 with acknowledged revocation).
    #[serde(default)]
    pub accepted_after_answer: u64,
}

/// The idle-connection memory scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleRecord {
    /// Target.
    pub target: String,
    /// Connections held.
    pub connections: usize,
    /// Server RSS before, KiB.
    pub rss_before_kib: u64,
    /// Server RSS with the connections open, KiB.
    pub rss_after_kib: u64,
    /// (after - before) / connections, KiB.
    pub per_connection_kib: f64,
}

/// A whole harness run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    /// RFC 3339 time of the run.
    pub date: String,
    /// The command line.
    pub command: String,
    /// Machine description.
    pub machine: String,
    /// Worker threads (processes for nginx) of every server under test.
    #[serde(default = "one")]
    pub server_threads: usize,
    /// Measured runs.
    pub runs: Vec<RunRecord>,
    /// Revocation propagation.
    pub revocation: Option<RevocationRecord>,
    /// The same scenario with several gateway processes
    /// (`--revocation-gateways`).
    #[serde(default)]
    pub revocation_fleet: Option<RevocationRecord>,
    /// Idle memory.
    pub idle: Vec<IdleRecord>,
    /// Skipped parts and caveats.
    pub notes: Vec<String>,
}

fn one() -> usize {
    1
}

/// The baselines the gateway is compared with, in report order.
pub const BASELINES: &[&str] = &["nginx", "haproxy"];

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

impl Report {
    fn find(&self, scenario: &str, target: &str, proto: &str) -> Option<&RunRecord> {
        self.runs
            .iter()
            .find(|r| r.scenario == scenario && r.target == target && r.proto == proto)
    }

    /// The closed-loop latency runs of every proxy with each percentile
    /// minus the direct run's (0 where the proxy was faster).
    fn added_latency(&self) -> Vec<RunRecord> {
        let mut out = Vec::new();
        for scenario in ["latency-seq1", "latency-seq8"] {
            let Some(d) = self.find(scenario, "direct", "h1") else {
                continue;
            };
            for r in self
                .runs
                .iter()
                .filter(|r| r.scenario == scenario && r.target != "direct")
            {
                let mut a = r.clone();
                a.p50_us = r.p50_us.saturating_sub(d.p50_us);
                a.p90_us = r.p90_us.saturating_sub(d.p90_us);
                a.p99_us = r.p99_us.saturating_sub(d.p99_us);
                a.p999_us = r.p999_us.saturating_sub(d.p999_us);
                out.push(a);
            }
        }
        out
    }

    /// How many baselines ran.
    fn baselines(&self) -> usize {
        BASELINES
            .iter()
            .filter(|b| self.runs.iter().any(|r| r.target == **b))
            .count()
    }

    /// The Markdown summary.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Run {} on {}, {} worker thread(s) per server\n\n`{}`\n",
            self.date, self.machine, self.server_threads, self.command
        );
        let _ = writeln!(
            s,
            "| scenario | target | proto | conns | ok | errors | req/s | server CPU s | per server CPU-s | p50 µs | p90 µs | p99 µs | p99.9 µs | resumed | upstream conns |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {} | {}/{} | {} |",
                r.scenario,
                r.target,
                r.proto,
                r.concurrency,
                r.ok,
                r.errors.values().sum::<u64>(),
                r.per_s,
                r.server_cpu_s,
                r.per_server_cpu_s,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.p999_us,
                r.resumed,
                r.connections,
                r.upstream_connections.map_or("–".into(), |c| c.to_string()),
            );
        }
        let _ = writeln!(s, "\n**Ratios (same run)**\n");
        let _ = writeln!(
            s,
            "| figure | gateway | baseline | ratio | goal |\n|---|---:|---:|---:|---|"
        );
        for (scenario, goal) in [("handshake", "≥ 2.5×"), ("keepalive", "≥ 1.5×")] {
            for proto in ["h1", "h2"] {
                let Some(g) = self.find(scenario, "gateway", proto) else {
                    continue;
                };
                let mut best: Option<&RunRecord> = None;
                for b in BASELINES {
                    let Some(n) = self.find(scenario, b, proto) else {
                        continue;
                    };
                    let _ = writeln!(
                        s,
                        "| {scenario} {proto} per server CPU-s vs {b} | {:.0} | {:.0} | {} | {goal} {b} |",
                        g.per_server_cpu_s,
                        n.per_server_cpu_s,
                        ratio(g.per_server_cpu_s, n.per_server_cpu_s)
                    );
                    if best.is_none_or(|x| n.per_server_cpu_s > x.per_server_cpu_s) {
                        best = Some(n);
                    }
                }
                if let Some(n) = best.filter(|_| self.baselines() > 1) {
                    let _ = writeln!(
                        s,
                        "| **{scenario} {proto} per server CPU-s vs the better baseline ({})** | {:.0} | {:.0} | **{}** | {goal} |",
                        n.target,
                        g.per_server_cpu_s,
                        n.per_server_cpu_s,
                        ratio(g.per_server_cpu_s, n.per_server_cpu_s)
                    );
                }
            }
        }
        if let (Some(g), Some(d)) = (
            self.find("latency", "gateway", "h1"),
            self.find("latency", "direct", "h1"),
        ) {
            let _ = writeln!(
                s,
                "| p50 added latency over direct (fixed rate) | {} µs | {} µs | +{} µs | ≤ 100 µs |",
                g.p50_us,
                d.p50_us,
                g.p50_us.saturating_sub(d.p50_us)
            );
        }
        // Closed loop: the floor is the direct run's own latency, not a
        // timer's; added = target minus direct at each percentile.
        for (scenario, conns) in [("latency-seq1", 1), ("latency-seq8", 8)] {
            let Some(d) = self.find(scenario, "direct", "h1") else {
                continue;
            };
            for target in std::iter::once(&"gateway").chain(BASELINES) {
                if let Some(t) = self.find(scenario, target, "h1") {
                    let _ = writeln!(
                        s,
                        "| added latency over direct, closed loop, {conns} conn ({target}) p50 / p99 / p99.9 | {} / {} / {} µs | direct {} / {} / {} µs | +{} / +{} / +{} µs | p50 ≤ 100 µs |",
                        t.p50_us,
                        t.p99_us,
                        t.p999_us,
                        d.p50_us,
                        d.p99_us,
                        d.p999_us,
                        t.p50_us.saturating_sub(d.p50_us),
                        t.p99_us.saturating_sub(d.p99_us),
                        t.p999_us.saturating_sub(d.p999_us),
                    );
                }
            }
        }
        if let Some(r) = &self.revocation {
            let _ = writeln!(
                s,
                "| revocation p99 (via {}) | {:.1} ms | – | – | ≤ 50 ms |",
                r.via, r.p99_ms
            );
        }
        for i in &self.idle {
            let _ = writeln!(
                s,
                "| idle memory per connection ({}) | {:.1} KiB | – | – | ≤ 30 KiB |",
                i.target, i.per_connection_kib
            );
        }
        for r in self.revocation.iter().chain(&self.revocation_fleet) {
            let _ = writeln!(
                s,
                "\n**Revocation** (via {}, {} gateway{}): {} revoked, {} refused; time to first refusal p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; requests accepted after the revocation was visible: {} ({} after the {:.0} ms bound).",
                r.via, r.gateways, if r.gateways == 1 { "" } else { "s" }, r.revocations, r.refused, r.p50_ms, r.p99_ms, r.max_ms, r.accepted_after_visible, r.accepted_after_bound, r.bound_ms
            );
            if let (Some(p50), Some(p99), Some(ok)) =
                (r.answer_p50_ms, r.answer_p99_ms, r.answers_confirmed)
            {
                let _ = writeln!(
                    s,
                    "Revoke API call → answer (waits for every live gateway, ADR-0022): p50 {p50:.2} ms, p99 {p99:.2} ms (a new TLS connection per call); of that, commit → every live gateway confirmed: p50 {:.2} ms, p99 {:.2} ms; {ok} of {} answers `confirmed`; requests accepted after the answer: {}.",
                    r.enforcement_p50_ms.unwrap_or(f64::NAN),
                    r.enforcement_p99_ms.unwrap_or(f64::NAN),
                    r.revocations,
                    r.accepted_after_answer
                );
            }
        }
        for i in &self.idle {
            let _ = writeln!(
                s,
                "\n**Idle** ({}): {} connections, RSS {} → {} KiB, {:.1} KiB per connection.",
                i.target, i.connections, i.rss_before_kib, i.rss_after_kib, i.per_connection_kib
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n**Notes**\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// An SVG with two panels: requests per server CPU-second per run, and
    /// latency percentiles per run.
    pub fn svg(&self) -> String {
        let runs: Vec<&RunRecord> = self.runs.iter().collect();
        let added = self.added_latency();
        let w = 1200.0;
        let h = if added.is_empty() { 640.0 } else { 1180.0 };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let panel = |s: &mut String,
                     x0: f64,
                     top: f64,
                     runs: &[&RunRecord],
                     title: &str,
                     series: &[(&str, &str)],
                     get: &dyn Fn(&RunRecord, usize) -> f64| {
            let pw = 520.0;
            let ph = 360.0;
            let y0 = top + 60.0;
            // Log scale: handshake rates and keep-alive rates differ by 10-100x.
            let max = runs
                .iter()
                .flat_map(|r| (0..series.len()).map(move |i| get(r, i)))
                .fold(1.0f64, f64::max);
            let decades = max.log10().ceil().max(1.0);
            let scale = |v: f64| ph * (v.max(1.0).log10() / decades).clamp(0.0, 1.0);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{title} (log scale)</text>"#,
                x0,
                top + 30.0
            );
            let _ = writeln!(
                s,
                r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
                y0 + ph,
                x0 + pw,
                y0 + ph
            );
            for t in 0..=(decades as i32) {
                let y = y0 + ph - scale(10f64.powi(t));
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    y + 4.0,
                    10u64.pow(t as u32)
                );
            }
            let groups = runs.len().max(1) as f64;
            let gw = pw / groups;
            let bw = (gw * 0.8) / series.len() as f64;
            for (gi, r) in runs.iter().enumerate() {
                let gx = x0 + gw * gi as f64 + gw * 0.1;
                for (si, (_, color)) in series.iter().enumerate() {
                    let v = get(r, si);
                    let bh = scale(v);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {} {}: {:.0}</title></rect>"#,
                        gx + bw * si as f64,
                        y0 + ph - bh,
                        bw,
                        bh,
                        r.scenario,
                        r.target,
                        r.proto,
                        v
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text transform="translate({:.1},{:.1}) rotate(40)">{} {} {}</text>"#,
                    gx + 2.0,
                    y0 + ph + 12.0,
                    r.scenario,
                    r.target,
                    r.proto
                );
            }
            for (si, (name, color)) in series.iter().enumerate() {
                let lx = x0 + 10.0 + 90.0 * si as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
                    top + 40.0,
                    lx + 14.0,
                    top + 49.0
                );
            }
        };
        panel(
            &mut s,
            60.0,
            0.0,
            &runs,
            "Requests per server CPU-second",
            &[("per CPU-s", "#4e79a7")],
            &|r, _| r.per_server_cpu_s,
        );
        panel(
            &mut s,
            620.0,
            0.0,
            &runs,
            "Latency (µs)",
            &[
                ("p50", "#59a14f"),
                ("p90", "#edc948"),
                ("p99", "#f28e2b"),
                ("p99.9", "#e15759"),
            ],
            &|r, i| [r.p50_us, r.p90_us, r.p99_us, r.p999_us][i] as f64,
        );
        if !added.is_empty() {
            let added: Vec<&RunRecord> = added.iter().collect();
            panel(
                &mut s,
                60.0,
                560.0,
                &added,
                "Added latency over direct, closed loop (µs)",
                &[("p50", "#59a14f"), ("p99", "#f28e2b"), ("p99.9", "#e15759")],
                &|r, i| [r.p50_us, r.p99_us, r.p999_us][i] as f64,
            );
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_svg_contain_the_runs_and_ratios() {
        let mut r = Report::default();
        for (target, per) in [("gateway", 3000.0), ("nginx", 1000.0), ("haproxy", 1200.0)] {
            r.runs.push(RunRecord {
                scenario: "handshake".into(),
                target: target.into(),
                proto: "h1".into(),
                concurrency: 4,
                rate: None,
                duration_s: 1.0,
                ok: 10,
                errors: BTreeMap::new(),
                per_s: 10.0,
                server_cpu_s: 1.0,
                per_server_cpu_s: per,
                p50_us: 100,
                p90_us: 200,
                p99_us: 300,
                p999_us: 400,
                max_us: 500,
                connections: 10,
                resumed: 0,
                upstream_connections: None,
            });
        }
        let md = r.markdown();
        assert!(
            md.contains(
                "| handshake h1 per server CPU-s vs nginx | 3000 | 1000 | 3.00× | ≥ 2.5× nginx |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| handshake h1 per server CPU-s vs haproxy | 3000 | 1200 | 2.50× |"),
            "{md}"
        );
        assert!(
            md.contains("| **handshake h1 per server CPU-s vs the better baseline (haproxy)** | 3000 | 1200 | **2.50×** |"),
            "{md}"
        );
        let svg = r.svg();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<title>handshake").count(), 3 + 3 * 4);
    }
}
