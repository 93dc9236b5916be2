//! The node's table for humans and for the HTTP startup gate: every address of the node's pods
//! on this instance's ENIs with where it stands, published by the node task after each change
//! and served read-only on the agent's HTTP port, and printed by `multus-eni-agent status`.
//! `/status` (every namespace, ENI, the instance id and EC2's error text) answers loopback
//! callers only: the `status` command runs in the agent's pod. `/v1/addresses` (the gate) is
//! open to the node's pods, answers only about the addresses asked, never with EC2's text, and
//! holds at most `--max-long-polls` waiting requests.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::{Extension, Router};
use multus_eni_proto::{AddressState, GateAddress, GateAnswer};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use ipnet::IpNet;

use crate::metrics::{LimitLabels, Metrics};
use crate::plan::{
    DAD_IN_PROGRESS, EC2_SAID, ForeignMacs, InstanceEnis, Knowledge, MacLookup, PodNetns,
    address_state,
};
use crate::prefix::PrefixState;

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
    /// The delegated prefix the address is routable through (prefix mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<IpNet>,
}

/// A delegated prefix on one of this instance's Multus ENIs, or wanted there (prefix mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixRow {
    pub eni: String,
    pub prefix: IpNet,
    pub state: PrefixState,
}

/// An address on one of this instance's Multus ENIs that no pod of this node was ever seen
/// holding and that this agent never assigned: never unassigned unless `--reclaim-unowned`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unowned {
    pub eni: String,
    pub address: IpAddr,
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
    /// Addresses on this instance's Multus ENIs that are not this agent's own.
    #[serde(default)]
    pub unowned: Vec<Unowned>,
    /// Delegated prefixes (prefix mode).
    #[serde(default)]
    pub prefixes: Vec<PrefixRow>,
    /// Addresses pods hold on interfaces that EC2 said carry no ENI (macvlan, SR-IOV, eth0's
    /// veth) or have no MAC: nothing to assign, nothing for the HTTP gate to wait for. Not in
    /// `/status`.
    #[serde(skip)]
    pub no_eni: BTreeSet<IpAddr>,
}

/// Reason served by the gate instead of EC2's own text.
const EC2_REFUSED_PUBLIC: &str =
    "EC2 refused it; retried with backoff (details: multus-eni-agent status on the node)";

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
                    reason: r.reason.as_ref().map(|reason| {
                        if reason.starts_with(EC2_SAID) {
                            EC2_REFUSED_PUBLIC.to_string()
                        } else {
                            reason.clone()
                        }
                    }),
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
        let rows: Vec<[String; 7]> = self
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
                    r.prefix.map_or_else(|| "-".into(), |p| p.to_string()),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let header = [
            "NETNS",
            "INTERFACE",
            "ADDRESS",
            "ENI",
            "STATE",
            "PREFIX",
            "WHY",
        ]
        .map(String::from);
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
        if !self.prefixes.is_empty() {
            out.push_str(&format!("\nprefixes: {}\n", self.prefixes.len()));
            for p in &self.prefixes {
                let state = serde_json::to_value(p.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                out.push_str(&format!("  {}  {}  {state}\n", p.eni, p.prefix));
            }
        }
        if !self.unowned.is_empty() {
            // One line each, with the word: `status | grep unowned` lists them (install.md).
            out.push_str(&format!(
                "\n{} unowned: on this instance's Multus ENIs, no pod of this node ever held them; kept unless --reclaim-unowned\n",
                self.unowned.len()
            ));
            for u in &self.unowned {
                out.push_str(&format!("unowned  {}  {}\n", u.eni, u.address));
            }
        }
        out
    }
}

