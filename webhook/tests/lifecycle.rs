//! The process as an operator runs it: `certs` writes the TLS material, `serve` starts with the
//! four required flags, answers over TLS, exposes health and metrics, logs JSON with the request
//! uid/namespace/pod, and exits cleanly on SIGTERM after finishing in-flight requests.

mod common;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use common::{
    TestCa, TestResult, admission_review, data_dir, load_yaml, response_patch, write_plain,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use multus_eni_webhook::metrics::Metrics;
use multus_eni_webhook::serve::{ConnectionLimits, HttpsServer, serve_tls};
use multus_eni_webhook::tls::{CertStore, server_config};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Bound for waiting on the process; only a hang exceeds it.
const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> TestResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn http_get(addr: SocketAddr, path: &str) -> TestResult<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn certs_then_serve_then_sigterm() -> TestResult {
    let bin = env!("CARGO_BIN_EXE_multus-eni-webhook");
    let dir = tempfile::tempdir()?;
    let certs = tokio::process::Command::new(bin)
        .args(["certs", "--out-dir"])
        .arg(dir.path())
        .output()
        .await?;
    assert!(
        certs.status.success(),
        "{}",
        String::from_utf8_lossy(&certs.stderr)
    );

    let (https_port, metrics_port) = (free_port()?, free_port()?);
    let https: SocketAddr = format!("127.0.0.1:{https_port}").parse()?;
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse()?;
    let mut child = tokio::process::Command::new(bin)
        .arg("serve")
        .args(["--addr", &https.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .args([
            "--sidecar-image",
            "ghcr.io/multus-eni/multus-eni-sidecar:0.1.0",
        ])
        .env_remove("RUST_LOG")
        .env("MULTUS_ENI_SHUTDOWN_DELAY", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;

    // Bounded poll until /readyz answers.
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok((200, _)) = http_get(metrics, "/readyz").await {
            break;
        }
        assert!(Instant::now() < deadline, "webhook never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(metrics, "/healthz").await?.0, 200);

    // The CA written by `certs` verifies the served certificate for the Service name.
    let ca_pem = std::fs::read(dir.path().join("ca.crt"))?;
    let ca = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .next()
        .ok_or("no CA")??;
    let client = TestCa::client_for(ca, https)?;
    let pod = load_yaml(&data_dir().join("ueransim-gnb.yaml"))?;
    let reply = client
        .post(
            "/mutate",
            admission_review(&pod, "CREATE", "uid-lifecycle")
                .to_string()
                .into_bytes(),
        )
        .await?;
    assert_eq!(reply.status, 200);
    assert!(response_patch(&reply.json()?)?.is_some());

    let (status, text) = http_get(metrics, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        text.contains(r#"multus_eni_webhook_admissions_total{outcome="injected",reason=""} 1"#),
        "{text}"
    );
    assert!(text.contains("multus_eni_webhook_admission_duration_seconds_bucket"));

    // A metrics client that never finishes its request must not keep the process alive.
    let mut stuck = tokio::net::TcpStream::connect(metrics).await?;
    tokio::io::AsyncWriteExt::write_all(&mut stuck, b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await?;

    let pid = child.id().ok_or("no pid")?;
    // The shell's builtin kill: no procps needed.
    let kill = tokio::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .await?;
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .map_err(|_| "process still running 10 s after SIGTERM with no shutdown delay")??;
    drop(stuck);
    assert!(status.success(), "exit status {status}");

    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).await?;
    }
    let injected: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "sidecar injected")
        .ok_or_else(|| format!("no JSON 'sidecar injected' log line in:\n{stderr}"))?;
    assert_eq!(injected["uid"], "uid-lifecycle");
    assert_eq!(injected["namespace"], "ran");
    assert_eq!(injected["pod"], "ueransim-gnb-7d9c6b7d5f-");
    assert_eq!(injected["interfaces"], "n2,n3");
    Ok(())
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() -> TestResult {
    let ca = TestCa::new()?;
    let (cert, key, _) = ca.issue()?;
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = write_plain(dir.path(), &cert, &key)?;
    let tls = server_config(CertStore::load(&cert_path, &key_path, None)?)?;

    // A handler that reports it started, then waits to be released.
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let gates = std::sync::Arc::new(std::sync::Mutex::new((Some(entered_tx), Some(release_rx))));
    let router = Router::new().route(
        "/slow",
        post(move || {
            let gates = gates.clone();
            async move {
                let (entered, release) = match gates.lock() {
                    Ok(mut g) => (g.0.take(), g.1.take()),
                    Err(_) => (None, None),
                };
                if let Some(entered) = entered {
                    let _ = entered.send(());
                }
                if let Some(release) = release {
                    let _ = release.await;
                }
                "done"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = HttpsServer {
        tls,
        router,
        limits: ConnectionLimits::default(),
        metrics: std::sync::Arc::new(Metrics::new()),
    };
    let server = tokio::spawn(serve_tls(listener, server, async move {
        let _ = stop_rx.await;
    }));

    let client = ca.client(addr)?;
    let in_flight = tokio::spawn(async move { client.post("/slow", Vec::new()).await });
    tokio::time::timeout(DEADLINE, entered_rx).await??;

    let _ = stop_tx.send(());
    // Bounded poll: the listener closes, new connections are refused.
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still accepting after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !server.is_finished(),
        "server exited with a request in flight"
    );

    let _ = release_tx.send(());
    let reply = tokio::time::timeout(DEADLINE, in_flight).await???;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"done");
    tokio::time::timeout(DEADLINE, server).await???;
    Ok(())
}

/// Issue 11 item 1: admissions sent continuously across a SIGTERM are all answered while the
/// shutdown delay runs, `/readyz` says 503 meanwhile, and the process then exits 0.
#[tokio::test]
async fn admissions_across_sigterm_are_answered_during_the_shutdown_delay() -> TestResult {
    const DELAY: Duration = Duration::from_secs(2);
    let bin = env!("CARGO_BIN_EXE_multus-eni-webhook");
    let dir = tempfile::tempdir()?;
    let certs = tokio::process::Command::new(bin)
        .args(["certs", "--out-dir"])
        .arg(dir.path())
        .output()
        .await?;
    assert!(certs.status.success());
    let (https_port, metrics_port) = (free_port()?, free_port()?);
    let https: SocketAddr = format!("127.0.0.1:{https_port}").parse()?;
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse()?;
    let mut child = tokio::process::Command::new(bin)
        .arg("serve")
        .args(["--addr", &https.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .args(["--sidecar-image", "img:1", "--shutdown-delay", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + DEADLINE;
    while !matches!(http_get(metrics, "/readyz").await, Ok((200, _))) {
        assert!(Instant::now() < deadline, "webhook never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca_pem = std::fs::read(dir.path().join("ca.crt"))?;
    let ca = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .next()
        .ok_or("no CA")??;
    let client = TestCa::client_for(ca, https)?;
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let body = admission_review(&pod, "CREATE", "uid-drain")
        .to_string()
        .into_bytes();

    // Some admissions before the signal.
    for _ in 0..5 {
        assert_eq!(client.post("/mutate", body.clone()).await?.status, 200);
    }
    let pid = child.id().ok_or("no pid")?;
    let kill = tokio::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .await?;
    assert!(kill.success());
    // The server sleeps DELAY after it receives the signal, which is after this instant: any
    // refusal or failure before `sent + DELAY` is the listener closing too early.
    let sent = Instant::now();
    let (mut answered_while_unready, mut first_failure) = (0u32, None);
    loop {
        assert!(Instant::now() < sent + DEADLINE, "process never exited");
        if child.try_wait()?.is_some() {
            break;
        }
        match client.post("/mutate", body.clone()).await {
            Ok(reply) if reply.status == 200 => {
                if matches!(http_get(metrics, "/readyz").await, Ok((503, _))) {
                    answered_while_unready += 1;
                }
            }
            Ok(reply) => panic!("admission answered {} during shutdown", reply.status),
            Err(err) => {
                let at = sent.elapsed();
                assert!(
                    at >= DELAY,
                    "admission refused {at:?} after SIGTERM, within the {DELAY:?} delay: {err}"
                );
                first_failure.get_or_insert(at);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let status = tokio::time::timeout(DEADLINE, child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    assert!(
        answered_while_unready > 0,
        "no admission answered while /readyz said 503 (first failure {first_failure:?})"
    );
    Ok(())
}
