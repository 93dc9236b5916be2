//! The HTTP startup gate (`--agent-url`): the sidecar for namespaces where no hostPath is
//! allowed. It has no socket, no volume and no credentials: it watches its interfaces over
//! netlink like agent mode and asks the node agent, read-only over plain HTTP on the node's
//! address, whether exactly those addresses are routable (`GET /v1/addresses`, a long poll).
//! The agent finds the addresses itself, in the pod's network namespace, so the gate only
//! waits; `/readyz` is 200 once the agent's answer for the current addresses says
//! `routable`.
//!
//! While the agent is unreachable (or answers something else than the contract) `/readyz`
//! says 503 and the query is retried with backoff; a change of the addresses drops the query
//! under way and asks again at once.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::body::Bytes;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::Instrument;

use crate::addresses::{AddressWatcher, InterfaceTable, apply_events};
use crate::cli::RunArgs;
use crate::probe;
use crate::sleep_until;
use crate::{Error, Result};

/// How long the agent may hold a query when nothing changes (the contract allows ≤ 60 s).
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(20);
/// Extra time on top of [`LONG_POLL_WAIT`] before a query counts as lost: an agent that holds
/// a connection without answering is as unreachable as one that refuses it.
pub const ANSWER_GRACE: Duration = Duration::from_secs(10);
/// First wait before asking again after a failed query; doubles (with jitter) to
/// [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between two queries while the agent is unreachable: a restarted agent is
/// found within seconds, and a node's pods do not hammer it meanwhile.
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// Largest answer read from the agent (its answer names only the pod's own addresses).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// The agent's read-only endpoint (docs/contract.md).
pub const ADDRESSES_PATH: &str = "/v1/addresses";

fn retry_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// `--agent-url`: the agent's plain-HTTP port on the node, `http://HOST:PORT`. No TLS: the
/// answer is not secret, and this binary carries no TLS stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUrl {
    /// `host:port` to connect to and to send as `Host`.
    authority: String,
}

impl AgentUrl {
    /// `host:port` of the agent.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

impl FromStr for AgentUrl {
    type Err = String;

    /// `http://HOST[:PORT][/]` with HOST an IP address or a DNS name. An IPv6 address may come
    /// without brackets (`http://fd00::7:9812`, what `http://$(HOST_IP):9812` expands to on an
    /// IPv6 node): the last `:` then separates the port.
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let usage = |why: &str| format!("{text:?}: {why}; give http://HOST:PORT");
        let Some(rest) = text.strip_prefix("http://") else {
            return Err(usage("the agent's port is plain HTTP"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(usage("only the agent's address, no path, query or user"));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| usage("unclosed ["))?;
            (host, after.strip_prefix(':'))
        } else if rest.matches(':').count() > 1 {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port: u16 = match port {
            None => 80,
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| usage("bad port"))?,
        };
        let authority = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            Ok(IpAddr::V4(v4)) => format!("{v4}:{port}"),
            Err(_) if is_dns_name(host) => format!("{host}:{port}"),
            Err(_) => {
                return Err(usage(&format!(
                    "{host:?} is neither an IP address nor a DNS name (an unexpanded $(HOST_IP)?)"
                )));
            }
        };
        Ok(AgentUrl { authority })
    }
}

/// Letters, digits, `-` and `.`, not empty: what a node name or a DNS name of the agent is.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// The agent's position in its own history of the node (`generation`), opaque to the gate: it
/// is only sent back as `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation(String);

impl<'de> Deserialize<'de> for Generation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => Ok(Generation(n.to_string())),
            serde_json::Value::String(s) => Ok(Generation(s)),
            other => Err(serde::de::Error::custom(format!(
                "generation is neither a number nor a string: {other}"
            ))),
        }
    }
}

/// The agent's answer to `GET /v1/addresses` (docs/contract.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GateAnswer {
    pub generation: Generation,
    pub routable: bool,
    #[serde(default)]
    pub addresses: Vec<AddressAnswer>,
}

/// One address of a [`GateAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AddressAnswer {
    pub address: IpAddr,
    /// `routable`, `pending`, `refused`, `conflict`, `no_eni` or `unknown`.
    pub state: String,
    #[serde(default)]
    pub eni: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl AddressAnswer {
    /// The states that let the pod start: on its ENI, or on an interface that no ENI carries
    /// (macvlan, SR-IOV: nothing to assign).
    pub fn lets_pod_start(&self) -> bool {
        matches!(self.state.as_str(), "routable" | "no_eni")
    }
}

