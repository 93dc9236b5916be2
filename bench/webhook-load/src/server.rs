//! The webhook under test: a separate process started from the release (or debug) binary, its
//! memory read from `/proc/PID/status`, its `/metrics` scraped over plain HTTP.

use crate::certs::ThrowawayCerts;
use crate::{Error, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Image name passed with `--sidecar-image`; the expected answers use the same.
pub const SIDECAR_IMAGE: &str = "registry.example/multus-eni-sidecar:bench";
/// How long the server may take to answer `/readyz` after start.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident set since start.
    pub hwm_kib: u64,
}

/// A running `multus-eni-webhook serve`.
pub struct Webhook {
    child: Child,
    pub pid: u32,
    /// HTTPS `/mutate`.
    pub https: SocketAddr,
    /// Plain HTTP `/metrics`, `/readyz`, `/healthz`.
    pub metrics: SocketAddr,
    /// Where the server's JSON logs go.
    pub log: PathBuf,
}

impl Webhook {
    /// Starts the binary on two free loopback ports and waits for `/readyz`.
    pub async fn start(binary: &Path, certs: &ThrowawayCerts) -> Result<Self> {
        if !binary.is_file() {
            return Err(Error::Server(format!(
                "{} does not exist: build it first (cargo build --release -p multus-eni-webhook)",
                binary.display()
            )));
        }
        let https = free_port()?;
        let metrics = free_port()?;
        let log = certs.dir.path().join("webhook.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| Error::io("creating the server log", e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| Error::io("creating the server log", e))?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--addr")
            .arg(https.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--tls-cert")
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key)
            .arg("--sidecar-image")
            .arg(SIDECAR_IMAGE)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", binary.display()), e))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Server("exited at once".into()))?;
        let mut webhook = Webhook {
            child,
            pid,
            https,
            metrics,
            log,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if !webhook.is_alive() {
                return Err(Error::Server(format!(
                    "exited during start-up; log: {}",
                    std::fs::read_to_string(&webhook.log).unwrap_or_default()
                )));
            }
            if let Ok((200, _)) = http_get(metrics, "/readyz").await {
                return Ok(webhook);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Server("not ready in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's current and peak resident memory.
    pub fn memory(&self) -> Result<Memory> {
        memory_of(self.pid)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> Result<String> {
        match http_get(self.metrics, "/metrics").await? {
            (200, body) => Ok(body),
            (status, _) => Err(Error::Server(format!("/metrics answered {status}"))),
        }
    }

    /// `/healthz` answers 200.
    pub async fn healthy(&self) -> bool {
        matches!(http_get(self.metrics, "/healthz").await, Ok((200, _)))
    }

    /// Sends SIGTERM and waits for a graceful exit; returns whether it exited with status 0.
    pub async fn stop(mut self) -> Result<bool> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => Ok(status.success()),
            Ok(Err(e)) => Err(Error::io("waiting for the webhook", e)),
            Err(_) => {
                let _ = self.child.start_kill();
                Ok(false)
            }
        }
    }
}

/// `VmRSS` and `VmHWM` of any process.
pub fn memory_of(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| Error::io(format!("reading /proc/{pid}/status"), e))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}

fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port", e))?;
    listener
        .local_addr()
        .map_err(|e| Error::io("finding a free port", e))
}

/// One plain-HTTP GET on a fresh connection: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let http = |e: hyper::Error| Error::Http(e.to_string());
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| Error::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
