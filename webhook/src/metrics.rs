//! Prometheus metrics and the plain-HTTP health/metrics endpoint (`--metrics-addr`).

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
use std::sync::Arc;
use std::time::Duration;

use crate::inject::SkipReason;
use crate::serve::Readiness;
use crate::tls::HANDSHAKE_FAILURE_REASONS;

/// Outcome label of `multus_eni_webhook_admissions_total`.
pub const OUTCOME_INJECTED: &str = "injected";
/// Outcome label: already injected, and the sidecar was moved back to the first init container.
pub const OUTCOME_MOVED_FIRST: &str = "moved_first";
/// Outcome label: allowed without a patch (the `reason` label says why).
pub const OUTCOME_SKIPPED: &str = "skipped";
/// Outcome label: the body was rejected with a 4xx/5xx.
pub const OUTCOME_REJECTED: &str = "rejected";

/// Labels of the admissions counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// Reason label of a rejected body larger than the kube-apiserver's request limit (413).
pub const REASON_TOO_LARGE: &str = "too_large";

/// Labels of the TLS handshake failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub reason: &'static str,
}

/// Labels of `multus_eni_build_info`, the same metric the node agent exports: which
/// component runs which version, to see a half-finished upgrade in one query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfoLabels {
    pub component: &'static str,
    pub version: &'static str,
    pub git_commit: &'static str,
}

/// This crate's version, as `multus_eni_build_info` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this binary was built from (build-support/git_commit.rs: git, else `MULTUS_ENI_GIT_COMMIT`, else
/// `unknown`).
pub const GIT_COMMIT: &str = env!("MULTUS_ENI_GIT_COMMIT");

/// Labels of the certificate reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// The webhook's metrics; cheap to update from the request path.
pub struct Metrics {
    registry: Registry,
    /// `multus_eni_webhook_admissions_total{outcome,reason}`.
    pub admissions: Family<AdmissionLabels, Counter>,
    /// `multus_eni_webhook_admission_duration_seconds`: time spent in the handler.
    pub admission_duration: Histogram,
    /// `multus_eni_webhook_tls_cert_reloads_total{result="success|failure"}`.
    pub cert_reloads: Family<ReloadLabels, Counter>,
    /// `multus_eni_webhook_tls_handshake_failures_total{reason}`: a rise in
    /// `client_rejected_certificate` is the first symptom of a stale caBundle.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// `multus_eni_webhook_tls_cert_expiry_timestamp_seconds`: notAfter of the certificate
    /// being served, as a Unix time, to alert on before it lapses.
    pub cert_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric; all admission label pairs start at zero so dashboards see them.
    pub fn new() -> Self {
        // `multus_eni_build_info` has no component prefix; everything else is the webhook's.
        let mut root = Registry::default();
        let build_info = Family::<BuildInfoLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildInfoLabels {
                component: "webhook",
                version: VERSION,
                git_commit: GIT_COMMIT,
            })
            .set(1);
        root.register(
            "multus_eni_build_info",
            "The running version of each multus-eni component (always 1)",
            build_info,
        );
        let registry = root.sub_registry_with_prefix("multus_eni_webhook");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews by outcome and skip reason",
            admissions.clone(),
        );
        let admission_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review, body read to response built",
            admission_duration.clone(),
        );
        let cert_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "tls_cert_reloads",
            "Serving certificate (re)loads from disk",
            cert_reloads.clone(),
        );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            handshake_failures.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "tls_cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use, Unix seconds",
            cert_expiry.clone(),
        );
        for reason in HANDSHAKE_FAILURE_REASONS {
            let _ = handshake_failures.get_or_create(&HandshakeLabels { reason });
        }
        let _ = admissions.get_or_create(&AdmissionLabels {
            outcome: OUTCOME_INJECTED,
            reason: "",
        });
        let _ = admissions.get_or_create(&AdmissionLabels {
            outcome: OUTCOME_REJECTED,
            reason: REASON_TOO_LARGE,
        });
        let _ = admissions.get_or_create(&AdmissionLabels {
            outcome: OUTCOME_MOVED_FIRST,
            reason: "",
        });
        let _ = admissions.get_or_create(&AdmissionLabels {
            outcome: OUTCOME_REJECTED,
            reason: "bad_request",
        });
        for reason in SkipReason::LABELS {
            let _ = admissions.get_or_create(&AdmissionLabels {
                outcome: OUTCOME_SKIPPED,
                reason,
            });
        }
        Metrics {
            registry: root,
            admissions,
            admission_duration,
            cert_reloads,
            handshake_failures,
            cert_expiry,
        }
    }

    /// Counts one admission and its latency.
    pub fn observe_admission(&self, outcome: &'static str, reason: &'static str, took: Duration) {
        self.admissions
            .get_or_create(&AdmissionLabels { outcome, reason })
            .inc();
        self.admission_duration.observe(took.as_secs_f64());
    }

    /// Counts one certificate load attempt.
    pub fn observe_cert_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.cert_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Counts one failed TLS handshake.
    pub fn observe_handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .inc();
    }

    /// Records the notAfter (Unix seconds) of the certificate now served.
    pub fn set_cert_expiry(&self, not_after_unix: i64) {
        self.cert_expiry.set(not_after_unix);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `/healthz` (process up), `/readyz` (TLS listener serving, not shutting down), `/metrics`.
pub fn metrics_router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readyz(&readiness) }
            }),
        )
        .route("/metrics", get(render))
        .with_state(metrics)
}

