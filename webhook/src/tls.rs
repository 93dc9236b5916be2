//! TLS for `/mutate`: rustls (aws-lc-rs, TLS 1.2+) with a serving certificate that is reloaded
//! from disk whenever its files change, without restarting the listener.
//!
//! Kubelet updates a Secret volume by writing a new timestamped directory and atomically
//! renaming a `..data_tmp` symlink over `..data`; `tls.crt`/`tls.key` are symlinks through
//! `..data`. Watching the directories that hold the files sees that rename. A reload that reads
//! a half-updated pair (certificate and key that do not match) keeps the current certificate
//! and retries shortly, so a handshake never sees a broken pair.

use crate::metrics::Metrics;
use crate::{Error, Result};
use arc_swap::ArcSwap;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a reload that read a mismatched certificate/key pair is retried.
const RELOAD_RETRIES: u32 = 10;
const RELOAD_RETRY_DELAY: Duration = Duration::from_millis(100);
/// How often the pair is re-read regardless of file events, in case the watcher missed one
/// (inotify queue overflow, a volume type without events).
pub const REREAD_INTERVAL: Duration = Duration::from_secs(60);

/// `reason` label of a handshake that did not finish within the handshake timeout.
pub const HANDSHAKE_TIMEOUT_REASON: &str = "timeout";
/// Every `reason` of `multus_eni_webhook_tls_handshake_failures_total`.
pub const HANDSHAKE_FAILURE_REASONS: [&str; 6] = [
    "client_rejected_certificate",
    "no_common_protocol",
    "not_tls",
    "client_closed",
    HANDSHAKE_TIMEOUT_REASON,
    "other",
];

/// Why a TLS handshake failed, in a few operator-facing classes. `client_rejected_certificate`
/// (the client's alert says it does not trust our certificate) is what a stale caBundle or an
/// expired certificate looks like from the server.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    let tls = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            // A CA with the same name but another key (a regenerated CA): the signature check
            // fails.
            | Alert::DecryptError,
        )) => "client_rejected_certificate",
        Some(
            rustls::Error::PeerIncompatible(_)
            | rustls::Error::NoApplicationProtocol
            | rustls::Error::AlertReceived(Alert::HandshakeFailure | Alert::ProtocolVersion),
        ) => "no_common_protocol",
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. },
        ) => "not_tls",
        Some(_) => "other",
        None => match err.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "client_closed",
            _ => "other",
        },
    }
}

/// When a certificate may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Reads the validity of a DER certificate.
    pub fn of(der: &[u8]) -> Result<Validity> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(Error::CertificateParse)?;
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            match u64::try_from(secs) {
                Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
                Err(_) => UNIX_EPOCH,
            }
        };
        Ok(Validity {
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }

    /// Whether `now` is inside the validity period.
    pub fn contains(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    fn not_after_unix(&self) -> i64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

/// The leaf's validity, if the chain has one that parses.
fn leaf_validity(key: &CertifiedKey) -> Option<Validity> {
    key.cert.first().and_then(|der| Validity::of(der).ok())
}

/// Logs loudly when a certificate is not valid now: clients will refuse it.
fn warn_if_not_valid(path: &Path, validity: Option<Validity>, now: SystemTime) {
    if let Some(v) = validity
        && !v.contains(now)
    {
        let state = if now < v.not_before {
            "not yet valid"
        } else {
            "expired"
        };
        tracing::error!(
            cert = %path.display(),
            not_before = %humantime::format_rfc3339_seconds(v.not_before),
            not_after = %humantime::format_rfc3339_seconds(v.not_after),
            "serving certificate is {state}: the kube-apiserver will refuse it and pods will fail to create"
        );
    }
}

static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();

/// Installs aws-lc-rs as the process-wide rustls provider (once) and returns it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    PROVIDER
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            // Fails only if another provider was installed first; ours is used explicitly anyway.
            let _ = CryptoProvider::install_default(provider.as_ref().clone());
            provider
        })
        .clone()
}

