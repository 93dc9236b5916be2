//! The server's wiring: the HTTPS accept loop for `/mutate` with its per-connection limits, the
//! plain-HTTP metrics listener, readiness, and the shutdown sequence (SIGTERM → `/readyz` 503 →
//! keep serving for the shutdown delay → stop accepting → finish in-flight requests → exit 0).

use crate::handler::{AppState, build_router};
use crate::inject::Config;
use crate::metrics::{Metrics, metrics_router};
use crate::tls::{CertStore, server_config};
use crate::{Error, Result};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// Everything `serve` needs, built from the command line by [`crate::cli`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// How long the listener keeps answering after SIGTERM while `/readyz` says 503, so
    /// endpoints stop routing to this pod before it stops accepting.
    pub shutdown_delay: Duration,
    pub limits: ConnectionLimits,
    pub injection: Config,
}

/// Per-connection protection against clients that hold connections without finishing
/// requests; the kube-apiserver sends each request at once, so only misbehaving clients hit
/// these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A TLS handshake must finish within this.
    pub handshake: Duration,
    /// HTTP/1 request headers must arrive within this once a request starts.
    pub header_read: Duration,
    /// A request, body read to response, must finish within this (then 408).
    pub request: Duration,
    /// A connection with no request in progress for this long is closed (a client that
    /// completes TLS and sends nothing, trickles a request head, or an idle keep-alive).
    pub idle: Duration,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within
    /// `http2_keep_alive_timeout` is dropped.
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    /// Connections served at once; at the cap the listener stops accepting until one ends.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            // Three times the webhook's `timeoutSeconds: 5`: the apiserver has given up by then.
            request: Duration::from_secs(15),
            // Shorter than Go's 90 s client idle timeout would be racy for HTTP/1 clients that
            // do not retry; Go's clients retry a request on a connection the server closed idle.
            idle: Duration::from_secs(60),
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

/// Whether `/readyz` answers 200: true once the TLS listener serves, false from SIGTERM on.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The `/mutate` listener's pieces: TLS config, router, limits and the metrics it reports to.
pub struct HttpsServer {
    pub tls: Arc<ServerConfig>,
    pub router: Router,
    pub limits: ConnectionLimits,
    pub metrics: Arc<Metrics>,
}

/// `serve`: loads the certificate (failing fast), binds both listeners, runs until SIGTERM,
/// then drains as the module doc says.
pub async fn run(config: ServeConfig) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let store = CertStore::load(&config.tls_cert, &config.tls_key, Some(metrics.clone()))?;
    let _watcher = store.watch()?;
    let _rereads = store.reread_every(crate::tls::REREAD_INTERVAL);
    let tls = server_config(store)?;
    let (https, https_addr) = crate::listen::bind(config.addr)
        .map_err(|e| Error::io(format!("binding {}", config.addr), e))?;
    let (plain, plain_addr) = crate::listen::bind(config.metrics_addr)
        .map_err(|e| Error::io(format!("binding {}", config.metrics_addr), e))?;
    let injection = Arc::new(config.injection);
    let router = build_router(AppState {
        config: injection.clone(),
        metrics: metrics.clone(),
    });
    let readiness = Readiness::default();
    let (stop_accepting, accepting_stopped) = watch::channel(false);
    let (stop_metrics, metrics_stopped) = watch::channel(false);
    let delay = config.shutdown_delay;
    let signal_readiness = readiness.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_readiness.set(false);
        tracing::info!(
            delay_seconds = delay.as_secs_f64(),
            "SIGTERM: /readyz now 503, still serving until the delay is over"
        );
        tokio::time::sleep(delay).await;
        let _ = stop_accepting.send(true);
    });
    readiness.set(true);
    tracing::info!(
        addr = %https_addr,
        metrics_addr = %plain_addr,
        sidecar_image = %injection.sidecar_image,
        mode = injection.mode.as_str(),
        "serving /mutate"
    );
    let server = HttpsServer {
        tls,
        router,
        limits: config.limits,
        metrics: metrics.clone(),
    };
    let metrics_server = tokio::spawn(serve_plain(
        plain,
        metrics_router(metrics, readiness),
        flag_set(metrics_stopped),
    ));
    let https_result = serve_tls(https, server, flag_set(accepting_stopped)).await;
    // The metrics port stays up through the drain so /readyz keeps saying 503. Its own
    // graceful shutdown waits for its connections, so it gets a bound: a client holding one
    // open must not keep the process alive.
    let _ = stop_metrics.send(true);
    let plain_result = match tokio::time::timeout(METRICS_SHUTDOWN, metrics_server).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(Error::io("metrics listener", std::io::Error::other(join))),
        Err(_) => {
            tracing::warn!("metrics connections still open at exit");
            Ok(())
        }
    };
    https_result.and(plain_result)
}

/// How long the metrics listener may take to close its connections at exit.
const METRICS_SHUTDOWN: Duration = Duration::from_secs(2);

/// Resolves once the flag behind `rx` is set (or its sender is gone).
async fn flag_set(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}

