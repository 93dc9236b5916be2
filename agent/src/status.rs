//! The node's table for humans and for the HTTP startup gate: every address of the node's pods
//! on this instance's ENIs with where it stands, published by the node task after each change
//! and served read-only on the agent's HTTP port (`/status`, `/v1/addresses`), and printed by
//! `multus-eni-agent status`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use multus_eni_proto::{AddressState, GateAddress, GateAnswer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::plan::{DAD_IN_PROGRESS, InstanceEnis, Knowledge, PodNetns, address_state};

/// One address of the node's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The pod namespace's entry under `--netns-dir`.
    pub netns: String,
    pub interface: String,
    pub address: IpAddr,
    pub eni: Option<String>,
    pub state: AddressState,
    pub reason: Option<String>,
}

/// The node's table as last published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub instance_id: String,
    pub ready: bool,
    pub last_ec2_error: Option<String>,
    /// Changes with every published change of the table.
    pub generation: u64,
    pub addresses: Vec<Row>,
    /// Addresses pods hold on interfaces that carry no ENI of this instance (macvlan, SR-IOV,
    /// eth0): nothing to assign, nothing for the HTTP gate to wait for. Not in `/status`.
    #[serde(skip)]
    pub no_eni: BTreeSet<IpAddr>,
}

// === impl NodeStatus ===

impl NodeStatus {
    /// Where each of `asked` stands; `unknown` for an address no pod of the node holds.
    pub fn gate(&self, asked: &[IpAddr]) -> GateAnswer {
        let addresses: Vec<GateAddress> = asked
            .iter()
            .map(|a| match self.addresses.iter().find(|r| r.address == *a) {
                Some(r) => GateAddress {
                    address: *a,
                    state: r.state,
                    eni: r.eni.clone(),
                    reason: r.reason.clone(),
                },
                None if self.no_eni.contains(a) => GateAddress {
                    address: *a,
                    state: AddressState::NoEni,
                    eni: None,
                    reason: None,
                },
                None => GateAddress {
                    address: *a,
                    state: AddressState::Unknown,
                    eni: None,
                    reason: Some("no pod network namespace of this node holds it".into()),
                },
            })
            .collect();
        GateAnswer {
            generation: self.generation,
            routable: addresses.iter().all(|a| a.state.lets_pod_start()),
            addresses,
        }
    }