/// Reads a PEM certificate chain and private key into a rustls [`CertifiedKey`], checking that
/// the key belongs to the certificate.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| Error::file(cert_path, e))?;
    let key_pem = std::fs::read(key_path).map_err(|e| Error::file(key_path, e))?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::file(cert_path, e))?;
    if chain.is_empty() {
        return Err(Error::NoPem {
            path: cert_path.to_path_buf(),
            what: "certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| Error::file(key_path, e))?
        .ok_or_else(|| Error::NoPem {
            path: key_path.to_path_buf(),
            what: "private key",
        })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| Error::KeyPair {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        source,
    })
}

/// The serving certificate in use, swapped atomically on reload.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the certificate once; fails when the files are missing or do not match, so a
    /// misconfigured webhook does not start.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Arc<Self>> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let provider = crypto_provider();
        let key = load_certified_key(&cert_path, &key_path, &provider)?;
        let validity = leaf_validity(&key);
        // Served anyway: it is all there is, and the error log says what to fix.
        warn_if_not_valid(&cert_path, validity, SystemTime::now());
        if let Some(m) = &metrics {
            m.observe_cert_reload(true);
            if let Some(v) = validity {
                m.set_cert_expiry(v.not_after_unix());
            }
        }
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(key),
            cert_path,
            key_path,
            provider,
            metrics,
        }))
    }

    /// The certificate chain served to new connections.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Re-reads the files; swaps in the new pair when it is valid and different.
    /// Returns whether the served certificate changed.
    ///
    /// A pair that is expired or not yet valid is refused while the current one is still
    /// valid (a restored backup or a clock-skewed issuer must not break a working webhook).
    pub fn reload(&self) -> Result<bool> {
        self.reload_at(SystemTime::now())
    }

    fn reload_at(&self, now: SystemTime) -> Result<bool> {
        let key =
            load_certified_key(&self.cert_path, &self.key_path, &self.provider).and_then(|key| {
                if key.cert == self.current.load().cert {
                    return Ok(None);
                }
                let validity = leaf_validity(&key);
                let usable = |v: Option<Validity>| v.is_none_or(|v| v.contains(now));
                if !usable(validity) && usable(leaf_validity(&self.current.load())) {
                    return Err(Error::CertificateNotValid {
                        path: self.cert_path.clone(),
                    });
                }
                Ok(Some((key, validity)))
            });
        if let Some(m) = &self.metrics {
            m.observe_cert_reload(key.is_ok());
        }
        let Some((key, validity)) = key? else {
            return Ok(false);
        };
        warn_if_not_valid(&self.cert_path, validity, now);
        if let (Some(m), Some(v)) = (&self.metrics, validity) {
            m.set_cert_expiry(v.not_after_unix());
        }
        self.current.store(Arc::new(key));
        Ok(true)
    }

    /// Re-reads the pair every `every` (the server uses [`REREAD_INTERVAL`]) as a safety net
    /// for a missed file event; stops when the returned guard is dropped. Needs a Tokio runtime.
    pub fn reread_every(self: &Arc<Self>, every: Duration) -> RereadGuard {
        let store = Arc::clone(self);
        RereadGuard(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || store.reload_settled()).await;
            }
        }))
    }

    /// Reload with a few retries, for a pair caught in the middle of an update.
    fn reload_settled(&self) {
        for attempt in 0..=RELOAD_RETRIES {
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                    return;
                }
                Ok(false) => return,
                Err(err) if attempt == RELOAD_RETRIES => {
                    tracing::error!(error = %err, "serving certificate not reloaded; keeping the current one");
                }
                Err(_) => std::thread::sleep(RELOAD_RETRY_DELAY),
            }
        }
    }

    /// Whether a change to `paths` can affect the pair: the certificate or key file itself, or
    /// the kubelet's `..data` symlink and timestamped directories behind a Secret volume. Other
    /// files in the same directory (logs, unrelated keys) do not trigger a reload. An event
    /// without paths (a watcher rescan) counts.
    fn concerns_pair(&self, paths: &[PathBuf]) -> bool {
        let names = [self.cert_path.file_name(), self.key_path.file_name()];
        paths.is_empty()
            || paths.iter().any(|path| {
                path.file_name().is_some_and(|name| {
                    names.contains(&Some(name)) || name.to_string_lossy().starts_with("..")
                })
            })
    }

    /// Starts watching the directories of the certificate and key; keep the returned watcher
    /// alive for as long as reloads should happen.
    pub fn watch(self: &Arc<Self>) -> Result<RecommendedWatcher> {
        let store = Arc::clone(self);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
                Ok(event) if !store.concerns_pair(&event.paths) => {}
                Ok(_) => store.reload_settled(),
                Err(err) => tracing::warn!(error = %err, "certificate watcher error"),
            })?;
        let dirs: BTreeSet<PathBuf> = [&self.cert_path, &self.key_path]
            .into_iter()
            .map(|p| match p.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        for dir in dirs {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
        Ok(watcher)
    }
}

/// Stops the periodic re-read of [`CertStore::reread_periodically`] when dropped.
#[derive(Debug)]
pub struct RereadGuard(tokio::task::JoinHandle<()>);

