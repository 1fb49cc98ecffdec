//! Where the server, its CA and the admin key come from: a flag, else the
//! environment, else the configuration file (`cli.toml`).
//!
//! | setting | flag | environment | `cli.toml` |
//! |---|---|---|---|
//! | server URL | `--server` | `ONEPROTECT_SERVER` | `server` |
//! | CA file (PEM) | `--ca-file` | `ONEPROTECT_CA_FILE` | `ca_file` |
//! | admin key | `--admin-key-file` | `ONEPROTECT_ADMIN_KEY` (the key itself) | `admin_key_file` |
//!
//! The admin key is never taken as a command-line value: a command line is
//! visible to every user of the machine (`ps`, `/proc`) and lands in shell
//! history. The key is read only when a command needs it, kept in
//! [`AdminKeySecret`] (whose `Debug`/`Display` print `[redacted]`) and sent
//! only in the `Authorization` header.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use oneprotect_identity::AdminKeySecret;
use serde::Deserialize;

use crate::error::CliError;

/// The environment variable holding the server URL.
pub const ENV_SERVER: &str = "ONEPROTECT_SERVER";
/// The environment variable holding the CA file path.
pub const ENV_CA_FILE: &str = "ONEPROTECT_CA_FILE";
/// The environment variable holding the admin key itself.
pub const ENV_ADMIN_KEY: &str = "ONEPROTECT_ADMIN_KEY";

/// `cli.toml`: every key optional; unknown keys are refused. Relative paths
/// are relative to the file's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The enroll-api base URL.
    pub server: Option<String>,
    /// PEM roots that verify the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// A file holding the admin key (keep it mode 0600).
    pub admin_key_file: Option<PathBuf>,
}

impl FileConfig {
    /// Parses `text`, read from `path` (named in errors; relative paths in
    /// the file are made relative to its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self, CliError> {
        let mut cfg: FileConfig = toml::from_str(text).map_err(|e| {
            CliError::usage(format!(
                "config {}: {}",
                path.display(),
                e.message().trim_end()
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca_file, &mut cfg.admin_key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(cfg)
    }
}

/// The configuration file to read: `--config`, else
/// `$XDG_CONFIG_HOME/oneprotect/cli.toml`, else
/// `$HOME/.config/oneprotect/cli.toml`. `required` is true when it was named
/// with `--config` (then a missing file is an error).
pub fn config_path(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(PathBuf, bool)> {
    if let Some(p) = flag {
        return Some((p.to_owned(), true));
    }
    let base = env("XDG_CONFIG_HOME")
        .filter(|d| Path::new(d).is_absolute())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some((base.join("oneprotect").join("cli.toml"), false))
}

/// Reads the configuration file, if any (see [`config_path`]).
pub fn load_config(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, CliError> {
    let Some((path, required)) = config_path(flag, env) else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => FileConfig::parse(&text, &path),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(CliError::usage(format!("config {}: {e}", path.display()))),
    }
}

/// The settings as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--server`.
    pub server: Option<String>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--admin-key-file`.
    pub admin_key_file: Option<PathBuf>,
}

/// Where the admin key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `ONEPROTECT_ADMIN_KEY`: the key itself.
    Env(AdminKeySecret),
    /// A file, named by `--admin-key-file` or `admin_key_file`.
    File(PathBuf),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Env(_) => write!(f, "Env({ENV_ADMIN_KEY})"),
            KeySource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// The resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server, when one was given anywhere.
    pub server: Option<String>,
    /// PEM roots for HTTPS; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// The admin key's source, when one was given anywhere.
    pub key: Option<KeySource>,
}

impl Settings {
    /// Each setting from the flag, else the environment, else the file.
    /// Empty values count as unset.
    pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>, file: FileConfig) -> Self {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let server = flags
            .server
            .clone()
            .or_else(|| env(ENV_SERVER))
            .or(file.server);
        let ca_file = flags
            .ca_file
            .clone()
            .or_else(|| env(ENV_CA_FILE).map(PathBuf::from))
            .or(file.ca_file);
        let key = flags
            .admin_key_file
            .clone()
            .map(KeySource::File)
            .or_else(|| env(ENV_ADMIN_KEY).map(|k| KeySource::Env(AdminKeySecret::new(k))))
            .or(file.admin_key_file.map(KeySource::File));
        Settings {
            server,
            ca_file,
            key,
        }
    }

    /// The server URL, parsed; a usage error when none was given.
    pub fn server_url(&self) -> Result<ServerUrl, CliError> {
        let s = self.server.as_deref().ok_or_else(|| {
            CliError::usage(format!(
                "no server: give --server URL, set {ENV_SERVER}, or put `server = \"https://…\"` in cli.toml"
            ))
        })?;
        ServerUrl::parse(s)
    }

    /// The admin key: read now (a file is read at each call). A usage error
    /// when none was configured or the file is unusable; the error never
    /// holds the key.
    pub fn admin_key(&self) -> Result<AdminKeySecret, CliError> {
        let key = match &self.key {
            None => {
                return Err(CliError::usage(format!(
                    "this command needs the admin key: set {ENV_ADMIN_KEY}, give \
                     --admin-key-file PATH, or put admin_key_file in cli.toml"
                )))
            }
            Some(KeySource::Env(k)) => k.expose_secret().trim().to_owned(),
            Some(KeySource::File(p)) => read_key_file(p)?,
        };
        check_key(&key)?;
        Ok(AdminKeySecret::new(key))
    }
}

