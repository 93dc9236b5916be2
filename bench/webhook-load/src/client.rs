//! The kube-apiserver's side: HTTP/1.1 with keep-alive over TLS, verifying the serving
//! certificate against the CA and the Service DNS name.

use crate::certs::{SERVICE_DNS_NAME, ThrowawayCerts};
use crate::{Error, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Opens TLS connections to the webhook.
#[derive(Clone)]
pub struct Connector {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

/// One keep-alive connection; requests go one at a time, as on an HTTP/1.1 connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

/// Status and body of one answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Connector {
    /// A connector for the webhook at `addr`, trusting the throwaway CA.
    pub fn new(addr: SocketAddr, certs: &ThrowawayCerts) -> Self {
        Connector {
            addr,
            server_name: certs.server_name.clone(),
            tls: TlsConnector::from(certs.client.clone()),
        }
    }

    /// TCP connect, TLS handshake (certificate verified), HTTP/1.1 handshake.
    pub async fn connect(&self) -> Result<Connection> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| Error::io(format!("connecting to {}", self.addr), e))?;
        tcp.set_nodelay(true)
            .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Error::io("TLS handshake", e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        tokio::spawn(conn);
        Ok(Connection { sender })
    }
}

impl Connection {
    /// `POST /mutate` as the kube-apiserver sends it; reads the whole answer.
    pub async fn post(&mut self, body: Bytes) -> Result<Answer> {
        let http = |e: hyper::Error| Error::Http(e.to_string());
        self.sender.ready().await.map_err(http)?;
        let request = hyper::Request::post("/mutate?timeout=10s")
            .header(HOST, SERVICE_DNS_NAME)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, */*")
            .body(Full::new(body))
            .map_err(|e| Error::Http(e.to_string()))?;
        let response = self.sender.send_request(request).await.map_err(http)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// The server (or an error) closed the connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}
