//! Bench identities: N agents across several tenants, minted directly from a
//! dev CA with the production profile (root → tenant issuing CA → agent leaf,
//! one URI SAN, clientAuth), plus a server certificate for the listeners.
//! Cached on disk between runs, because minting thousands of keys costs more
//! than many scenarios.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use oneprotect_testpki::TestPki;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

/// The bench trust domain.
pub const TRUST_DOMAIN: &str = "bench.oneprotect.local";

/// One agent identity.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentCreds {
    /// Tenant id.
    pub tenant: String,
    /// Agent id.
    pub agent: String,
    /// Leaf PEM.
    pub cert_pem: String,
    /// Tenant CA PEM (the chain sent after the leaf).
    pub chain_pem: String,
    /// Key PEM.
    pub key_pem: String,
}

/// Everything a run needs, as stored in `identities.json`.
#[derive(Clone, Serialize, Deserialize)]
pub struct BenchPki {
    /// The root (the gateway's and nginx's client trust bundle).
    pub root_pem: String,
    /// Every tenant CA, PEM (nginx needs them to build chains it is not sent).
    pub tenant_cas_pem: Vec<String>,
    /// The listeners' certificate (for 127.0.0.1 and localhost).
    pub server_cert_pem: String,
    /// Its key.
    pub server_key_pem: String,
    /// The agents.
    pub agents: Vec<AgentCreds>,
    /// Unix time the leaves expire; a cache past 90% of it is re-minted.
    pub not_after: i64,
    /// CRLs, PEM: the root's, then each tenant CA's (each lists
    /// [`REVOKED_PER_CRL`] serials, the tenant 0 one also `revoked_agent`'s),
    /// for the baselines' `ssl_crl` / `crl-file`. Empty in an old cache (then
    /// re-minted).
    #[serde(default)]
    pub crls_pem: Vec<String>,
    /// An identity whose serial is on its CA's CRL: the baselines must refuse
    /// it at the handshake (checked before every run).
    #[serde(default)]
    pub revoked_agent: Option<AgentCreds>,
}

/// Random revoked serials on each CRL, so a lookup is not of an empty list.
pub const REVOKED_PER_CRL: usize = 64;

impl BenchPki {
    /// Mints `agents` identities over `tenants` tenants.
    pub fn mint(agents: usize, tenants: usize) -> Self {
        let pki = TestPki::new(TRUST_DOMAIN);
        let cas: Vec<_> = (0..tenants.max(1))
            .map(|_| pki.tenant_ca(&uuid::Uuid::new_v4().to_string()))
            .collect();
        let mut out = Vec::with_capacity(agents);
        let mut not_after = i64::MAX;
        for i in 0..agents {
            let ca = &cas[i % cas.len()];
            let spec = oneprotect_testpki::LeafSpec::agent(ca, &uuid::Uuid::new_v4().to_string());
            not_after = not_after.min(spec.not_after.unix_timestamp());
            let agent = spec.uris[0]
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let leaf = ca.leaf(&spec);
            out.push(AgentCreds {
                tenant: ca.tenant.clone(),
                agent,
                cert_pem: leaf.cert_pem,
                chain_pem: ca.cert_pem.clone(),
                key_pem: leaf.key_pem,
            });
        }
        let server = pki.server_cert(&["127.0.0.1", "localhost"]);
        // One more agent of tenant 0, revoked on its CA's CRL.
        let revoked_id = uuid::Uuid::new_v4().to_string();
        let mut spec = oneprotect_testpki::LeafSpec::agent(&cas[0], &revoked_id);
        let revoked_serial = uuid::Uuid::new_v4().as_bytes().to_vec();
        spec.serial = Some(revoked_serial.clone());
        let leaf = cas[0].leaf(&spec);
        let revoked_agent = AgentCreds {
            tenant: cas[0].tenant.clone(),
            agent: revoked_id,
            cert_pem: leaf.cert_pem,
            chain_pem: cas[0].cert_pem.clone(),
            key_pem: leaf.key_pem,
        };
        let random = || -> Vec<Vec<u8>> {
            (0..REVOKED_PER_CRL)
                .map(|_| uuid::Uuid::new_v4().as_bytes().to_vec())
                .collect()
        };
        let valid = time::Duration::days(2);
        let mut crls_pem = vec![pki.crl_pem(&random(), valid)];
        for (i, ca) in cas.iter().enumerate() {
            let mut revoked = random();
            if i == 0 {
                revoked.push(revoked_serial.clone());
            }
            crls_pem.push(ca.crl_pem(&revoked, valid));
        }
        Self {
            root_pem: pki.root_pem(),
            tenant_cas_pem: cas.iter().map(|c| c.cert_pem.clone()).collect(),
            server_cert_pem: server.cert_pem,
            server_key_pem: server.key_pem,
            agents: out,
            not_after,
            crls_pem,
            revoked_agent: Some(revoked_agent),
        }
    }

