//! Reading a Prometheus text page (`/metrics` of the gateway's admin
//! listener or the enroll-api's).

/// The value text of the sample line `series <value>` (`series` is the
/// metric name with its labels as rendered, e.g. `name{reason="x"}`), or
/// `None` when the page has no such line.
pub(crate) fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::trim)
}

/// The value of `series` (0 when absent or not an integer).
pub(crate) fn value(text: &str, series: &str) -> u64 {
    sample(text, series).map_or(0, |v| v.parse().unwrap_or(0))
}

/// The value of `name{reason="<reason>"}` (0 when absent; panics when the
/// line is there but its value is not an integer).
pub(crate) fn counter(text: &str, name: &str, reason: &str) -> u64 {
    sample(text, &format!("{name}{{reason=\"{reason}\"}}")).map_or(0, |v| v.parse().unwrap())
}
