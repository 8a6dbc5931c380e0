//! A TLS certificate read from its PEM files and read again when they change, so that a
//! rotated certificate (cert-manager renewing a Secret, swapped in through the volume's
//! `..data` link) is served without a restart.

use crate::gateway::unix_now;
use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// How often a handshake may look at the files: at most once a second.
const RECHECK_SECS: u64 = 1;

#[derive(Debug)]
pub(crate) struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
    checked_at: AtomicU64,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
}

/// What tells a changed file: modification time and length of both.
type Stamp = Option<[(SystemTime, u64); 2]>;

impl ReloadingCertificate {
    /// Reads the pair once; an error names the file that cannot be used.
    pub(crate) fn load(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let stamp = stamp(&cert, &key);
        let loaded = read(&cert, &key)?;
        Ok(Self {
            current: ArcSwap::from_pointee(Loaded { key: loaded, stamp }),
            cert,
            key,
            checked_at: AtomicU64::new(unix_now()),
        })
    }

    /// Reads the files again when their stamp changed. A pair that does not load (a
    /// half-written rotation) leaves the previous certificate in service.
    fn refresh(&self) {
        let now = unix_now();
        let last = self.checked_at.load(Ordering::Relaxed);
        if now < last + RECHECK_SECS
            || self
                .checked_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let stamp = stamp(&self.cert, &self.key);
        if stamp == self.current.load().stamp {
            return;
        }
        match read(&self.cert, &self.key) {
            Ok(key) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                self.current.store(Arc::new(Loaded { key, stamp }));
            }
            Err(why) => {
                tracing::warn!(%why, "changed TLS certificate not loaded; the previous one serves")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current.load().key.clone())
    }
}

fn read(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<CertifiedKey>, String> {
    let (chain, private) =
        pingora::tls::load_certs_and_key_files(&cert.to_string_lossy(), &key.to_string_lossy())
            .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?
            .ok_or_else(|| {
                format!(
                    "{} holds no certificate or {} no private key",
                    cert.display(),
                    key.display()
                )
            })?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider")?;
    let certified = CertifiedKey::from_der(chain, private, provider)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Arc::new(certified))
}

fn stamp(cert: &std::path::Path, key: &std::path::Path) -> Stamp {
    let one = |path: &std::path::Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([one(cert)?, one(key)?])
}