/// The query for `addresses`: `/v1/addresses?address=A&address=B[&since=G&wait=20s]`. IP
/// addresses need no escaping in a query (`:` and `.` are allowed there).
pub fn query_path(
    addresses: &BTreeSet<IpAddr>,
    since: Option<&Generation>,
    wait: Duration,
) -> String {
    let mut path = String::from(ADDRESSES_PATH);
    for (i, a) in addresses.iter().enumerate() {
        path.push(if i == 0 { '?' } else { '&' });
        path.push_str("address=");
        path.push_str(&a.to_string());
    }
    if let Some(since) = since {
        path.push_str(&format!("&since={}&wait={}s", since.0, wait.as_secs()));
    }
    path
}

/// Whether `answer` lets a pod holding exactly `asked` start: the agent says routable, for
/// exactly those addresses, each of them in a state that lets the pod start. An answer about
/// other addresses (an earlier query) never opens the gate.
pub fn gate_open(asked: &BTreeSet<IpAddr>, answer: &GateAnswer) -> bool {
    let answered: BTreeSet<IpAddr> = answer.addresses.iter().map(|a| a.address).collect();
    answer.routable
        && answered == *asked
        && answer.addresses.iter().all(AddressAnswer::lets_pod_start)
}

/// Why the pod is not ready, for `/readyz` and the log: the addresses that hold it back and
/// their state. The agent's reasons (which may carry EC2 error text) go to the log only.
pub fn not_ready_reason(asked: &BTreeSet<IpAddr>, answer: &GateAnswer) -> String {
    let answered: BTreeSet<IpAddr> = answer.addresses.iter().map(|a| a.address).collect();
    let mut parts: Vec<String> = answer
        .addresses
        .iter()
        .filter(|a| asked.contains(&a.address) && !a.lets_pod_start())
        .map(|a| format!("{} {}", a.address, a.state))
        .collect();
    parts.extend(
        asked
            .difference(&answered)
            .map(|a| format!("{a} not in the agent's answer")),
    );
    if parts.is_empty() {
        "the node agent does not report the addresses routable yet".into()
    } else {
        format!("not routable yet: {}", parts.join(", "))
    }
}

/// Why a query got no usable answer; the gate stays closed and asks again.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot connect to the node agent at {url}: {source}")]
    Connect {
        url: AgentUrl,
        source: std::io::Error,
    },
    #[error("HTTP to the node agent at {url}: {source}")]
    Http { url: AgentUrl, source: hyper::Error },
    #[error("no answer from the node agent at {url} within {seconds} s")]
    Timeout { url: AgentUrl, seconds: u64 },
    #[error(
        "the node agent at {url} answered {status} to {ADDRESSES_PATH}{hint}: {body}",
        hint = if *status == StatusCode::NOT_FOUND { " (an agent older than the HTTP gate? upgrade the agent first)" } else { "" }
    )]
    Status {
        url: AgentUrl,
        status: StatusCode,
        body: String,
    },
    #[error("unreadable answer from the node agent at {url}: {reason}")]
    Unreadable { url: AgentUrl, reason: String },
}

/// A plain HTTP/1.1 client for the agent's one endpoint: a connection per query (one query
/// every [`LONG_POLL_WAIT`] at most, so nothing to pool).
#[derive(Debug, Clone)]
pub struct GateClient {
    url: AgentUrl,
}

impl GateClient {
    pub fn new(url: AgentUrl) -> Self {
        Self { url }
    }

    /// Asks about `addresses`; with `since`, the agent holds the answer until the node's
    /// generation moves on or `wait` ends.
    pub async fn query(
        &self,
        addresses: BTreeSet<IpAddr>,
        since: Option<Generation>,
        wait: Duration,
    ) -> std::result::Result<GateAnswer, GateError> {
        let path = query_path(&addresses, since.as_ref(), wait);
        let limit = wait + ANSWER_GRACE;
        let (status, body) = tokio::time::timeout(limit, self.get(&path))
            .await
            .map_err(|_| GateError::Timeout {
                url: self.url.clone(),
                seconds: limit.as_secs(),
            })??;
        if status != StatusCode::OK {
            let body = String::from_utf8_lossy(&body);
            return Err(GateError::Status {
                url: self.url.clone(),
                status,
                body: body.trim().chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| GateError::Unreadable {
            url: self.url.clone(),
            reason: e.to_string(),
        })
    }

    async fn get(&self, path: &str) -> std::result::Result<(StatusCode, Bytes), GateError> {
        let http = |source| GateError::Http {
            url: self.url.clone(),
            source,
        };
        let stream = TcpStream::connect(self.url.authority())
            .await
            .map_err(|source| GateError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let request = Request::get(path)
            .header(hyper::header::HOST, self.url.authority())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| GateError::Unreadable {
                url: self.url.clone(),
                reason: format!("cannot build the request {path:?}: {e}"),
            })?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| GateError::Unreadable {
                    url: self.url.clone(),
                    reason: format!("reading the body: {e}"),
                })?
                .to_bytes();
            Ok((status, body))
        };
        // The connection is driven here, not spawned: a query dropped because the addresses
        // changed closes its connection with it.
        let mut exchange = std::pin::pin!(exchange);
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            biased;
            answer = &mut exchange => answer,
            closed = &mut connection => match closed {
                Err(e) => Err(http(e)),
                // Closed after the answer was sent: what is buffered is still read.
                Ok(()) => exchange.await,
            },
        }
    }
}

