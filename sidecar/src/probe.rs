//! The kubelet's view: `GET /readyz` (200 once every managed address is on its ENI, else
//! 503) and `GET /healthz` (200 while the process runs), plain HTTP on `--probe-addr`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{Error, Result};

/// Shared readiness flag, written by the event loop and read by the probe handler, with the
/// reason for a 503: the kubelet records the body in the pod's events, where an operator
/// looks first.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    reason: Arc<Mutex<String>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Why the pod is not ready (which address is missing and why), shown by `/readyz`.
    pub fn set_reason(&self, reason: &str) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        reason.clone_into(&mut slot);
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The probe routes.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, String) {
    if readiness.get() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let reason = readiness.reason();
        let reason = if reason.is_empty() {
            "addresses not yet assigned on the ENI".to_string()
        } else {
            reason
        };
        (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
    }
}

/// Binds the probe address (a clash with the application's port fails loudly at start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::ProbeBind { addr, source })
}

/// Serves the probe routes until the process exits.
pub fn spawn(listener: TcpListener, readiness: Readiness) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(readiness)).await {
            tracing::error!(action = "probe", outcome = "failed", error = %e, "probe server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(port: u16, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        out.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn readyz_follows_the_flag_and_healthz_is_always_ok() {
        let listener = bind("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let readiness = Readiness::default();
        let server = spawn(listener, readiness.clone());
        assert_eq!(
            get_status(port, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(get_status(port, "/healthz").await, "HTTP/1.1 200 OK");
        readiness.set(true);
        assert_eq!(get_status(port, "/readyz").await, "HTTP/1.1 200 OK");
        server.abort();
    }
}
