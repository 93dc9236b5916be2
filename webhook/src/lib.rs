//! multus-eni-webhook: the mutating admission webhook that injects the multus-eni sidecar into
//! pods with Multus secondary networks, plus the offline `inject` and `certs` commands.
//!
//! The domain logic is pure: [`networks::parse_networks`] turns the Multus annotation into
//! interface names, [`inject::mutate_pod`] decides and builds the JSON patch, and
//! [`admission::review`] turns an AdmissionReview body into the response. I/O (TLS, HTTP,
//! files, metrics) lives at the edges.

pub mod admission;
pub mod certs;
pub mod cli;
pub mod handler;
pub mod inject;
pub mod listen;
pub mod manifest;
pub mod metrics;
pub mod networks;
pub mod qos;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod yaml_out;

pub use admission::{ReviewError, ReviewOutcome, review};
pub use handler::{AppState, build_router};
pub use inject::{Config, Decision, SidecarMode, SkipReason, mutate_pod};
pub use networks::{NetworkSelection, NetworksError, parse_networks};

/// Everything that can go wrong outside of a single admission review.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file (certificates, manifests) failed.
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Other I/O: binding a listener, stdin/stdout.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or no private key.
    #[error("{path}: no PEM {what}")]
    NoPem {
        path: std::path::PathBuf,
        what: &'static str,
    },
    /// The key does not belong to the certificate, or rustls cannot use it.
    #[error("{cert} / {key}: {source}")]
    KeyPair {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The TLS server configuration could not be built.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// A certificate's validity could not be read.
    #[error("reading the certificate's validity: {0}")]
    CertificateParse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// `certs` found only one of `ca.crt` and `ca.key`.
    #[error("{ca_crt} and {ca_key} must both exist (reuse) or both be absent (create)")]
    HalfCa {
        ca_crt: std::path::PathBuf,
        ca_key: std::path::PathBuf,
    },
    /// A new serving certificate is expired or not yet valid while the current one is valid.
    #[error("{path}: certificate is expired or not yet valid; keeping the current one")]
    CertificateNotValid { path: std::path::PathBuf },
    /// `certs` would issue a serving certificate that expires after the CA it reuses.
    #[error(
        "the serving certificate would outlive the CA in {ca} (valid until {ca_not_after}): delete ca.crt and ca.key to issue a new CA (and update the caBundle), or lower --validity-days"
    )]
    LeafOutlivesCa {
        ca: std::path::PathBuf,
        ca_not_after: String,
    },
    /// The file watcher that drives certificate reload could not start.
    #[error("watching certificate files: {0}")]
    Watch(#[from] notify::Error),
    /// Generating certificates failed.
    #[error("generating certificates: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A YAML document of the `inject` input could not be read or written.
    #[error("YAML document {index}: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// Applying the patch to a pod template failed.
    #[error("mutating {what}: {source}")]
    Mutate {
        what: String,
        #[source]
        source: json_patch::PatchError,
    },
    /// Logging could not be set up.
    #[error("logging: {0}")]
    Logging(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Flags that cannot work together; the message names the fix.
    #[error("configuration: {0}")]
    Config(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::File {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