/// The addresses the gate asks about: every usable address of the named interfaces (the
/// tentative ones are not asked about: the pod is not ready while any is in DAD).
pub fn usable_addresses(table: &InterfaceTable) -> BTreeSet<IpAddr> {
    table
        .desired()
        .into_iter()
        .flat_map(|d| d.addresses)
        .collect()
}

/// The gate's view of the agent's last answer, as plain data.
#[derive(Debug)]
struct GateState {
    /// The addresses of the query under way (or of the last answer).
    asked: BTreeSet<IpAddr>,
    /// The generation of the last answer for `asked`; `None` asks without waiting.
    generation: Option<Generation>,
    /// Whether the last answer for `asked` opened the gate.
    open: bool,
    /// Why not, for `/readyz`.
    reason: String,
}

impl GateState {
    /// A question about `asked` not answered yet.
    fn asking(asked: BTreeSet<IpAddr>) -> Self {
        Self {
            asked,
            generation: None,
            open: false,
            reason: "asking the node agent".into(),
        }
    }
}

type Query = BoxFuture<'static, std::result::Result<GateAnswer, GateError>>;

/// Runs the gate until SIGTERM (or SIGINT). There is nothing to release: the agent sees the
/// pod's addresses leave with its namespace.
pub async fn run(args: RunArgs, url: AgentUrl) -> Result<()> {
    let span = crate::pod_span();
    async move {
        let readiness = probe::serve(args.probe_addr).await?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        tracing::info!(
            action = "start",
            mode = "gate",
            interfaces = %args.interfaces.join(","),
            agent_url = %url,
            probe_addr = %args.probe_addr,
            "waiting until the node agent reports the named interfaces' addresses routable"
        );
        let mut watcher = AddressWatcher::subscribe()?;
        let mut table = InterfaceTable::new(args.interfaces.clone());
        watcher.dump(&mut table).await?;

        let client = GateClient::new(url);
        let mut state = GateState::asking(usable_addresses(&table));
        let mut query: Option<Query> = None;
        let mut retry_at: Option<Instant> = Some(Instant::now());
        let mut backoff = retry_backoff();
        // The last failure logged: a new kind of failure is logged, a repeated one is not.
        let mut last_failure: Option<String> = None;
        loop {
            let wanted = usable_addresses(&table);
            if wanted != state.asked {
                // A new question: drop the one under way (its answer would be about other
                // addresses) and ask at once, without waiting for a change.
                state = GateState::asking(wanted);
                query = None;
                retry_at = Some(Instant::now());
            }
            if query.is_none()
                && !state.asked.is_empty()
                && retry_at.is_some_and(|t| t <= Instant::now())
            {
                retry_at = None;
                let client = client.clone();
                let (asked, since) = (state.asked.clone(), state.generation.clone());
                query = Some(Box::pin(async move {
                    client.query(asked, since, LONG_POLL_WAIT).await
                }));
            }
            let open = state.open || state.asked.is_empty();
            let ready = crate::agent_mode::pod_ready(&table, open);
            if ready != readiness.get() {
                tracing::info!(action = "readiness", ready, "readiness changed");
                readiness.set(ready);
            }
            if !ready {
                readiness.set_reason(&gate_reason(&table, &state));
            }
            let wake = retry_at;
            tokio::select! {
                biased;
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                event = watcher.next_event() => {
                    apply_events(&mut watcher, &mut table, event).await?;
                }
                answer = next_answer(&mut query) => {
                    query = None;
                    match answer {
                        Ok(answer) => {
                            if last_failure.take().is_some() {
                                tracing::info!(action = "query", outcome = "reachable", "the node agent answers again");
                            }
                            backoff = retry_backoff();
                            let open = gate_open(&state.asked, &answer);
                            if open != state.open || state.generation.is_none() {
                                log_answer(&state.asked, &answer, open);
                            }
                            state.open = open;
                            state.reason = if open { String::new() } else { not_ready_reason(&state.asked, &answer) };
                            state.generation = Some(answer.generation);
                            retry_at = Some(Instant::now());
                        }
                        Err(e) => {
                            let delay = backoff.next().unwrap_or(RETRY_MAX);
                            let failure = e.to_string();
                            if last_failure.as_ref() != Some(&failure) {
                                tracing::warn!(action = "query", outcome = "unreachable", error = %failure, "no answer from the node agent; not ready, asking again with backoff");
                                last_failure = Some(failure);
                            }
                            state.open = false;
                            state.generation = None;
                            state.reason = format!("no answer from the node agent: {e}");
                            retry_at = Some(Instant::now() + delay);
                        }
                    }
                }
                _ = sleep_until(wake), if wake.is_some() => {}
            }
        }
        readiness.set(false);
        tracing::info!(action = "stop", "signal received; exiting");
        Ok(())
    }
    .instrument(span)
    .await
}

