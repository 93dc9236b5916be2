//! Shared pieces of the integration tests: fixtures, a test CA, an in-process HTTPS server and
//! a client that verifies the server the way the kube-apiserver does (CA bundle + service name).
#![allow(dead_code)]

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use multus_eni_webhook::handler::{AppState, build_router};
use multus_eni_webhook::inject::Config;
use multus_eni_webhook::metrics::Metrics;
use multus_eni_webhook::serve::{ConnectionLimits, HttpsServer, serve_tls};
use multus_eni_webhook::tls::{CertStore, crypto_provider, server_config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The name the kube-apiserver uses for the Service.
pub const SERVICE_DNS: &str = "multus-eni-webhook.multus-eni.svc";
/// The sidecar image used by fixtures and goldens.
pub const TEST_IMAGE: &str = "ghcr.io/multus-eni/multus-eni-sidecar:0.1.0";

/// The configuration the golden patches were produced with.
pub fn golden_config() -> Config {
    let mut config = Config::new(TEST_IMAGE);
    config.aws_region = Some("us-west-2".into());
    config
}

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Every `*.yaml` fixture, sorted.
pub fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    files
}

pub fn load_yaml(path: &Path) -> TestResult<Value> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_yaml_ng::from_str(&text)?)
}

/// An AdmissionReview as the kube-apiserver sends it for a pod.
pub fn admission_review(pod: &Value, operation: &str, uid: &str) -> Value {
    let namespace = pod
        .pointer("/metadata/namespace")
        .cloned()
        .unwrap_or(json!("default"));
    let name = pod.pointer("/metadata/name").cloned().unwrap_or(json!(""));
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "3b1c8f2e-7c52-4a8e-9b55-1d0f6c1f2a10",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": if operation == "UPDATE" { pod.clone() } else { Value::Null },
            "dryRun": false,
            "options": {"kind": if operation == "UPDATE" { "UpdateOptions" } else { "CreateOptions" }, "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// Decodes the base64 JSONPatch of a response review, if any.
pub fn response_patch(review: &Value) -> TestResult<Option<json_patch::Patch>> {
    use base64::Engine;
    match review.pointer("/response/patch") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
            Ok(Some(serde_json::from_slice(&bytes)?))
        }
        Some(other) => Err(format!("patch is not a base64 string: {other}").into()),
    }
}

/// A throwaway CA that signs serving certificates for the webhook Service.
pub struct TestCa {
    pub cert: CertificateDer<'static>,
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestResult<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "multus-eni test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A serving certificate for the Service names; returns (cert PEM, key PEM, cert DER).
    pub fn issue(&self) -> TestResult<(String, String, CertificateDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            SERVICE_DNS.to_string(),
            format!("{SERVICE_DNS}.cluster.local"),
        ])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem(), cert.der().clone()))
    }

    /// A client that trusts only this CA and checks the Service name, like the apiserver.
    pub fn client(&self, addr: SocketAddr) -> TestResult<Client> {
        Self::client_for(self.cert.clone(), addr)
    }

    /// A client that trusts only `ca` (a caBundle) and checks the Service name; HTTP/1.1.
    pub fn client_for(ca: CertificateDer<'static>, addr: SocketAddr) -> TestResult<Client> {
        Client::new(ca, addr, Protocol::Http1)
    }

    /// Like [`TestCa::client`], but offering only h2 in ALPN.
    pub fn h2_client(&self, addr: SocketAddr) -> TestResult<Client> {
        Client::new(self.cert.clone(), addr, Protocol::Http2)
    }
}

/// A response from the webhook.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// The end-entity certificate the server presented on this connection.
    pub server_cert: CertificateDer<'static>,
    /// The HTTP version negotiated.
    pub protocol: Protocol,
}

impl Reply {
    pub fn json(&self) -> TestResult<Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

pub struct Client {
    connector: TlsConnector,
    pub addr: SocketAddr,
}

/// The HTTP version a [`Client`] speaks; the kube-apiserver negotiates h2 via ALPN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Client {
    /// Trusts only `ca`, checks the Service name, offers one ALPN protocol. Like the
    /// kube-apiserver (Go, no ClientSessionCache), every connection is a full handshake, so
    /// each one sees the certificate currently served.
    fn new(ca: CertificateDer<'static>, addr: SocketAddr, protocol: Protocol) -> TestResult<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![match protocol {
            Protocol::Http1 => b"http/1.1".to_vec(),
            Protocol::Http2 => b"h2".to_vec(),
        }];
        Ok(Client {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
        })
    }

    /// A TLS connection to the server that has done nothing else yet.
    pub async fn connect_tls(
        &self,
    ) -> TestResult<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        Ok(self
            .connector
            .connect(ServerName::try_from(SERVICE_DNS)?, tcp)
            .await?)
    }

    /// POSTs `body` to `path` on a fresh TLS connection.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> TestResult<Reply> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = self
            .connector
            .connect(ServerName::try_from(SERVICE_DNS)?, tcp)
            .await?;
        let server_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or("no server certificate")?;
        let protocol = if tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()) {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        let response = match protocol {
            Protocol::Http2 => {
                let (mut sender, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    TokioIo::new(tls),
                )
                .await?;
                tokio::spawn(conn);
                let request = hyper::Request::post(format!("https://{SERVICE_DNS}{path}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                sender.send_request(request).await?
            }
            Protocol::Http1 => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                let request = hyper::Request::post(path)
                    .header("host", SERVICE_DNS)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                sender.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            body,
            server_cert,
            protocol,
        })
    }
}

/// The webhook running in-process on 127.0.0.1:0 with certificates from files.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub store: Arc<CertStore>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<multus_eni_webhook::Result<()>>>,
    _watcher: notify::RecommendedWatcher,
}

impl TestServer {
    pub async fn start(config: Config, cert: &Path, key: &Path) -> TestResult<Self> {
        Self::start_with_limits(config, cert, key, ConnectionLimits::default()).await
    }

    /// Like [`TestServer::start`], with the given per-connection limits.
    pub async fn start_with_limits(
        config: Config,
        cert: &Path,
        key: &Path,
        limits: ConnectionLimits,
    ) -> TestResult<Self> {
        let metrics = Arc::new(Metrics::new());
        let store = CertStore::load(cert, key, Some(metrics.clone()))?;
        let watcher = store.watch()?;
        let tls = server_config(store.clone())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = build_router(AppState {
            config: Arc::new(config),
            metrics: metrics.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = HttpsServer {
            tls,
            router,
            limits,
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(serve_tls(listener, server, async move {
            let _ = stopped.await;
        }));
        Ok(TestServer {
            addr,
            metrics,
            store,
            stop: Some(stop),
            task: Some(task),
            _watcher: watcher,
        })
    }

    /// Signals shutdown and waits for the server to drain.
    pub async fn stop(mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

/// Writes a certificate pair as plain files in `dir`; returns (cert path, key path).
pub fn write_plain(dir: &Path, cert_pem: &str, key_pem: &str) -> TestResult<(PathBuf, PathBuf)> {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, cert_pem)?;
    std::fs::write(&key, key_pem)?;
    Ok((cert, key))
}
