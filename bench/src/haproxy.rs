//! The HAProxy baseline (issue 17): `verify required` against the same CA
//! chain with every CA's CRL (`crl-file`), `nbthread` as the bench's
//! `--server-threads`, HTTP/1.1 keep-alive to the same upstream with
//! connection reuse, and the same certificate-derived headers as the nginx
//! baseline. Optional: skipped with a clear message when HAProxy is absent.
//!
//! HAProxy (like nginx) checks revocation once, at the handshake, against a
//! CRL file loaded at start; the gateway checks the Redis projection on every
//! request. The harness confirms before the runs that a certificate on the
//! CRL is refused, so the baseline really has the check on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::child::{which, Server};
use crate::pki::ServerFiles;

/// Path of the haproxy binary, if installed.
pub fn find() -> Option<PathBuf> {
    which("haproxy")
}

/// HAProxy's `maxconn`: 40,000, or less when the open-file limit HAProxy
/// inherits would not allow it (it needs two descriptors per connection,
/// and refuses to start when it cannot raise its limit that far).
pub fn max_connections() -> u64 {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        })
        .and_then(|v| v.parse::<u64>().ok());
    match hard {
        Some(h) => (h.saturating_sub(200) / 2).clamp(256, 40_000),
        None => 40_000,
    }
}

/// The HAProxy configuration text.
pub fn config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    files: &ServerFiles,
    threads: usize,
) -> String {
    format!(
        r#"global
    nbthread {threads}
    maxconn {maxconn}
    pidfile {dir}/haproxy.pid
    tune.ssl.cachesize 100000

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-request 10s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always

frontend agents
    bind {listen} ssl crt {cert_and_key} ca-file {roots} crl-file {crls} verify required alpn h2,http/1.1 ssl-min-ver TLSv1.3
    http-request del-header X-Forwarded-Client-Cert
    http-request set-header X-OneProtect-Cert-Serial %[ssl_c_serial,hex]
    http-request set-header X-OneProtect-Cert-Fingerprint %[ssl_c_sha1,hex]
    http-request set-header X-OneProtect-Cert-Subject %[ssl_c_s_dn]
    http-request set-header X-OneProtect-Cert-Not-After %[ssl_c_notafter]
    http-request set-header X-OneProtect-Cert-Verify %[ssl_c_verify]
    default_backend app

backend app
    server app {upstream}
"#,
        dir = dir.display(),
        maxconn = max_connections(),
        cert_and_key = files.cert_and_key.display(),
        roots = files.client_roots_and_cas.display(),
        crls = files.crls.display(),
    )
}

/// Writes the config into `dir` and starts HAProxy in the foreground, pinned
/// to `cpus` with `taskset` when available. Returns `Ok(None)` when HAProxy
/// is not installed.
pub fn start(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    files: &ServerFiles,
    cpus: Option<&str>,
    threads: usize,
) -> anyhow::Result<Option<Server>> {
    let Some(haproxy) = find() else {
        return Ok(None);
    };
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("haproxy.cfg");
    std::fs::write(&conf, config(dir, listen, upstream, files, threads))?;
    let wrapper = crate::child::wrapper("ONEPROTECT_BENCH_HAPROXY_WRAPPER");
    let mut cmd = crate::child::command(&haproxy, cpus, &wrapper);
    // -db: foreground, no daemon; one process whose CPU time is measured.
    cmd.arg("-db").arg("-f").arg(&conf);
    let log = dir.join("haproxy.log");
    let s = crate::child::spawn_ready("haproxy", cmd, &log, listen, &wrapper, 10, &log)?;
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_verifies_clients_checks_crls_and_sets_the_headers() {
        let files = ServerFiles {
            cert: "/p/server.pem".into(),
            key: "/p/server.key".into(),
            client_roots: "/p/roots.pem".into(),
            client_roots_and_cas: "/p/roots-and-cas.pem".into(),
            cert_and_key: "/p/both.pem".into(),
            crls: "/p/crls.pem".into(),
        };
        let c = config(
            Path::new("/d"),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            &files,
            2,
        );
        assert!(c.contains("nbthread 2"), "{c}");
        assert!(
            c.contains(
                "crt /p/both.pem ca-file /p/roots-and-cas.pem crl-file /p/crls.pem verify required"
            ),
            "{c}"
        );
        assert!(c.contains("ssl-min-ver TLSv1.3"), "{c}");
        assert!(c.contains("server app 127.0.0.1:2\n"), "{c}");
        assert_eq!(
            c.matches("http-request set-header X-OneProtect-Cert-")
                .count(),
            5
        );
    }
}
