//! `POST /mutate` over HTTP: body limit, metrics and logs around the pure
//! [`crate::admission::review`]. Bad bodies get a 400 with a message, bodies over the
//! kube-apiserver's 3 MiB request limit a 413.

use crate::admission::{MAX_BODY_BYTES, review};
use crate::inject::{Config, Decision, Ec2Access, SkipReason};
use crate::metrics::{
    Metrics, OUTCOME_INJECTED, OUTCOME_MOVED_FIRST, OUTCOME_REJECTED, OUTCOME_SKIPPED,
    REASON_TOO_LARGE,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::sync::Arc;
use std::time::Instant;

/// Shared state of the `/mutate` handler.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
}

/// The path for namespaces that chose direct mode explicitly (label
/// `multus-eni.io/ec2-access=direct`): always a sidecar that calls EC2 itself.
pub const DIRECT_PATH: &str = "/mutate/direct";
/// The path for namespaces where no hostPath volume is allowed (Pod Security `baseline` or
/// `restricted`, or the label `multus-eni.io/ec2-access=gate`): the HTTP startup gate, or
/// direct mode when the webhook's `--ec2-access` is `direct` (no agent to ask).
pub const GATE_PATH: &str = "/mutate/gate";

/// The HTTPS router: `POST /mutate` (the configured `--ec2-access`), `POST /mutate/gate` and
/// `POST /mutate/direct`, with the 3 MiB body limit.
pub fn build_router(state: AppState) -> Router {
    let with_access = |access: Ec2Access| AppState {
        config: Arc::new(state.config.with_ec2_access(access)),
        metrics: state.metrics.clone(),
    };
    let direct = with_access(Ec2Access::Direct);
    let gate = with_access(state.config.ec2_access.without_host_path());
    Router::new()
        .route("/mutate", post(mutate).with_state(state))
        .route(DIRECT_PATH, post(mutate).with_state(direct))
        .route(GATE_PATH, post(mutate).with_state(gate))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

async fn mutate(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            // Over the 3 MiB limit (413) or a body that could not be read.
            let reason = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                REASON_TOO_LARGE
            } else {
                "bad_request"
            };
            state
                .metrics
                .observe_admission(OUTCOME_REJECTED, reason, started.elapsed());
            tracing::warn!(error = %rejection.body_text(), reason, "rejected admission body");
            return rejection.into_response();
        }
    };
    match review(&state.config, &body) {
        Ok(outcome) => {
            let (label, reason) = match &outcome.decision {
                Decision::Inject(_) => (OUTCOME_INJECTED, ""),
                Decision::MoveSidecarFirst(_) => (OUTCOME_MOVED_FIRST, ""),
                Decision::Skip(reason) => (OUTCOME_SKIPPED, reason.label()),
            };
            let response = axum::Json(&outcome.response).into_response();
            let took = started.elapsed();
            state.metrics.observe_admission(label, reason, took);
            match &outcome.decision {
                Decision::Inject(injection) => tracing::info!(
                    uid = %outcome.uid,
                    namespace = %outcome.namespace,
                    pod = %outcome.pod,
                    interfaces = %injection.interfaces.join(","),
                    ec2_access = state.config.ec2_access.as_str(),
                    ignored_overrides = injection.warnings.len(),
                    micros = took.as_micros() as u64,
                    "sidecar injected"
                ),
                Decision::MoveSidecarFirst(_) => tracing::info!(
                    uid = %outcome.uid,
                    namespace = %outcome.namespace,
                    pod = %outcome.pod,
                    "sidecar moved back to the first init container"
                ),
                Decision::Skip(SkipReason::MalformedNetworks(err)) => tracing::warn!(
                    uid = %outcome.uid,
                    namespace = %outcome.namespace,
                    pod = %outcome.pod,
                    reason,
                    error = %err,
                    "not injected: malformed networks annotation"
                ),
                Decision::Skip(SkipReason::RunToCompletion { restart_policy }) => tracing::warn!(
                    uid = %outcome.uid,
                    namespace = %outcome.namespace,
                    pod = %outcome.pod,
                    reason,
                    restart_policy = %restart_policy,
                    "not injected: legacy mode and a pod that runs to completion"
                ),
                Decision::Skip(_) => tracing::debug!(
                    uid = %outcome.uid,
                    namespace = %outcome.namespace,
                    pod = %outcome.pod,
                    reason,
                    "not injected"
                ),
            }
            response
        }
        Err(err) => {
            state
                .metrics
                .observe_admission(OUTCOME_REJECTED, "bad_request", started.elapsed());
            tracing::warn!(error = %err, bytes = body.len(), "rejected admission body");
            (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response()
        }
    }
}
