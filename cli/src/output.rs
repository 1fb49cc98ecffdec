//! Output: the server's JSON as it came (`--output json`), or compact
//! aligned tables (`--output table`).

use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people (the default on a terminal).
    Table,
    /// The server's JSON, unchanged (the default when stdout is not a
    /// terminal): stable for scripts.
    Json,
}

impl Format {
    /// The flag's value, else table on a terminal and JSON otherwise.
    pub fn resolve(flag: Option<Format>, stdout_is_terminal: bool) -> Format {
        flag.unwrap_or(if stdout_is_terminal {
            Format::Table
        } else {
            Format::Json
        })
    }
}

/// A table: a header row and rows of cells, rendered with columns aligned
/// by two spaces, no trailing spaces, one line per row.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty; cells are made one line).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| one_line_cell(&c)).collect());
    }

    /// The rendered text, ending in a newline.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().take(cols).enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                line.push_str(c);
                if i + 1 < cols {
                    line.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key/value lines for one resource: keys aligned, in the given order.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let line = format!("{k:<w$}  {}", one_line_cell(v));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn one_line_cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `v[name]` as a cell: strings as they are, `null`/absent as `-`, other
/// values as compact JSON; a map of strings as `k=v,k=v`.
pub fn cell(v: &Value, name: &str) -> String {
    show(v.get(name).unwrap_or(&Value::Null))
}

/// A value as a cell (see [`cell`]).
pub fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "-".into(),
        Value::Object(m) if m.values().all(Value::is_string) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// The `items` array of a list answer (empty when absent).
pub fn items(v: &Value) -> &[Value] {
    v.get("items")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Enrollment tokens (a `TokenList`'s items) as a table.
pub fn tokens_table(list: &Value) -> String {
    let mut t = Table::new(&[
        "TOKEN_ID",
        "STATUS",
        "USES",
        "EXPIRES_AT",
        "CREATED_AT",
        "DESCRIPTION",
    ]);
    for tok in items(list) {
        t.row(vec![
            cell(tok, "token_id"),
            cell(tok, "status"),
            format!("{}/{}", cell(tok, "uses"), cell(tok, "max_uses")),
            cell(tok, "expires_at"),
            cell(tok, "created_at"),
            cell(tok, "description"),
        ]);
    }
    t.render()
}

/// One enrollment token (`Token`) as key/value lines.
pub fn token_details(tok: &Value) -> String {
    key_values(&[
        ("token_id", cell(tok, "token_id")),
        ("tenant_id", cell(tok, "tenant_id")),
        ("status", cell(tok, "status")),
        (
            "uses",
            format!("{} of {}", cell(tok, "uses"), cell(tok, "max_uses")),
        ),
        ("expires_at", cell(tok, "expires_at")),
        ("created_at", cell(tok, "created_at")),
        ("revoked_at", cell(tok, "revoked_at")),
        ("description", cell(tok, "description")),
        ("labels", cell(tok, "labels")),
    ])
}

/// Agents (an `AgentList`'s items) as a table.
pub fn agents_table(list: &Value) -> String {
    let mut t = Table::new(&[
        "AGENT_ID",
        "STATUS",
        "HOSTNAME",
        "OS",
        "VERSION",
        "CERT_NOT_AFTER",
        "ENROLLED_AT",
    ]);
    for a in items(list) {
        t.row(vec![
            cell(a, "agent_id"),
            cell(a, "status"),
            cell(a, "hostname"),
            cell(a, "os"),
            cell(a, "agent_version"),
            cell(a, "certificate_not_after"),
            cell(a, "enrolled_at"),
        ]);
    }
    t.render()
}

/// One agent (`Agent`) as key/value lines.
pub fn agent_details(a: &Value) -> String {
    key_values(&[
        ("agent_id", cell(a, "agent_id")),
        ("tenant_id", cell(a, "tenant_id")),
        ("spiffe_id", cell(a, "spiffe_id")),
        ("status", cell(a, "status")),
        ("hostname", cell(a, "hostname")),
        ("os", cell(a, "os")),
        ("agent_version", cell(a, "agent_version")),
        ("enrolled_at", cell(a, "enrolled_at")),
        ("current_serial", cell(a, "current_serial")),
        ("certificate_not_after", cell(a, "certificate_not_after")),
        ("previous_serial", cell(a, "previous_serial")),
        ("previous_valid_until", cell(a, "previous_valid_until")),
        ("revoked_at", cell(a, "revoked_at")),
        ("revocation_reason", cell(a, "revocation_reason")),
    ])
}

/// A revoked agent (`RevokedAgent`): the agent, then what the gateways
/// confirmed (ADR-0022), one line per lagging gateway.
pub fn revoked_agent(a: &Value) -> String {
    let e = &a["enforcement"];
    let mut out = agent_details(a);
    let confirmed = format!(
        "{} of {} live gateways",
        cell(e, "gateways_confirmed"),
        cell(e, "gateways_live")
    );
    out.push_str(&key_values(&[
        ("enforcement", cell(e, "outcome")),
        ("confirmed", confirmed),
        ("elapsed_ms", cell(e, "elapsed_ms")),
        ("detail", cell(e, "detail")),
    ]));
    for g in e["lagging"].as_array().into_iter().flatten() {
        let line = format!(
            "{} {} applied {}, fails closed by {}",
            cell(g, "name"),
            cell(g, "addr"),
            cell(g, "applied"),
            cell(g, "fails_closed_by")
        );
        out.push_str(&key_values(&[("lagging", line)]));
    }
    out
}

/// `ProjectionStatus` as key/value lines.
pub fn projection_details(p: &Value) -> String {
    key_values(&[
        ("backend", cell(p, "backend")),
        ("reachable", cell(p, "reachable")),
        ("error", cell(p, "error")),
        ("built_at", cell(p, "built_at")),
        ("sequence", cell(p, "sequence")),
        ("outbox_pending", cell(p, "outbox_pending")),
        (
            "outbox_oldest_pending_seconds",
            cell(p, "outbox_oldest_pending_seconds"),
        ),
    ])
}

/// An agent's events (`EventList`) as a table, oldest first.
pub fn events_table(list: &Value) -> String {
    let mut t = Table::new(&["OCCURRED_AT", "TYPE", "ACTOR", "EVENT_ID"]);
    for e in items(list) {
        let actor = e.get("actor").unwrap_or(&Value::Null);
        let actor = match (actor.get("type"), actor.get("id")) {
            (Some(t), Some(id)) => format!("{}:{}", show(t), show(id)),
            (Some(t), None) => show(t),
            _ => show(actor),
        };
        t.row(vec![
            cell(e, "occurred_at"),
            cell(e, "type"),
            actor,
            cell(e, "event_id"),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn format_defaults_to_table_on_a_terminal_and_json_otherwise() {
        assert_eq!(Format::resolve(None, true), Format::Table);
        assert_eq!(Format::resolve(None, false), Format::Json);
        assert_eq!(Format::resolve(Some(Format::Json), true), Format::Json);
        assert_eq!(Format::resolve(Some(Format::Table), false), Format::Table);
    }

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "STATUS", "NOTE"]);
        t.row(vec!["a".into(), "active".into(), "x".into()]);
        t.row(vec!["long-id".into(), "-".into(), String::new()]);
        t.row(vec!["ü".into()]);
        assert_eq!(
            t.render(),
            "ID       STATUS  NOTE\n\
             a        active  x\n\
             long-id  -\n\
             ü\n"
        );
    }

    #[test]
    fn cells_stay_on_one_line() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x\ny".into(), "z".into()]);
        assert_eq!(t.render(), "A    B\nx y  z\n");
        assert_eq!(key_values(&[("k", "a\r\nb".into())]), "k  a  b\n");
    }

    #[test]
    fn cell_spelling() {
        let v = json!({"s": "x", "n": 3, "nul": null, "empty": "", "labels": {"a": "1", "b": "2"},
                       "nolabels": {}, "arr": [1]});
        assert_eq!(cell(&v, "s"), "x");
        assert_eq!(cell(&v, "n"), "3");
        assert_eq!(cell(&v, "nul"), "-");
        assert_eq!(cell(&v, "missing"), "-");
        assert_eq!(cell(&v, "empty"), "-");
        assert_eq!(cell(&v, "labels"), "a=1,b=2");
        assert_eq!(cell(&v, "nolabels"), "-");
        assert_eq!(cell(&v, "arr"), "[1]");
    }

    #[test]
    fn token_list_table() {
        let list = json!({"items": [
            {"token_id": "3c9d2f7e-8b41-4a6e-9f0d-5e2a7c1b8d34", "status": "active", "uses": 0,
             "max_uses": 5, "expires_at": "2026-11-28T11:00:00Z",
             "created_at": "2026-11-28T10:00:00Z", "description": "lab"},
            {"token_id": "00000000-0000-4000-8000-000000000001", "status": "revoked", "uses": 1,
             "max_uses": 1, "expires_at": "2026-11-28T11:00:00Z",
             "created_at": "2026-11-28T10:00:00Z", "description": null}
        ], "next_cursor": null});
        let text = tokens_table(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("TOKEN_ID"));
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[1])[1..4],
            ["active", "0/5", "2026-11-28T11:00:00Z"],
            "{text}"
        );
        assert_eq!(
            cells(lines[2]).last().map(String::as_str),
            Some("-"),
            "{text}"
        );
        // Columns start at the same offset on every line.
        let col = lines[0].find("STATUS").unwrap();
        assert_eq!(lines[1].find("active"), Some(col));
        assert_eq!(lines[2].find("revoked"), Some(col));
        assert_eq!(tokens_table(&json!({"items": []})).lines().count(), 1);
    }

    #[test]
    fn agent_and_event_rendering() {
        let a = json!({"agent_id": "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b", "status": "active",
                       "hostname": "ws-1", "os": "linux", "agent_version": "1.0",
                       "certificate_not_after": "2026-12-28T10:00:00Z",
                       "enrolled_at": "2026-11-28T10:00:00Z", "revoked_at": null});
        let table = agents_table(&json!({"items": [a]}));
        assert!(
            table.lines().nth(1).unwrap().contains("active  ws-1"),
            "{table}"
        );
        let details = agent_details(&a);
        assert!(
            details.contains("hostname               ws-1\n"),
            "{details}"
        );
        assert!(details.contains("revoked_at             -\n"), "{details}");
        let events = json!({"items": [{"occurred_at": "2026-11-28T10:00:00Z",
            "type": "agent.enrolled", "event_id": "e1",
            "actor": {"type": "enrollment_token", "id": "t1"}},
            {"occurred_at": "2026-11-28T11:00:00Z", "type": "agent.revoked", "event_id": "e2",
            "actor": {"type": "system"}}]});
        let text = events_table(&events);
        assert!(
            text.contains("agent.enrolled  enrollment_token:t1  e1"),
            "{text}"
        );
        assert!(
            text.contains("agent.revoked   system               e2"),
            "{text}"
        );
    }
}
