//! The workflows behind the agent-facing endpoints, apart from HTTP (as
//! smallstep keeps `authority/` apart from `api/`): [`exchange`] (token +
//! CSR → first certificate) and [`rotation`] (rotate, confirm). Each is a
//! function over the service's parts ([`crate::http::Inner`]) with a typed
//! error; the handlers in `http/` parse the request, call it and map the
//! error to a problem document.
//!
//! What both share lives here: the tenant's leaf lifetime policy and the
//! stored form of an issued leaf.

pub mod exchange;
pub mod rotation;

use std::time::Duration;

use oneprotect_identity::CertFingerprint;

use crate::ca::IssuedLeaf;
use crate::store::{NewCertificate, Tenant};

/// The shortest leaf lifetime issued, whatever the tenant row says.
const MIN_LEAF_LIFETIME_SECS: i64 = 60;

/// The lifetime of a leaf issued to `tenant`'s agents (at least a minute).
pub fn leaf_lifetime(tenant: &Tenant) -> Duration {
    Duration::from_secs(
        tenant
            .leaf_lifetime_secs
            .max(MIN_LEAF_LIFETIME_SECS)
            .unsigned_abs(),
    )
}

/// The certificate row of a freshly issued `leaf`.
pub fn new_certificate(leaf: &IssuedLeaf) -> NewCertificate {
    NewCertificate {
        serial: leaf.serial,
        fingerprint: CertFingerprint::of_der(&leaf.cert_der).to_string(),
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        cert_pem: leaf.cert_pem.clone(),
    }
}