fn gate_reason(table: &InterfaceTable, state: &GateState) -> String {
    let missing = table.missing();
    if !missing.is_empty() {
        return format!("interface(s) {} do not exist yet", missing.join(","));
    }
    if table.desired().iter().any(|d| !d.tentative.is_empty()) {
        return "an IPv6 address is still in duplicate address detection".into();
    }
    state.reason.clone()
}

fn log_answer(asked: &BTreeSet<IpAddr>, answer: &GateAnswer, open: bool) {
    if open {
        tracing::info!(
            action = "query",
            outcome = "routable",
            "the node agent reports every address routable"
        );
        return;
    }
    for a in answer.addresses.iter().filter(|a| !a.lets_pod_start()) {
        tracing::info!(action = "query", outcome = "not_routable", address = %a.address, state = %a.state, eni = ?a.eni, reason = ?a.reason, "address not routable yet");
    }
    let answered: BTreeSet<IpAddr> = answer.addresses.iter().map(|a| a.address).collect();
    for a in asked.difference(&answered) {
        tracing::warn!(action = "query", outcome = "missing", address = %a, "the node agent's answer leaves this address out");
    }
}

async fn next_answer(query: &mut Option<Query>) -> std::result::Result<GateAnswer, GateError> {
    match query {
        Some(q) => q.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn set(items: &[&str]) -> BTreeSet<IpAddr> {
        items.iter().map(|s| ip(s)).collect()
    }

    fn answer(json: &str) -> GateAnswer {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn agent_url_takes_plain_http_host_and_port_only() {
        let url: AgentUrl = "http://10.0.0.7:9812"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.authority(), "10.0.0.7:9812");
        assert_eq!(url.to_string(), "http://10.0.0.7:9812");
        let v6: AgentUrl = "http://[fd00::7]:9812/"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v6.authority(), "[fd00::7]:9812");
        let default_port: AgentUrl = "http://node".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default_port.authority(), "node:80");
        // `http://$(HOST_IP):9812` expanded on an IPv6 node.
        let bare_v6: AgentUrl = "http://fd00::7:9812"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare_v6.authority(), "[fd00::7]:9812");
        for bad in [
            "https://10.0.0.7:9812",
            "10.0.0.7:9812",
            "http://10.0.0.7:9812/v1/addresses",
            "http://user@10.0.0.7:9812",
            "http://:9812",
            "http://10.0.0.7:0",
            "http://10.0.0.7:port",
            "",
        ] {
            assert!(bad.parse::<AgentUrl>().is_err(), "{bad:?} accepted");
        }
        // An unexpanded `$(HOST_IP)` (no downward API env) fails at start, naming the value.
        let err = "http://$(HOST_IP):9812"
            .parse::<AgentUrl>()
            .err()
            .unwrap_or_default();
        assert!(err.contains("$(HOST_IP)"), "{err}");
    }

    #[test]
    fn the_query_names_every_address_and_waits_only_with_a_generation() {
        let addresses = set(&["10.0.1.5", "2001:db8::5"]);
        assert_eq!(
            query_path(&addresses, None, LONG_POLL_WAIT),
            "/v1/addresses?address=10.0.1.5&address=2001:db8::5"
        );
        let since = Generation("42".into());
        assert_eq!(
            query_path(&addresses, Some(&since), LONG_POLL_WAIT),
            "/v1/addresses?address=10.0.1.5&address=2001:db8::5&since=42&wait=20s"
        );
        // A query path is a valid request target as hyper sees it.
        let uri: Result<hyper::Uri, _> =
            query_path(&addresses, Some(&since), LONG_POLL_WAIT).parse();
        assert!(uri.is_ok(), "{uri:?}");
    }

    #[test]
    fn the_contract_answer_parses_with_a_number_or_string_generation() {
        let a = answer(
            r#"{"generation": 7, "routable": false, "addresses": [
                {"address": "10.0.1.5", "state": "pending", "eni": "eni-1", "reason": null},
                {"address": "10.0.1.6", "state": "unknown", "eni": null, "reason": null}]}"#,
        );
        assert_eq!(a.generation, Generation("7".into()));
        assert_eq!(a.addresses[0].eni.as_deref(), Some("eni-1"));
        let s = answer(r#"{"generation": "g-7", "routable": true, "addresses": []}"#);
        assert_eq!(s.generation, Generation("g-7".into()));
        assert!(
            serde_json::from_str::<GateAnswer>(r#"{"generation": null, "routable": true}"#)
                .is_err()
        );
    }

    #[test]
    fn the_gate_opens_only_for_exactly_the_asked_addresses() {
        let asked = set(&["10.0.1.5", "10.0.1.6"]);
        let both = answer(
            r#"{"generation": 1, "routable": true, "addresses": [
                {"address": "10.0.1.5", "state": "routable"},
                {"address": "10.0.1.6", "state": "no_eni"}]}"#,
        );
        assert!(gate_open(&asked, &both));
        // An answer about fewer or other addresses (an earlier question) keeps it closed.
        assert!(!gate_open(&set(&["10.0.1.5"]), &both));
        assert!(!gate_open(
            &set(&["10.0.1.5", "10.0.1.6", "10.0.1.7"]),
            &both
        ));
        // The agent's overall verdict and each state must agree.
        let not_overall = GateAnswer {
            routable: false,
            ..both.clone()
        };
        assert!(!gate_open(&asked, &not_overall));
        let pending = answer(
            r#"{"generation": 2, "routable": true, "addresses": [
                {"address": "10.0.1.5", "state": "routable"},
                {"address": "10.0.1.6", "state": "pending"}]}"#,
        );
        assert!(!gate_open(&asked, &pending));
    }

    #[test]
    fn the_reason_names_states_but_never_the_agents_error_text() {
        let asked = set(&["10.0.1.5", "10.0.1.6", "10.0.1.7"]);
        let a = answer(
            r#"{"generation": 3, "routable": false, "addresses": [
                {"address": "10.0.1.5", "state": "routable"},
                {"address": "10.0.1.6", "state": "refused", "reason": "UnauthorizedOperation: You are not authorized"}]}"#,
        );
        let reason = not_ready_reason(&asked, &a);
        assert_eq!(
            reason,
            "not routable yet: 10.0.1.6 refused, 10.0.1.7 not in the agent's answer"
        );
        assert!(!reason.contains("Unauthorized"));
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_an_error_not_an_answer() {
        // A port nothing listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
            l.local_addr().map(|a| a.port()).unwrap_or_default()
        };
        let url: AgentUrl = format!("http://127.0.0.1:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let got = GateClient::new(url)
            .query(set(&["10.0.1.5"]), None, LONG_POLL_WAIT)
            .await;
        assert!(matches!(got, Err(GateError::Connect { .. })), "{got:?}");
    }

    #[tokio::test]
    async fn the_client_sends_the_query_and_reads_the_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for body in [
                r#"{"generation": 9, "routable": true, "addresses": [{"address": "10.0.1.5", "state": "routable"}]}"#,
                "",
            ] {
                let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or_default();
                heads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let response = if body.is_empty() {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\nconnection: close\r\n\r\nnot found\n".to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                s.write_all(response.as_bytes()).await.unwrap_or_default();
            }
            heads
        });
        let url: AgentUrl = format!("http://127.0.0.1:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let client = GateClient::new(url);
        let got = client
            .query(
                set(&["10.0.1.5"]),
                Some(Generation("8".into())),
                LONG_POLL_WAIT,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(gate_open(&set(&["10.0.1.5"]), &got));
        let old_agent = client.query(set(&["10.0.1.5"]), None, LONG_POLL_WAIT).await;
        let message = old_agent.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("404") && message.contains("upgrade the agent"),
            "{message}"
        );
        let heads = server.await.unwrap_or_default();
        assert!(
            heads[0]
                .starts_with("GET /v1/addresses?address=10.0.1.5&since=8&wait=20s HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains(&format!("host: 127.0.0.1:{port}"))
        );
    }
}