/// Serves the HTTPS router on `listener` until `stop_accepting` resolves, then closes the
/// listener, asks every connection to finish (HTTP/2 GOAWAY, HTTP/1 close after the current
/// response) and waits for them, at most [`ConnectionLimits::request`] and a second: no
/// connection outlives that once asked, so the pod's terminationGracePeriodSeconds must cover
/// the shutdown delay plus that.
pub async fn serve_tls(
    listener: TcpListener,
    server: HttpsServer,
    stop_accepting: impl Future<Output = ()>,
) -> Result<()> {
    let HttpsServer {
        tls,
        router,
        limits,
        metrics,
    } = server;
    let acceptor = TlsAcceptor::from(tls);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut stop_accepting = std::pin::pin!(stop_accepting);
    let mut cap_logged = false;
    loop {
        // A free slot first, so a full server stops accepting instead of accepting and
        // dropping; the kernel's backlog holds new connections meanwhile.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !cap_logged {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached: not accepting until a connection ends"
                    );
                    cap_logged = true;
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = &mut stop_accepting => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop_accepting => break,
        };
        let connection = Connection {
            acceptor: acceptor.clone(),
            builder: builder.clone(),
            router: router.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
            drain: drain_rx.clone(),
        };
        tokio::spawn(async move {
            // Nothing but the socket until the client sends its first bytes: a flood of silent
            // connections costs little more than the sockets. The rest of the handshake
            // timeout applies from there.
            let started = tokio::time::Instant::now();
            let first_bytes = tokio::time::timeout(connection.limits.handshake, tcp.readable());
            let first_bytes = tokio::select! {
                first_bytes = first_bytes => first_bytes,
                () = flag_set(connection.drain.clone()) => return,
            };
            match first_bytes {
                Ok(Ok(())) => {
                    Box::pin(connection.serve(tcp, peer, started)).await;
                }
                Ok(Err(_)) => {}
                Err(_) => connection
                    .metrics
                    .observe_handshake_failure(crate::tls::HANDSHAKE_TIMEOUT_REASON),
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: no longer accepting, finishing in-flight requests");
    let _ = drain_tx.send(true);
    // Every connection holds a slot until it ends: all slots back means all connections done.
    let everyone = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    // Handshakes in progress end at once; served connections within the request timeout.
    let bound = limits.request + Duration::from_secs(1);
    if tokio::time::timeout(bound, slots.acquire_many(everyone))
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish in time");
    }
    Ok(())
}

/// One accepted TCP connection and what serving it needs.
struct Connection {
    acceptor: TlsAcceptor,
    builder: auto::Builder<TokioExecutor>,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(
        self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        started: tokio::time::Instant,
    ) {
        let Connection {
            acceptor,
            builder,
            router,
            limits,
            metrics,
            drain,
        } = self;
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::select! {
            result = tokio::time::timeout_at(started + limits.handshake, acceptor.accept(tcp)) => result,
            () = flag_set(drain.clone()) => return,
        };
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = crate::tls::handshake_failure_reason(&err);
                metrics.observe_handshake_failure(reason);
                tracing::debug!(%peer, reason, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                metrics.observe_handshake_failure(crate::tls::HANDSHAKE_TIMEOUT_REASON);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let (in_flight_tx, in_flight) = watch::channel(0usize);
        let service = Tracked {
            inner: TowerToHyperService::new(router),
            in_flight: Arc::new(in_flight_tx),
            timeout: limits.request,
        };
        // Boxed: kept out of this task's state, so a connection still in its handshake (the
        // many a flood opens) stays small.
        let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(tls), service));
        let idle = idle_for(in_flight, limits.idle);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with error");
                }
                return;
            }
            () = idle => tracing::debug!(%peer, "closing idle connection"),
            () = flag_set(drain) => {}
        }
        // Asked to finish: HTTP/2 sends GOAWAY, HTTP/1 closes after the current response. A
        // peer that keeps the connection past the request timeout is dropped.
        conn.as_mut().graceful_shutdown();
        if let Ok(Err(err)) = tokio::time::timeout(limits.request, conn.as_mut()).await {
            tracing::debug!(%peer, error = %err, "connection ended with error");
        }
    }
}

/// Resolves once no request has been in progress on a connection for `limit`.
async fn idle_for(mut in_flight: watch::Receiver<usize>, limit: Duration) {
    loop {
        if in_flight.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(limit, in_flight.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// The router as a hyper service that counts its requests in progress (for the idle timeout)
/// and answers 408 to a request that does not finish within the request timeout (a client that
/// trickles its body).
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    in_flight: Arc<watch::Sender<usize>>,
    timeout: Duration,
}

/// Counts one request in progress until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.in_flight.send_modify(|n| *n += 1);
        let guard = InFlight(self.in_flight.clone());
        let response = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            let result = tokio::time::timeout(timeout, response).await;
            drop(guard);
            match result {
                Ok(response) => response,
                Err(_) => {
                    let mut response = Response::new(Body::from("request timed out\n"));
                    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
                    Ok(response)
                }
            }
        })
    }
}

/// Serves the plain-HTTP metrics router until `shutdown` resolves.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::io("metrics listener", e))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = ctrl_c => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