    /// Loads `dir/identities.json` if it holds at least `agents` fresh
    /// identities over `tenants` tenants; otherwise mints and stores new ones.
    pub fn load_or_mint(dir: &Path, agents: usize, tenants: usize) -> anyhow::Result<Self> {
        let path = dir.join("identities.json");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Ok(bytes) = std::fs::read(&path) {
            if let Ok(p) = serde_json::from_slice::<BenchPki>(&bytes) {
                if p.agents.len() >= agents
                    && p.tenant_cas_pem.len() == tenants.max(1)
                    && p.crls_pem.len() == p.tenant_cas_pem.len() + 1
                    && p.revoked_agent.is_some()
                    && p.not_after > now + 3600
                {
                    return Ok(p.truncated(agents));
                }
            }
        }
        let p = Self::mint(agents, tenants);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(&path, serde_json::to_vec(&p)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(p)
    }

    fn truncated(mut self, agents: usize) -> Self {
        self.agents.truncate(agents);
        self
    }

    /// Writes the PEM files listeners need into `dir`; returns their paths.
    pub fn write_server_files(&self, dir: &Path) -> anyhow::Result<ServerFiles> {
        std::fs::create_dir_all(dir)?;
        let f = ServerFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_roots: dir.join("client-roots.pem"),
            client_roots_and_cas: dir.join("client-roots-and-cas.pem"),
            cert_and_key: dir.join("server-cert-and-key.pem"),
            crls: dir.join("crls.pem"),
        };
        std::fs::write(
            &f.cert_and_key,
            format!("{}{}", self.server_cert_pem, self.server_key_pem),
        )?;
        std::fs::write(&f.crls, self.crls_pem.concat())?;
        std::fs::write(&f.cert, &self.server_cert_pem)?;
        std::fs::write(&f.key, &self.server_key_pem)?;
        std::fs::write(&f.client_roots, &self.root_pem)?;
        let mut all = self.root_pem.clone();
        for ca in &self.tenant_cas_pem {
            all.push_str(ca);
        }
        std::fs::write(&f.client_roots_and_cas, all)?;
        Ok(f)
    }

    /// One mTLS client configuration per agent, trusting the bench root for
    /// the server. `resumption` false gives a configuration that never
    /// resumes (every connection is a full handshake).
    pub fn client_configs(
        &self,
        alpn: &[u8],
        resumption: bool,
    ) -> anyhow::Result<Vec<Arc<ClientConfig>>> {
        let roots = oneprotect_agent::tls::roots_from_pem(self.root_pem.as_bytes())?;
        self.agents
            .iter()
            .map(|a| {
                client_config(
                    &roots,
                    &a.cert_pem,
                    &a.chain_pem,
                    &a.key_pem,
                    alpn,
                    resumption,
                )
            })
            .collect()
    }
}

/// One agent's mTLS client configuration: leaf + chain + key, trusting
/// `roots` for the server, offering `alpn`, resuming sessions or not.
pub fn client_config(
    roots: &rustls::RootCertStore,
    cert_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    alpn: &[u8],
    resumption: bool,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut chain = oneprotect_agent::tls::certs_from_pem(cert_pem.as_bytes())?;
    chain.extend(oneprotect_agent::tls::certs_from_pem(chain_pem.as_bytes())?);
    let key = oneprotect_agent::tls::key_from_pem(key_pem.as_bytes())?;
    let mut cfg = Arc::unwrap_or_clone(oneprotect_agent::tls::mutual(roots.clone(), chain, key)?);
    cfg.alpn_protocols = vec![alpn.to_vec()];
    if !resumption {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// PEM files for the servers under test.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// The root that verifies client certificates.
    pub client_roots: PathBuf,
    /// The root and every tenant CA (for servers that want the whole set).
    pub client_roots_and_cas: PathBuf,
    /// Server certificate followed by its key (HAProxy's `crt`).
    pub cert_and_key: PathBuf,
    /// The root's and every tenant CA's CRL (nginx `ssl_crl`, HAProxy
    /// `crl-file`: both check every certificate of the chain).
    pub crls: PathBuf,
}
