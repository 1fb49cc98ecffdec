//! The trust bundle: the anchors agent chains must lead to, loaded once at
//! start and swapped on reload (SIGHUP, or when the file changes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, TrustAnchor};

use crate::files::{read_certs, FileError, FileProblem};

/// The trust anchors agent chains must lead to.
#[derive(Debug)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    ders: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates.
    pub fn from_ders(ders: Vec<CertificateDer<'static>>) -> Result<Self, webpki::Error> {
        let anchors = ders
            .iter()
            .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
            .collect::<Result<_, _>>()?;
        Ok(Self { anchors, ders })
    }

    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether the bundle is empty (never true for a loaded bundle).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The anchors, for path validation.
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The certificate `anchor` (one of [`Self::anchors`]) was made from.
    pub(crate) fn der_of(&self, anchor: &TrustAnchor<'_>) -> Option<&CertificateDer<'static>> {
        self.anchors
            .iter()
            .position(|a| std::ptr::eq(a, anchor))
            .map(|i| &self.ders[i])
    }
}

/// Reads a PEM trust bundle (one or more root certificates).
pub fn load_trust_bundle(path: &Path) -> Result<TrustBundle, FileError> {
    let ders = read_certs("trust bundle", path)?;
    TrustBundle::from_ders(ders)
        .map_err(|e| FileError::new("trust bundle", path, FileProblem::NotAnAnchor(e)))
}

/// The current trust bundle, swappable at run time without dropping
/// connections (new handshakes use the new bundle; established connections
/// keep their verified identity).
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    current: ArcSwap<TrustBundle>,
    modified: std::sync::Mutex<Option<SystemTime>>,
}

impl TrustStore {
    /// Loads the bundle at `path`.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let bundle = load_trust_bundle(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(bundle),
            modified: std::sync::Mutex::new(mtime(path)),
        })
    }

    /// The bundle in force.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// Re-reads the file and swaps the bundle in; on error the old bundle
    /// stays in force.
    pub fn reload(&self) -> Result<usize, FileError> {
        let bundle = load_trust_bundle(&self.path)?;
        let n = bundle.len();
        self.current.store(Arc::new(bundle));
        if let Ok(mut m) = self.modified.lock() {
            *m = mtime(&self.path);
        }
        Ok(n)
    }

    /// Reloads when the file's modification time changed since the last
    /// load. Returns `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<usize, FileError>> {
        let now = mtime(&self.path);
        let changed = self.modified.lock().map(|m| *m != now).unwrap_or(true);
        changed.then(|| self.reload())
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_testpki::TestPki;

    #[test]
    fn a_failed_reload_names_the_file_and_keeps_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, TestPki::new("oneprotect.test").root_pem()).unwrap();
        let store = TrustStore::load(&path).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        let e = store.reload().unwrap_err();
        assert!(matches!(e.problem, FileProblem::NoCertificate));
        let e = e.to_string();
        assert!(
            e.contains("trust bundle") && e.contains("bundle.pem"),
            "{e}"
        );
        assert_eq!(store.current().len(), 1);
    }
}