impl Drop for RereadGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// rustls server configuration: TLS 1.3 and 1.2, HTTP/2 and HTTP/1.1, certificate from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(Error::TlsConfig)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .and_then(|p| p.self_signed(&key))
            .unwrap_or_else(|e| panic!("{e}"));
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        (cert_path, key_path)
    }

    #[test]
    fn mismatched_pair_is_refused_and_current_kept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        let store = CertStore::load(&cert_a, &key_a, None).unwrap_or_else(|e| panic!("{e}"));
        let before = store.current().cert.clone();
        std::fs::copy(&key_b, &key_a).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.reload().is_err());
        assert_eq!(store.current().cert, before);
        assert!(CertStore::load(&cert_a, &key_b, None).is_err());
    }

    #[test]
    fn only_changes_to_the_pair_or_kubelet_data_trigger_a_reload() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (cert, key) = write_pair(dir.path(), "tls");
        let store = CertStore::load(&cert, &key, None).unwrap_or_else(|e| panic!("{e}"));
        let at = |name: &str| vec![dir.path().join(name)];
        assert!(store.concerns_pair(&at("tls.crt")));
        assert!(store.concerns_pair(&at("tls.key")));
        assert!(store.concerns_pair(&at("..data")));
        assert!(store.concerns_pair(&at("..data_tmp")));
        assert!(store.concerns_pair(&at("..2026_11_25_18_00_00.123")));
        assert!(store.concerns_pair(&[]));
        assert!(!store.concerns_pair(&at("server.log")));
        assert!(!store.concerns_pair(&at("ca.crt")));
    }

    /// A self-signed pair for `localhost` valid from `not_before` to `not_after`.
    fn write_pair_valid(
        dir: &Path,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        std::fs::write(&cert_path, cert.pem()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
        (cert_path, key_path)
    }

    #[test]
    fn the_served_certificate_expiry_is_exposed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let now = time::OffsetDateTime::now_utc();
        let not_after = now + time::Duration::days(30);
        let (cert, key) = write_pair_valid(dir.path(), now - time::Duration::hours(1), not_after);
        let metrics = Arc::new(Metrics::new());
        let _store =
            CertStore::load(&cert, &key, Some(metrics.clone())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metrics.cert_expiry.get(), not_after.unix_timestamp());
    }

    #[test]
    fn a_reload_to_an_expired_or_future_certificate_is_refused_while_the_current_is_valid() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let now = time::OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        let (cert, key) = write_pair_valid(dir.path(), now - day, now + time::Duration::days(30));
        let metrics = Arc::new(Metrics::new());
        let store =
            CertStore::load(&cert, &key, Some(metrics.clone())).unwrap_or_else(|e| panic!("{e}"));
        let good = store.current().cert.clone();
        for (from, to) in [
            (now - time::Duration::days(30), now - day),
            (now + day, now + time::Duration::days(30)),
        ] {
            write_pair_valid(dir.path(), from, to);
            assert!(matches!(
                store.reload(),
                Err(Error::CertificateNotValid { .. })
            ));
            assert_eq!(store.current().cert, good);
        }
        assert_eq!(
            metrics.cert_expiry.get(),
            (now + time::Duration::days(30)).unix_timestamp()
        );
        // When the current one has lapsed too, a new (even lapsed) one is taken: it may be
        // the fix for a clock problem, and the error log says so either way.
        let later = SystemTime::from(now + time::Duration::days(40));
        write_pair_valid(
            dir.path(),
            now - time::Duration::days(30),
            now + time::Duration::days(35),
        );
        assert_eq!(store.reload_at(later).ok(), Some(true));
    }

    #[tokio::test]
    async fn a_missed_file_event_is_caught_by_the_periodic_reread() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (cert, key) = write_pair(dir.path(), "tls");
        // No watcher: only the periodic re-read can pick the new pair up.
        let store = CertStore::load(&cert, &key, None).unwrap_or_else(|e| panic!("{e}"));
        let before = store.current().cert.clone();
        let _rereads = store.reread_every(Duration::from_millis(20));
        write_pair(dir.path(), "tls");
        // Bounded poll; only a hang exceeds it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.current().cert == before {
            assert!(std::time::Instant::now() < deadline, "never re-read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn handshake_failures_are_classified_for_operators() {
        use rustls::AlertDescription as Alert;
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::AlertReceived(Alert::UnknownCA))),
            "client_rejected_certificate"
        );
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::AlertReceived(Alert::BadCertificate))),
            "client_rejected_certificate"
        );
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::NoApplicationProtocol)),
            "no_common_protocol"
        );
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            "not_tls"
        );
        assert_eq!(
            handshake_failure_reason(&std::io::ErrorKind::UnexpectedEof.into()),
            "client_closed"
        );
        for reason in [
            "client_rejected_certificate",
            "no_common_protocol",
            "not_tls",
            "client_closed",
        ] {
            assert!(HANDSHAKE_FAILURE_REASONS.contains(&reason));
        }
    }

    #[test]
    fn missing_or_empty_files_are_errors() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("missing");
        assert!(load_certified_key(&missing, &missing, &crypto_provider()).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{e}"));
        assert!(load_certified_key(&empty, &empty, &crypto_provider()).is_err());
    }
}
