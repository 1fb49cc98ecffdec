//! The nginx baseline: `ssl_verify_client on` with the same certificates and
//! every CA's CRL (`ssl_crl`), `--server-threads` workers, identity headers to the same upstream over pooled keep-alive
//! connections. Optional: skipped with a clear message when nginx is absent.
//!
//! Pitfall this config avoids: a `location` that sets any `proxy_set_header`
//! inherits none from `http`, so `Connection ""` (needed for upstream
//! keep-alive) is set in the same `location` as the identity headers. The
//! harness checks it by counting the upstream's accepted connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::child::{which, Server};
use crate::pki::ServerFiles;

/// Path of the nginx binary, if installed.
pub fn find() -> Option<PathBuf> {
    which("nginx")
}

/// The nginx configuration text.
/// With `single_process` nginx serves from its master process (no fork):
/// under a profiler, so the process that does the work is the one it follows
/// and writes out on exit.
pub fn config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    files: &ServerFiles,
    single_process: bool,
    workers: usize,
) -> String {
    let master = if single_process { "off" } else { "on" };
    format!(
        r#"worker_processes {workers};
daemon off;
master_process {master};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_requests 1000000;
    upstream app {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen {listen} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {roots};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {crls};
        ssl_protocols TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-OneProtect-Cert-Serial $ssl_client_serial;
            proxy_set_header X-OneProtect-Cert-Fingerprint $ssl_client_fingerprint;
            proxy_set_header X-OneProtect-Cert-Subject $ssl_client_s_dn;
            proxy_set_header X-OneProtect-Cert-Not-After $ssl_client_v_end;
            proxy_set_header X-OneProtect-Cert-Verify $ssl_client_verify;
            proxy_set_header X-Forwarded-Client-Cert "";
        }}
    }}
}}
"#,
        dir = dir.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        roots = files.client_roots_and_cas.display(),
        crls = files.crls.display(),
    )
}

/// Writes the config into `dir` and starts nginx with `workers` worker
/// processes, pinned to `cpus` with `taskset` when available. Returns `Ok(None)` when nginx is not installed.
pub fn start(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    files: &ServerFiles,
    cpus: Option<&str>,
    workers: usize,
) -> anyhow::Result<Option<Server>> {
    let Some(nginx) = find() else {
        return Ok(None);
    };
    std::fs::create_dir_all(dir.join("tmp"))?;
    let conf = dir.join("nginx.conf");
    let wrapper = crate::child::wrapper("ONEPROTECT_BENCH_NGINX_WRAPPER");
    std::fs::write(
        &conf,
        config(dir, listen, upstream, files, !wrapper.is_empty(), workers),
    )?;
    let mut cmd = crate::child::command(&nginx, cpus, &wrapper);
    cmd.arg("-p").arg(dir).arg("-c").arg(&conf);
    let log = dir.join("stdout.log");
    let s = crate::child::spawn_ready(
        "nginx",
        cmd,
        &log,
        listen,
        &wrapper,
        10,
        &dir.join("error.log"),
    )?;
    Ok(Some(s))
}