fn read_key_file(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("admin key file {}: {e}", path.display())))?;
    warn_if_readable_by_others(path);
    Ok(text.trim().to_owned())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: admin key file {} is accessible to other users; chmod 600 it",
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// A key must be one token of visible ASCII to travel in a header. The
/// error names neither the key nor the offending character.
fn check_key(key: &str) -> Result<(), CliError> {
    if key.is_empty() {
        return Err(CliError::usage("the admin key is empty"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::usage(
            "the admin key holds spaces or characters that cannot be sent in a header \
             (is the key file one line with only the key?)",
        ));
    }
    Ok(())
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP: loopback only unless `--insecure-http`.
    Http,
    /// HTTPS.
    Https,
}

/// The server's base URL: `https://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The scheme.
    pub scheme: Scheme,
    /// The host, without IPv6 brackets.
    pub host: String,
    /// The port (443 or 80 when absent).
    pub port: u16,
    /// A path prefix without a trailing slash (`""` for none), for a server
    /// published under a path by a reverse proxy.
    pub prefix: String,
}

impl ServerUrl {
    /// Parses `http(s)://host[:port][/prefix]`; no userinfo, query or fragment.
    pub fn parse(s: &str) -> Result<Self, CliError> {
        let bad = |why: &str| CliError::usage(format!("server URL {s:?}: {why}"));
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(bad("must start with https:// (or http:// for loopback)"));
        };
        if rest.contains(['?', '#']) {
            return Err(bad("no query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("no user info (the admin key is sent as a header)"));
        }
        let default_port = match scheme {
            Scheme::Https => 443,
            Scheme::Http => 80,
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in [ ]"))?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
                None if p.is_empty() => default_port,
                None => return Err(bad("invalid port")),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("invalid port"))?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("no host or port"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            return Err(bad("invalid host"));
        }
        let prefix = path.trim_end_matches('/');
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("invalid path"));
        }
        Ok(ServerUrl {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            prefix: prefix.to_owned(),
        })
    }

    /// Whether the host is a loopback name or address (`localhost`,
    /// `127.0.0.0/8`, `::1`). Plain HTTP to it needs no flag; the client
    /// still checks that every address it connects to is loopback.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Fails closed on plain HTTP to a host that is not loopback, unless
    /// `insecure_http` (the `--insecure-http` flag) allows it.
    pub fn check_transport(&self, insecure_http: bool) -> Result<(), CliError> {
        if self.scheme == Scheme::Http && !insecure_http && !self.is_loopback() {
            return Err(CliError::usage(format!(
                "refusing plain http:// to {}: the admin key and token secrets would \
                 travel unencrypted. Use https://, or pass --insecure-http if the \
                 network path is protected otherwise",
                self.host
            )));
        }
        Ok(())
    }

    /// `host:port` (IPv6 in brackets), for the `Host` header and messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        write!(f, "{scheme}://{}{}", self.authority(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file() -> FileConfig {
        FileConfig {
            server: Some("https://from-file:1".into()),
            ca_file: Some("/file/ca.pem".into()),
            admin_key_file: Some("/file/key".into()),
        }
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let env = env_of(&[
            (ENV_SERVER, "https://from-env:1"),
            (ENV_CA_FILE, "/env/ca.pem"),
            (ENV_ADMIN_KEY, "opak_fromenv"),
        ]);
        let flags = Flags {
            server: Some("https://from-flag:1".into()),
            ca_file: Some("/flag/ca.pem".into()),
            admin_key_file: Some("/flag/key".into()),
        };
        let s = Settings::resolve(&flags, &env, file());
        assert_eq!(s.server.as_deref(), Some("https://from-flag:1"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/flag/ca.pem")));
        assert_eq!(s.key, Some(KeySource::File("/flag/key".into())));

        let s = Settings::resolve(&Flags::default(), &env, file());
        assert_eq!(s.server.as_deref(), Some("https://from-env:1"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/env/ca.pem")));
        assert_eq!(
            s.key,
            Some(KeySource::Env(AdminKeySecret::new("opak_fromenv")))
        );

        let s = Settings::resolve(&Flags::default(), &env_of(&[]), file());
        assert_eq!(s.server.as_deref(), Some("https://from-file:1"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/file/ca.pem")));
        assert_eq!(s.key, Some(KeySource::File("/file/key".into())));

        let s = Settings::resolve(&Flags::default(), &env_of(&[]), FileConfig::default());
        assert!(s.server.is_none() && s.ca_file.is_none() && s.key.is_none());
        assert!(matches!(s.server_url(), Err(CliError::Usage(_))));
        assert!(matches!(s.admin_key(), Err(CliError::Usage(_))));
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let env = env_of(&[(ENV_SERVER, ""), (ENV_ADMIN_KEY, "  ")]);
        let s = Settings::resolve(&Flags::default(), &env, file());
        assert_eq!(s.server.as_deref(), Some("https://from-file:1"));
        assert_eq!(s.key, Some(KeySource::File("/file/key".into())));
    }

    #[test]
    fn debug_output_never_holds_the_key() {
        let env = env_of(&[(ENV_ADMIN_KEY, "opak_verysecret")]);
        let s = Settings::resolve(&Flags::default(), &env, FileConfig::default());
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("opak_verysecret"), "{dbg}");
        let key = s.admin_key().unwrap();
        assert_eq!(key.expose_secret(), "opak_verysecret");
        assert!(!format!("{key:?} {key}").contains("verysecret"));
    }

    #[test]
    fn key_file_is_trimmed_and_bad_keys_are_refused_without_echo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "opak_abc\n").unwrap();
        let s = Settings {
            server: None,
            ca_file: None,
            key: Some(KeySource::File(path.clone())),
        };
        assert_eq!(s.admin_key().unwrap().expose_secret(), "opak_abc");
        std::fs::write(&path, "opak_a bc\n").unwrap();
        let e = s.admin_key().unwrap_err().to_string();
        assert!(!e.contains("opak_a"), "{e}");
        let missing = Settings {
            key: Some(KeySource::File(dir.path().join("nope"))),
            ..s
        };
        assert!(matches!(missing.admin_key(), Err(CliError::Usage(_))));
    }

    #[test]
    fn config_file_parses_resolves_relative_paths_and_refuses_unknown_keys() {
        let cfg = FileConfig::parse(
            "server = \"https://h:8444\"\nca_file = \"ca.pem\"\nadmin_key_file = \"/abs/key\"\n",
            Path::new("/etc/oneprotect/cli.toml"),
        )
        .unwrap();
        assert_eq!(cfg.server.as_deref(), Some("https://h:8444"));
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/etc/oneprotect/ca.pem")));
        assert_eq!(cfg.admin_key_file, Some(PathBuf::from("/abs/key")));
        let e = FileConfig::parse("admin_key = \"opak_x\"\n", Path::new("/c.toml")).unwrap_err();
        assert!(e.to_string().contains("admin_key"), "{e}");
        assert!(!e.to_string().contains("opak_x"), "{e}");
    }

    #[test]
    fn config_path_defaults() {
        let p = config_path(
            None,
            &env_of(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/h")]),
        );
        assert_eq!(p, Some((PathBuf::from("/xdg/oneprotect/cli.toml"), false)));
        let p = config_path(None, &env_of(&[("HOME", "/h")]));
        assert_eq!(
            p,
            Some((PathBuf::from("/h/.config/oneprotect/cli.toml"), false))
        );
        // A relative XDG_CONFIG_HOME is ignored (XDG base directory spec).
        let p = config_path(None, &env_of(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")]));
        assert_eq!(
            p,
            Some((PathBuf::from("/h/.config/oneprotect/cli.toml"), false))
        );
        let p = config_path(Some(Path::new("/x.toml")), &env_of(&[]));
        assert_eq!(p, Some((PathBuf::from("/x.toml"), true)));
        assert_eq!(config_path(None, &env_of(&[])), None);
    }

    #[test]
    fn missing_default_config_is_fine_missing_named_config_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_owned();
        let env = env_of(&[("HOME", &home)]);
        assert_eq!(load_config(None, &env).unwrap(), FileConfig::default());
        let named = dir.path().join("missing.toml");
        assert!(matches!(
            load_config(Some(&named), &env),
            Err(CliError::Usage(_))
        ));
        std::fs::create_dir_all(dir.path().join(".config/oneprotect")).unwrap();
        std::fs::write(
            dir.path().join(".config/oneprotect/cli.toml"),
            "server = \"https://cfg:1\"\n",
        )
        .unwrap();
        assert_eq!(
            load_config(None, &env).unwrap().server.as_deref(),
            Some("https://cfg:1")
        );
    }

    #[test]
    fn server_urls_parse() {
        let u = ServerUrl::parse("https://127.0.0.1:8444").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.prefix.as_str()),
            (Scheme::Https, "127.0.0.1", 8444, "")
        );
        assert_eq!(u.to_string(), "https://127.0.0.1:8444");
        let u = ServerUrl::parse("https://Enroll.Example/base/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("enroll.example", 443));
        assert_eq!(u.prefix, "/base");
        let u = ServerUrl::parse("http://[::1]:8446").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8446));
        assert_eq!(u.authority(), "[::1]:8446");
        assert_eq!(ServerUrl::parse("http://localhost").unwrap().port, 80);
        for bad in [
            "127.0.0.1:8444",
            "ftp://h",
            "https://",
            "https://:1",
            "https://h:0",
            "https://h:99999",
            "https://h:x",
            "https://u:p@h:1",
            "https://h:1/?q=1",
            "https://h:1/#f",
            "https://[::1",
            "https://[nothex]:1",
            "https://h h:1",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback_unless_explicitly_allowed() {
        for ok in [
            "http://127.0.0.1:8446",
            "http://127.1.2.3:1",
            "http://localhost:8446",
            "http://[::1]:8446",
            "https://enroll.example",
        ] {
            ServerUrl::parse(ok)
                .unwrap()
                .check_transport(false)
                .unwrap();
        }
        for remote in [
            "http://enroll.example:80",
            "http://10.0.0.1:8446",
            "http://[2001:db8::1]:1",
            "http://localhost.evil.example",
        ] {
            let u = ServerUrl::parse(remote).unwrap();
            let e = u.check_transport(false).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{remote}");
            assert!(e.to_string().contains("--insecure-http"), "{e}");
            u.check_transport(true).unwrap();
        }
    }
}