/// The table's rows: every address of `pods` on an interface whose MAC is one of this
/// instance's ENIs, another instance's ENI (refused), or not looked up yet (pending): all but
/// those EC2 said carry no ENI.
pub fn rows<'a>(pods: impl IntoIterator<Item = &'a PodNetns>, k: &Knowledge<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for pod in pods {
        for iface in &pod.interfaces {
            let Some(mac) = iface
                .mac
                .filter(|m| k.foreign.get(m) != Some(&MacLookup::NoEni))
            else {
                continue;
            };
            let on = k.enis.get(&mac);
            let row = |address, (state, eni, reason)| Row {
                netns: pod.name.clone(),
                interface: iface.name.clone(),
                address,
                eni,
                state,
                reason,
                prefix: on
                    .filter(|_| state == AddressState::Routable)
                    .and_then(|e| e.prefix_over(address)),
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

/// Addresses `pods` hold on interfaces that EC2 said carry no ENI, or that have no MAC.
pub fn not_on_an_eni<'a>(
    pods: impl IntoIterator<Item = &'a PodNetns>,
    enis: &InstanceEnis,
    foreign: &ForeignMacs,
) -> BTreeSet<IpAddr> {
    pods.into_iter()
        .flat_map(|p| p.interfaces.iter())
        .filter(|i| {
            i.mac.is_none_or(|m| {
                !enis.contains_key(&m) && foreign.get(&m) == Some(&MacLookup::NoEni)
            })
        })
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

/// What the table's handlers share.
#[derive(Clone)]
struct Served {
    status: watch::Receiver<Arc<NodeStatus>>,
    /// Permits for requests that wait (`--max-long-polls`).
    long_polls: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// `/status` and `/v1/addresses`, read from the published table; at most `max_long_polls`
/// gate requests wait at once (more are answered at once, counted in `limit_hits_total`).
pub fn router(
    status: watch::Receiver<Arc<NodeStatus>>,
    max_long_polls: usize,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/status", get(full))
        .route("/v1/addresses", get(gate))
        .with_state(Served {
            status,
            long_polls: Arc::new(Semaphore::new(max_long_polls)),
            metrics,
        })
}

/// Whether `peer` is this host itself (an IPv4 caller of a dual-stack listener arrives as
/// `::ffff:127.0.0.1`).
fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

async fn full(
    State(served): State<Served>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    if !peer.is_some_and(|Extension(ConnectInfo(p))| is_loopback(p)) {
        return (
            StatusCode::FORBIDDEN,
            "/status answers loopback callers only: run `multus-eni-agent status` in the agent's pod\n",
        )
            .into_response();
    }
    let current = served.status.borrow().clone();
    Json((*current).clone()).into_response()
}

async fn gate(State(served): State<Served>, RawQuery(query): RawQuery) -> Response {
    let q = match parse_gate_query(query.as_deref().unwrap_or_default()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let mut status = served.status.clone();
    let permit = match served.long_polls.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => {
            served
                .metrics
                .limit_hits
                .get_or_create(&LimitLabels {
                    limit: "long_polls",
                })
                .inc();
            None
        }
    };
    if let Some(since) = q.since
        && permit.is_some()
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
            prefix: None,
        };
        NodeStatus {
            instance_id: "i-1".into(),
            ready: true,
            last_ec2_error: None,
            generation: 7,
            addresses: vec![
                row("10.0.1.20", AddressState::Routable),
                row("10.0.1.21", AddressState::Pending),
                Row {
                    reason: Some(format!("{EC2_SAID}InvalidParameterValue: secret detail")),
                    ..row("10.0.1.22", AddressState::Pending)
                },
            ],
            unowned: Vec::new(),
            prefixes: Vec::new(),
            no_eni: [ip("192.168.7.2")].into(),
        }
    }

    #[test]
    fn the_gate_never_serves_ec2s_own_text() {
        let answer = status().gate(&[ip("10.0.1.22")]);
        let reason = answer.addresses[0].reason.clone().unwrap_or_default();
        assert!(!reason.contains("secret detail"), "{reason}");
        assert_eq!(reason, EC2_REFUSED_PUBLIC);
    }

    #[test]
    fn status_is_for_loopback_callers_only() {
        for (peer, ok) in [
            ("127.0.0.1:5000", true),
            ("[::1]:5000", true),
            ("[::ffff:127.0.0.1]:5000", true),
            ("10.0.1.9:5000", false),
            ("[::ffff:10.0.1.9]:5000", false),
            ("[2001:db8::9]:5000", false),
        ] {
            let peer: SocketAddr = peer.parse().unwrap_or_else(|e| panic!("{peer}: {e}"));
            assert_eq!(is_loopback(peer), ok, "{peer}");
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
    fn unowned_addresses_are_listed_one_per_line_with_the_word() {
        let mut s = status();
        s.unowned = vec![Unowned {
            eni: "eni-1".into(),
            address: ip("10.0.1.99"),
        }];
        let text = s.table();
        let listed: Vec<&str> = text.lines().filter(|l| l.starts_with("unowned")).collect();
        assert_eq!(listed, ["unowned  eni-1  10.0.1.99"], "{text}");
    }

    #[test]
    fn the_table_has_one_line_per_address() {
        let text = status().table();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].starts_with("NETNS"));
        assert!(lines[2].contains("10.0.1.20") && lines[2].contains("routable"));
    }
}