fn readyz(readiness: &Readiness) -> Response {
    if readiness.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
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
    fn admissions_are_exposed_with_labels() {
        let metrics = Metrics::new();
        metrics.observe_admission(OUTCOME_INJECTED, "", Duration::from_micros(200));
        metrics.observe_admission(OUTCOME_SKIPPED, "host_network", Duration::from_micros(50));
        let text = metrics.encode().unwrap_or_default();
        assert!(
            text.contains(r#"multus_eni_webhook_admissions_total{outcome="injected",reason=""} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"multus_eni_webhook_admissions_total{outcome="skipped",reason="host_network"} 1"#
        ));
        assert!(text.contains(
            r#"multus_eni_webhook_admissions_total{outcome="skipped",reason="opted_out"} 0"#
        ));
        assert!(text.contains("multus_eni_webhook_admission_duration_seconds_count 2"));
    }

    #[test]
    fn build_info_names_the_component_and_version_without_a_prefix() {
        let text = Metrics::new().encode().unwrap_or_default();
        let line = format!(
            r#"multus_eni_build_info{{component="webhook",version="{VERSION}",git_commit="{GIT_COMMIT}"}} 1"#
        );
        assert!(!GIT_COMMIT.is_empty());
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
        assert!(!text.contains("multus_eni_webhook_multus_eni_build_info"));
        // The webhook's own metrics keep their prefix.
        assert!(text.contains("multus_eni_webhook_admissions_total"));
    }

    #[test]
    fn certificate_health_is_exposed() {
        let metrics = Metrics::new();
        metrics.set_cert_expiry(1_800_000_000);
        metrics.observe_handshake_failure("client_rejected_certificate");
        let text = metrics.encode().unwrap_or_default();
        assert!(
            text.contains("multus_eni_webhook_tls_cert_expiry_timestamp_seconds 1800000000"),
            "{text}"
        );
        assert!(text.contains(
            r#"multus_eni_webhook_tls_handshake_failures_total{reason="client_rejected_certificate"} 1"#
        ));
        assert!(
            text.contains(r#"multus_eni_webhook_tls_handshake_failures_total{reason="timeout"} 0"#)
        );
        assert!(text.contains(
            r#"multus_eni_webhook_admissions_total{outcome="rejected",reason="too_large"} 0"#
        ));
    }
}
