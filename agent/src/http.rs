//! The agent's HTTP port (`/metrics`, `/healthz`, `/readyz`, `/status`, `/v1/addresses`). Any
//! address of the VPC can reach it (hostNetwork), so every connection is bounded: at most
//! `--max-http-connections` at once (more are closed at accept), and a connection whose request
//! headers do not arrive within `--http-header-timeout` is closed, idle keep-alive ones
//! included. The listener is dual-stack by default (`[::]`), for IPv6-only clusters.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::{LimitLabels, Metrics};

/// The bounds of the HTTP port.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Binds `addr`. `[::]:PORT` takes IPv4 callers too (as `::ffff:a.b.c.d`, whatever the host's
/// `net.ipv6.bindv6only`); on a host without IPv6 it falls back to `0.0.0.0:PORT`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match bind_dual_stack(addr) {
            Ok(l) => l,
            Err(e) if no_ipv6(&e) => {
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
                tracing::info!(action = "http", addr = %v4, "no IPv6 on this host: listening on IPv4 only");
                std::net::TcpListener::bind(v4)?
            }
            Err(e) => return Err(e),
        }
    } else {
        std::net::TcpListener::bind(addr)?
    };
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn bind_dual_stack(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The errors of a host whose kernel has IPv6 disabled.
fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(|code| {
        code == nix::errno::Errno::EAFNOSUPPORT as i32
            || code == nix::errno::Errno::EADDRNOTAVAIL as i32
    })
}

/// Serves `router` on `listener` until the task is dropped. Handlers see the caller's address
/// as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(action = "http", outcome = "accept_failed", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            hit(&metrics, "http_connections");
            drop(stream);
            continue;
        };
        let service = router
            .clone()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(e) = connection.await
                && e.is_timeout()
            {
                hit(&metrics, "http_header_timeout");
            }
        });
    }
}

fn hit(metrics: &Metrics, limit: &'static str) {
    metrics
        .limit_hits
        .get_or_create(&LimitLabels { limit })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(limits: HttpLimits) -> (SocketAddr, Arc<Metrics>) {
        let listener = bind("[::]:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let metrics = Arc::new(Metrics::new());
        let router = Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(p): ConnectInfo<SocketAddr>| async move {
                p.ip().to_string()
            }),
        );
        tokio::spawn(serve(listener, router, limits, metrics.clone()));
        (SocketAddr::from(([127, 0, 0, 1], port)), metrics)
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_dual_stack_listener_answers_ipv4_and_ipv6_callers() {
        let limits = HttpLimits {
            max_connections: 8,
            header_timeout: Duration::from_secs(5),
        };
        let (v4, _) = started(limits).await;
        assert!(get(v4).await.ends_with("::ffff:127.0.0.1"), "IPv4 caller");
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), v4.port());
        assert!(get(v6).await.ends_with("::1"), "IPv6 caller");
    }

    #[tokio::test]
    async fn idle_connections_are_cut_and_the_cap_holds() {
        let limits = HttpLimits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
        };
        let (addr, metrics) = started(limits).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        // Each idle connection is closed by the server: its read ends.
        for mut s in idle {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(_)) | Ok(Err(_))),
                "an idle connection was still open after 5 s"
            );
        }
        let hits = |limit| {
            metrics
                .limit_hits
                .get_or_create(&LimitLabels { limit })
                .get()
        };
        assert_eq!(hits("http_connections"), 1, "the third was over the cap");
        assert_eq!(hits("http_header_timeout"), 2);
        assert!(
            get(addr).await.contains("200 OK"),
            "served after the idle ones left"
        );
    }
}