    /// The table as text, one address a line.
    pub fn table(&self) -> String {
        let mut out = format!(
            "instance {}  ready {}  last EC2 error: {}\n",
            if self.instance_id.is_empty() {
                "?"
            } else {
                &self.instance_id
            },
            self.ready,
            self.last_ec2_error.as_deref().unwrap_or("none")
        );
        let rows: Vec<[String; 6]> = self
            .addresses
            .iter()
            .map(|r| {
                [
                    r.netns.clone(),
                    r.interface.clone(),
                    r.address.to_string(),
                    r.eni.clone().unwrap_or_else(|| "-".into()),
                    serde_json::to_value(r.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let header = ["NETNS", "INTERFACE", "ADDRESS", "ENI", "STATE", "WHY"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(&rows) {
            let cells: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// The table's rows: every address of `pods` on an interface whose MAC is one of this
/// instance's ENIs, or another instance's ENI a sidecar claimed (shown refused).
pub fn rows<'a>(pods: impl IntoIterator<Item = &'a PodNetns>, k: &Knowledge<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for pod in pods {
        for iface in &pod.interfaces {
            let Some(mac) = iface.mac.filter(|m| {
                k.enis.contains_key(m) || k.foreign.get(m).is_some_and(Option::is_some)
            }) else {
                continue;
            };
            let row = |address, (state, eni, reason)| Row {
                netns: pod.name.clone(),
                interface: iface.name.clone(),
                address,
                eni,
                state,
                reason,
            };
            for &address in &iface.addresses {
                rows.push(row(address, address_state(mac, address, k)));
            }
            for &v6 in &iface.tentative {
                let pending = (AddressState::Pending, None, Some(DAD_IN_PROGRESS.into()));
                rows.push(row(IpAddr::V6(v6), pending));
            }
        }
    }
    rows
}

/// Addresses `pods` hold on interfaces whose MAC is none of this instance's ENIs.
pub fn not_on_an_eni<'a>(
    pods: impl IntoIterator<Item = &'a PodNetns>,
    enis: &InstanceEnis,
) -> BTreeSet<IpAddr> {
    pods.into_iter()
        .flat_map(|p| p.interfaces.iter())
        .filter(|i| i.mac.is_none_or(|m| !enis.contains_key(&m)))
        .flat_map(|i| i.addresses.iter().copied())
        .collect()
}

/// The longest long poll of `/v1/addresses`.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A query of `/v1/addresses`: `address=` (repeated), `since=`, `wait=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateQuery {
    pub addresses: Vec<IpAddr>,
    pub since: Option<u64>,
    pub wait: Duration,
}

/// Parses the query string of `/v1/addresses`.
pub fn parse_gate_query(query: &str) -> Result<GateQuery, String> {
    let mut q = GateQuery {
        addresses: Vec::new(),
        since: None,
        wait: Duration::ZERO,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "address" => q.addresses.push(
                value
                    .parse()
                    .map_err(|_| format!("not an IP address: {value:?}"))?,
            ),
            "since" => {
                q.since = Some(
                    value
                        .parse()
                        .map_err(|_| format!("since is not a generation: {value:?}"))?,
                )
            }
            "wait" => {
                q.wait = humantime::parse_duration(&value)
                    .map_err(|e| format!("wait: {e}"))?
                    .min(MAX_WAIT)
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    if q.addresses.is_empty() {
        return Err("at least one address= is needed".into());
    }
    if q.addresses.len() > 64 {
        return Err("at most 64 addresses per query".into());
    }
    let unique: BTreeSet<_> = q.addresses.iter().collect();
    if unique.len() != q.addresses.len() {
        return Err("an address is named twice".into());
    }
    Ok(q)
}

/// `/status` and `/v1/addresses`, read from the published table.
pub fn router(status: watch::Receiver<Arc<NodeStatus>>) -> Router {
    Router::new()
        .route("/status", get(full))
        .route("/v1/addresses", get(gate))
        .with_state(status)
}

async fn full(State(status): State<watch::Receiver<Arc<NodeStatus>>>) -> Json<NodeStatus> {
    let current = status.borrow().clone();
    Json((*current).clone())
}

async fn gate(
    State(mut status): State<watch::Receiver<Arc<NodeStatus>>>,
    RawQuery(query): RawQuery,
) -> Response {
    let q = match parse_gate_query(query.as_deref().unwrap_or_default()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    if let Some(since) = q.since
        && status.borrow_and_update().generation == since
    {
        let _ = tokio::time::timeout(q.wait, async {
            while status.changed().await.is_ok() {
                if status.borrow_and_update().generation != since {
                    return;
                }
            }
        })
        .await;
    }
    let current = status.borrow().clone();
    Json(current.gate(&q.addresses)).into_response()
}

/// `multus-eni-agent status`: fetches `/status` from a running agent.
pub async fn fetch(addr: SocketAddr) -> Result<NodeStatus, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the agent at {addr}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/status")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET /status: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET /status answered {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading /status: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("/status is not the agent's table: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn status() -> NodeStatus {
        let row = |a: &str, state| Row {
            netns: "cni-1".into(),
            interface: "net1".into(),
            address: ip(a),
            eni: Some("eni-1".into()),
            state,
            reason: None,
        };
        NodeStatus {
            instance_id: "i-1".into(),
            ready: true,
            last_ec2_error: None,
            generation: 7,
            addresses: vec![
                row("10.0.1.20", AddressState::Routable),
                row("10.0.1.21", AddressState::Pending),
            ],
            no_eni: [ip("192.168.7.2")].into(),
        }
    }

    #[test]
    fn the_gate_says_routable_only_when_every_asked_address_is() {
        let s = status();
        let one = s.gate(&[ip("10.0.1.20")]);
        assert!(one.routable);
        assert_eq!(one.generation, 7);
        assert!(!s.gate(&[ip("10.0.1.20"), ip("10.0.1.21")]).routable);
        let unknown = s.gate(&[ip("10.0.1.99")]);
        assert!(!unknown.routable);
        assert_eq!(unknown.addresses[0].state, AddressState::Unknown);
        // Held on a macvlan or SR-IOV interface: nothing to wait for.
        let macvlan = s.gate(&[ip("10.0.1.20"), ip("192.168.7.2")]);
        assert!(macvlan.routable);
        assert_eq!(macvlan.addresses[1].state, AddressState::NoEni);
    }

    #[test]
    fn gate_queries_are_checked() {
        let q = parse_gate_query("address=10.0.1.20&address=2001%3Adb8%3A%3A1&since=3&wait=20s")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.addresses, vec![ip("10.0.1.20"), ip("2001:db8::1")]);
        assert_eq!((q.since, q.wait), (Some(3), Duration::from_secs(20)));
        assert_eq!(
            parse_gate_query("address=10.0.1.20&wait=1h").map(|q| q.wait),
            Ok(MAX_WAIT)
        );
        for bad in [
            "",
            "address=nope",
            "address=10.0.1.20&since=x",
            "address=10.0.1.20&x=1",
            "address=10.0.1.20&address=10.0.1.20",
        ] {
            assert!(parse_gate_query(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_table_has_one_line_per_address() {
        let text = status().table();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("NETNS"));
        assert!(lines[2].contains("10.0.1.20") && lines[2].contains("routable"));
    }
}
