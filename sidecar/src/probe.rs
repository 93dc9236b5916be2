//! The kubelet's view: `GET /readyz` (200 once every managed address is on its ENI, else
//! 503) and `GET /healthz` (200 while the process runs), plain HTTP on `--probe-addr`.
//!
//! The reason of a 503 (which may carry EC2 error text) is told only to callers on loopback:
//! the pod's own containers and `kubectl port-forward`. Anyone else, the kubelet included,
//! gets a generic line; the reason is in the sidecar's log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::{Error, Result};

/// Shared readiness flag, written by the event loop and read by the probe handler, with the
/// reason for a 503 (for callers on loopback).
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

/// The 503 body for callers not on loopback: no address, ENI or EC2 error text.
pub const REMOTE_NOT_READY: &str =
    "not ready: addresses not yet routable (the reason is in the sidecar's log)";

async fn readyz(
    State(readiness): State<Readiness>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> (StatusCode, String) {
    readyz_answer(readiness.get(), &readiness.reason(), peer.ip())
}

/// `/readyz`'s status and body for a caller at `peer`.
fn readyz_answer(ready: bool, reason: &str, peer: std::net::IpAddr) -> (StatusCode, String) {
    if ready {
        (StatusCode::OK, "ready\n".to_string())
    } else if !is_loopback(peer) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{REMOTE_NOT_READY}\n"),
        )
    } else if reason.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "addresses not yet assigned on the ENI\n".to_string(),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
    }
}

/// Loopback of either family, IPv4-mapped included (a dual-stack listener).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Binds the probe address (a clash with the application's port fails loudly at start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::ProbeBind { addr, source })
}

/// Binds `addr` and serves the probe routes there until the process exits; the returned
/// [`Readiness`] is what `/readyz` answers from. The start of every mode.
pub async fn serve(addr: SocketAddr) -> Result<Readiness> {
    let readiness = Readiness::default();
    spawn(bind(addr).await?, readiness.clone());
    Ok(readiness)
}

/// Serves the probe routes until the process exits.
pub fn spawn(listener: TcpListener, readiness: Readiness) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let service = router(readiness).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service).await {
            tracing::error!(action = "probe", outcome = "failed", error = %e, "probe server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(port: u16, path: &str) -> String {
        get_from("127.0.0.1", port, path)
            .await
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    async fn get_from(host: &str, port: u16, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((host, port))
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
        out
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

    #[tokio::test]
    async fn the_reason_is_told_on_loopback_only() {
        let listener = bind("0.0.0.0:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let readiness = Readiness::default();
        readiness.set_reason("10.0.1.6: UnauthorizedOperation: You are not authorized");
        let server = spawn(listener, readiness.clone());
        let local = get_from("127.0.0.1", port, "/readyz").await;
        assert!(local.contains("UnauthorizedOperation"), "{local}");
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap_or_else(|e| panic!("{e}")) };
        let secret = "10.0.1.6: UnauthorizedOperation: You are not authorized";
        for remote in ["10.0.0.9", "fd00::9", "::ffff:10.0.0.9"] {
            let (status, body) = readyz_answer(false, secret, ip(remote));
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, format!("{REMOTE_NOT_READY}\n"), "{remote}");
        }
        assert_eq!(
            readyz_answer(false, secret, ip("::1")).1,
            format!("{secret}\n")
        );
        assert_eq!(
            readyz_answer(true, secret, ip("10.0.0.9")).0,
            StatusCode::OK
        );
        server.abort();
    }
}
