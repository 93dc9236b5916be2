//! Load generator for `multus-eni-webhook` (issues 2 and 5).
//!
//! Starts the real webhook binary as a separate process with throwaway certificates, drives
//! AdmissionReviews over TLS with keep-alive (real fixture pods, plus bad input in the
//! sustained mode), and reports client latency, the server's own latency histogram (from its
//! `/metrics`), admissions per second, errors, and the server's memory.

pub mod bodies;
pub mod certs;
pub mod cli;
pub mod client;
pub mod corpus;
pub mod load;
pub mod prom;
pub mod report;
pub mod server;

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File or socket I/O.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Generating the throwaway certificates failed.
    #[error("generating certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// The client TLS configuration or handshake failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// An HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The webhook process did not start, died, or answered nonsense.
    #[error("webhook process: {0}")]
    Server(String),
    /// A fixture file could not be read.
    #[error("fixture {path}: {message}")]
    Fixture {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
