//! Clients that hold connections without finishing requests (issue 11 item 2): a client that
//! completes TLS and sends nothing, one that trickles its request head, one that trickles its
//! body, one that never starts TLS, and thousands of idle connections. Each is cut off, a
//! well-behaved client is answered within the kube-apiserver's webhook timeout meanwhile, and
//! none of them holds up shutdown.

mod common;

use common::{
    TestCa, TestResult, TestServer, admission_review, data_dir, golden_config, load_yaml,
    write_plain,
};
use multus_eni_webhook::serve::ConnectionLimits;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bound for liveness; only a hang exceeds it.
const DEADLINE: Duration = Duration::from_secs(30);
/// The webhook's `timeoutSeconds` in manifests/core: the apiserver gives up after this.
const APISERVER_TIMEOUT: Duration = Duration::from_secs(5);

fn short_limits() -> ConnectionLimits {
    ConnectionLimits {
        handshake: Duration::from_secs(1),
        header_read: Duration::from_secs(1),
        request: Duration::from_secs(2),
        idle: Duration::from_secs(1),
        ..ConnectionLimits::default()
    }
}

async fn start(limits: ConnectionLimits) -> TestResult<(TestCa, TestServer, tempfile::TempDir)> {
    let ca = TestCa::new()?;
    let (cert, key, _) = ca.issue()?;
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = write_plain(dir.path(), &cert, &key)?;
    let server =
        TestServer::start_with_limits(golden_config(), &cert_path, &key_path, limits).await?;
    Ok((ca, server, dir))
}

/// One admission as the apiserver sends it; Ok when answered 200 within its timeout.
async fn well_behaved(ca: &TestCa, addr: SocketAddr) -> TestResult {
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let body = admission_review(&pod, "CREATE", "uid-polite")
        .to_string()
        .into_bytes();
    let reply = tokio::time::timeout(APISERVER_TIMEOUT, ca.client(addr)?.post("/mutate", body))
        .await
        .map_err(|_| "a well-behaved client was not answered within the apiserver's timeout")??;
    assert_eq!(reply.status, 200);
    Ok(())
}

/// Writes `bytes` one at a time, `every` apart, until the server closes the connection (read
/// returns EOF or an error); returns what the server sent. Fails if still open at DEADLINE.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    bytes: Vec<u8>,
    every: Duration,
) -> TestResult<Vec<u8>> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let mut next = bytes.into_iter().cycle();
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "trickling client never cut off");
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok(received),
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(every) => {
                let byte = next.next().unwrap_or(b' ');
                if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                    return Ok(received);
                }
            }
        }
    }
}

/// Waits until the server closes `stream` without the client sending anything.
async fn closed_by_server<S: AsyncRead + Unpin>(mut stream: S) -> TestResult {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    deadline
        .await
        .map_err(|_| "silent connection never closed by the server".into())
}

#[tokio::test]
async fn slow_and_silent_clients_are_cut_off_while_others_are_answered() -> TestResult {
    let (ca, server, _dir) = start(short_limits()).await?;
    let addr = server.addr;
    let client = ca.client(addr)?;

    let no_tls = tokio::net::TcpStream::connect(addr).await?;
    let silent = client.connect_tls().await?;
    let head = client.connect_tls().await?;
    let body = client.connect_tls().await?;

    let silent = tokio::spawn(closed_by_server(silent));
    let no_tls = tokio::spawn(closed_by_server(no_tls));
    let head = tokio::spawn(trickle(
        head,
        b"POST /mutate HTTP/1.1\r\nhost: multus-eni-webhook.multus-eni.svc\r\nx-slow: ".to_vec(),
        Duration::from_millis(200),
    ));
    let body_head = "POST /mutate HTTP/1.1\r\nhost: multus-eni-webhook.multus-eni.svc\r\n\
                     content-type: application/json\r\ncontent-length: 100000\r\n\r\n";
    let mut body = body;
    body.write_all(body_head.as_bytes()).await?;
    let body = tokio::spawn(trickle(body, b"{".to_vec(), Duration::from_millis(200)));

    // Answered while all of the above hold connections.
    well_behaved(&ca, addr).await?;

    tokio::time::timeout(DEADLINE, silent).await???;
    tokio::time::timeout(DEADLINE, no_tls).await???;
    tokio::time::timeout(DEADLINE, head).await???;
    let answer = tokio::time::timeout(DEADLINE, body).await???;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let metrics = server.metrics.encode()?;
    assert!(
        metrics.contains(r#"multus_eni_webhook_tls_handshake_failures_total{reason="timeout"} 1"#),
        "{metrics}"
    );
    well_behaved(&ca, addr).await?;
    tokio::time::timeout(DEADLINE, server.stop()).await?
}

#[tokio::test]
async fn five_thousand_idle_connections_do_not_stop_a_well_behaved_client() -> TestResult {
    let (ca, server, _dir) = start(ConnectionLimits::default()).await?;
    let addr = server.addr;
    let mut idle = Vec::with_capacity(5000);
    for _ in 0..5000 {
        idle.push(tokio::net::TcpStream::connect(addr).await?);
    }
    // Some that finished TLS too, holding the most server state.
    let client = ca.client(addr)?;
    let mut idle_tls = Vec::new();
    for _ in 0..50 {
        idle_tls.push(client.connect_tls().await?);
    }
    well_behaved(&ca, addr).await?;
    // Idle connections do not hold up shutdown.
    tokio::time::timeout(DEADLINE, server.stop()).await??;
    drop(idle);
    drop(idle_tls);
    Ok(())
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_for_a_slot_instead_of_failing() -> TestResult {
    let limits = ConnectionLimits {
        max_connections: 4,
        ..short_limits()
    };
    let (ca, server, _dir) = start(limits).await?;
    let addr = server.addr;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await?);
    }
    // The slots free up when the idle connections' handshake timeout cuts them off.
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let body = admission_review(&pod, "CREATE", "uid-capped")
        .to_string()
        .into_bytes();
    let reply = tokio::time::timeout(DEADLINE, ca.client(addr)?.post("/mutate", body)).await??;
    assert_eq!(reply.status, 200);
    assert!(
        server
            .metrics
            .encode()?
            .contains(r#"multus_eni_webhook_tls_handshake_failures_total{reason="timeout"} 4"#)
    );
    drop(idle);
    tokio::time::timeout(DEADLINE, server.stop()).await?
}
