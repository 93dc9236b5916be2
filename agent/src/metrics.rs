//! Prometheus metrics (`multus_eni_agent_*`) and the plain-HTTP `/metrics`, `/healthz`,
//! `/readyz` on `--metrics-addr`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the EC2 calls counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub action: &'static str,
    /// `success`, or the error kind (`throttled`, `rejected`, ...).
    pub outcome: &'static str,
    /// What the call names: `address`, `prefix` (prefix mode), or `describe`.
    pub kind: &'static str,
}

/// Labels of the refusals counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `not_held`, `not_no_manage`, `primary`.
    pub reason: &'static str,
}

/// Labels of the limits counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `line_length`, `connections`, `connections_per_pod`, `queued_answers`, `netns_reads`.
    pub limit: &'static str,
}

/// Labels of the connected sidecars gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// The protocol version of the sidecar's latest claim (`1`: the previous release's).
    pub protocol: u32,
}

/// Labels of `multus_eni_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
    /// The commit (build-support/git_commit.rs: git, else `MULTUS_ENI_GIT_COMMIT`, else `unknown`): two builds of
    /// one version are told apart.
    git_commit: &'static str,
}

/// Labels of the releases counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// `release` (the sidecar said so) or `gone` (its namespace or addresses went away).
    pub cause: &'static str,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub batch_addresses: Histogram,
    pub throttles: Counter,
    pub pending: Gauge<i64, AtomicI64>,
    pub claim_to_routable: Histogram,
    pub releases: Family<ReleaseLabels, Counter>,
    pub reclaims: Counter,
    pub refusals: Family<RefusalLabels, Counter>,
    pub limit_hits: Family<LimitLabels, Counter>,
    pub address_conflicts: Gauge<i64, AtomicI64>,
    pub unowned_addresses: Gauge<i64, AtomicI64>,
    pub prefixes: Gauge<i64, AtomicI64>,
    pub ec2_auth_failing: Gauge<i64, AtomicI64>,
    pub watched_namespaces: Gauge<i64, AtomicI64>,
    pub oldest_pending_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sidecars: Family<ProtocolLabels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                component: "agent",
                version: env!("CARGO_PKG_VERSION"),
                git_commit: env!("MULTUS_ENI_GIT_COMMIT"),
            })
            .set(1);
        root.register(
            "multus_eni_build_info",
            "Version of the running multus-eni component",
            build_info,
        );
        let registry = root.sub_registry_with_prefix("multus_eni_agent");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "ec2_calls",
            "EC2 calls by action and outcome",
            calls.clone(),
        );
        let batch_addresses = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "batch_addresses",
            "Addresses per Assign/Unassign call",
            batch_addresses.clone(),
        );
        let throttles = Counter::default();
        registry.register(
            "throttles",
            "EC2 calls turned away by the rate limit",
            throttles.clone(),
        );
        let pending = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "pending_addresses",
            "Addresses queued for an Assign or Unassign call",
            pending.clone(),
        );
        let claim_to_routable = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "claim_to_routable_seconds",
            "From a verified claim to the address on its ENI",
            claim_to_routable.clone(),
        );
        let releases = Family::<ReleaseLabels, Counter>::default();
        registry.register(
            "releases",
            "Addresses unassigned after their pod let go of them",
            releases.clone(),
        );
        let reclaims = Counter::default();
        registry.register(
            "reclaims",
            "Leaked addresses unassigned after --reclaim-after",
            reclaims.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Claimed addresses the agent refused",
            refusals.clone(),
        );
        let limit_hits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_hits",
            "Times a bound was reached (a caller was cut off, refused or made to wait)",
            limit_hits.clone(),
        );
        let address_conflicts = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "address_conflicts",
            "Addresses wanted on another ENI too and waiting before they are taken back",
            address_conflicts.clone(),
        );
        let unowned_addresses = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "unowned_addresses",
            "Addresses on this instance's Multus ENIs that no pod of this node was ever seen holding: kept unless --reclaim-unowned",
            unowned_addresses.clone(),
        );
        let prefixes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "prefixes",
            "Delegated prefixes on this instance's Multus ENIs (prefix mode, --prefix-ranges)",
            prefixes.clone(),
        );
        let ec2_auth_failing = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "ec2_auth_failing",
            "1 while EC2 answers with credential, region or permission errors",
            ec2_auth_failing.clone(),
        );
        let watched_namespaces = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "watched_namespaces",
            "Pod network namespaces watched under --netns-dir",
            watched_namespaces.clone(),
        );
        let oldest_pending_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "oldest_pending_seconds",
            "Age of the oldest address wanted on an ENI and not on it yet",
            oldest_pending_seconds.clone(),
        );
        let sidecars = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "sidecars",
            "Connected sidecars by the protocol version they speak (version skew at a glance)",
            sidecars.clone(),
        );
        Self {
            registry: root,
            calls,
            batch_addresses,
            throttles,
            pending,
            claim_to_routable,
            releases,
            reclaims,
            refusals,
            limit_hits,
            address_conflicts,
            unowned_addresses,
            prefixes,
            ec2_auth_failing,
            watched_namespaces,
            oldest_pending_seconds,
            sidecars,
            ready: AtomicBool::new(false),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `/healthz` (process up), `/readyz` (the instance's ENIs and `--netns-dir` read, EC2
/// accepts the agent's credentials), `/metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(metrics)
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_version_and_the_commit() {
        let mut text = String::new();
        let metrics = Metrics::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
            .unwrap_or_else(|e| panic!("{e}"));
        let line = format!(
            r#"multus_eni_build_info{{component="agent",version="{}",git_commit="{}"}} 1"#,
            env!("CARGO_PKG_VERSION"),
            env!("MULTUS_ENI_GIT_COMMIT")
        );
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
}
