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
pub mod inject;
pub mod manifest;
pub mod metrics;
pub mod networks;
pub mod qos;
pub mod serve;
pub mod telemetry;
pub mod tls;

pub use admission::{ReviewError, ReviewOutcome, build_router, review};
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
    /// The serving certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The file watcher that drives certificate reload could not start.
    #[error("watching certificate files: {0}")]
    Watch(#[from] notify::Error),
    /// Generating certificates failed.
    #[error("generating certificates: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A YAML document of the `inject` input could not be read or written.
    #[error("YAML document {index}: {message}")]
    Yaml { index: usize, message: String },
    /// Building the patch or applying it to a pod template failed.
    #[error("mutating {what}: {message}")]
    Mutate { what: String, message: String },
    /// Logging could not be set up.
    #[error("logging: {0}")]
    Logging(String),
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
