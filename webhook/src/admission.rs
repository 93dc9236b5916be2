//! The admission review, pure: an AdmissionReview body in, the response AdmissionReview out
//! (the HTTP handler is [`crate::handler`]).
//!
//! The envelope is read with `kube::core::admission` types; the pod itself stays raw JSON (see
//! [`crate::inject`]). Everything is allowed, with a patch when injecting or moving the sidecar.

use crate::inject::{Config, Decision, SkipReason, mutate_pod};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_KIND, Operation,
};
use serde_json::Value;

/// The kube-apiserver's request body limit; larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// The API versions of AdmissionReview this webhook answers (the response echoes the request's).
pub const ADMISSION_API_VERSIONS: [&str; 2] = ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"];

/// Why a body is not an admission review we can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("body is not an AdmissionReview: {0}")]
    NotAdmissionReview(#[source] serde_json::Error),
    #[error(
        "body is not an AdmissionReview: apiVersion {api_version:?}, kind {kind:?} (want {META_KIND:?} in one of {ADMISSION_API_VERSIONS:?})"
    )]
    UnsupportedType { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("building the response patch: {0}")]
    Patch(#[from] kube::core::admission::SerializePatchError),
    #[error("writing the response: {0}")]
    Response(#[source] serde_json::Error),
}

/// What `/mutate` decided for one request, plus what logs and metrics need.
#[derive(Debug)]
pub struct ReviewOutcome {
    /// The AdmissionReview to send back, as JSON (see [`response_json`]).
    pub response: Value,
    /// Inject or skip, and why.
    pub decision: Decision,
    /// `request.uid`.
    pub uid: String,
    /// `request.namespace` (empty if none).
    pub namespace: String,
    /// The pod's name, or its `generateName` prefix for pods from controllers.
    pub pod: String,
}

/// Answers one AdmissionReview body. Pure (no I/O), so benches and fuzzers can call it.
pub fn review(config: &Config, body: &[u8]) -> Result<ReviewOutcome, ReviewError> {
    let mut raw: Value = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
    // Keep the pod raw: take it out before the envelope is parsed into typed structs.
    let object = raw.pointer_mut("/request/object").map(Value::take);
    if let Some(old) = raw.pointer_mut("/request/oldObject") {
        *old = Value::Null;
    }
    let envelope: AdmissionReview<DynamicObject> =
        serde_json::from_value(raw).map_err(ReviewError::NotAdmissionReview)?;
    if envelope.types.kind != META_KIND
        || !ADMISSION_API_VERSIONS.contains(&envelope.types.api_version.as_str())
    {
        return Err(ReviewError::UnsupportedType {
            api_version: envelope.types.api_version,
            kind: envelope.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        envelope.try_into().map_err(|_| ReviewError::NoRequest)?;
    let object = object.unwrap_or(Value::Null);

    // Subresources (pods/binding, pods/eviction, ...) are not the pod itself.
    let is_pod = request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.sub_resource.is_none();
    let decision = if !is_pod {
        Decision::Skip(SkipReason::NotAPod)
    } else if request.operation != Operation::Create {
        Decision::Skip(SkipReason::NotCreate)
    } else {
        mutate_pod(config, &object)
    };

    let mut response = AdmissionResponse::from(&request);
    if let Some(patch) = decision.patch() {
        response = response.with_patch(patch.clone())?;
    }
    let warnings = match &decision {
        Decision::Skip(reason) => reason.warning().into_iter().collect(),
        Decision::Inject(injection) => injection.warnings.clone(),
        Decision::MoveSidecarFirst(_) => Vec::new(),
    };
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    let pod = match request.name.as_str() {
        "" => object
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        name => name.to_owned(),
    };
    Ok(ReviewOutcome {
        response: response_json(response.into_review())?,
        decision,
        uid: request.uid,
        namespace: request.namespace.unwrap_or_default(),
        pod,
    })
}

/// Serializes the response review with `patch` as a base64 string.
///
/// The kube-apiserver decodes `patch` as Go `[]byte`, i.e. base64. kube-core 5 declares it as a
/// plain `Vec<u8>`, which serde writes as an array of numbers that the apiserver rejects, so
/// the field is re-encoded here.
pub fn response_json(review: AdmissionReview<DynamicObject>) -> Result<Value, ReviewError> {
    let mut value = serde_json::to_value(&review).map_err(ReviewError::Response)?;
    let patch = review.response.and_then(|r| r.patch);
    if let (Some(bytes), Some(slot)) = (patch, value.pointer_mut("/response/patch")) {
        *slot = Value::String(STANDARD.encode(bytes));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::Ec2Access;
    use serde_json::json;

    fn body(operation: &str, object: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ns",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false
            }
        })
        .to_string()
        .into_bytes()
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "ns",
                "annotations": {"k8s.v1.cni.cncf.io/networks": "ipvlan"}},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]}
        })
    }

    #[test]
    fn create_is_patched_and_echoes_the_envelope() {
        let outcome =
            review(&Config::new("img"), &body("CREATE", pod())).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(outcome.decision, Decision::Inject(_)));
        assert_eq!(outcome.pod, "web-");
        let out = &outcome.response;
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let patch = out["response"]["patch"].as_str().unwrap_or_default();
        let decoded = STANDARD.decode(patch).unwrap_or_default();
        let ops: Vec<Value> = serde_json::from_slice(&decoded).unwrap_or_default();
        // Status and skip-containers annotations, the sidecar, the agent socket volume.
        assert_eq!(ops.len(), 4, "{patch}");
        assert_eq!(ops[2]["path"], "/spec/initContainers");
    }

    #[test]
    fn update_is_allowed_without_patch() {
        let outcome =
            review(&Config::new("img"), &body("UPDATE", pod())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.decision, Decision::Skip(SkipReason::NotCreate));
        assert!(outcome.response["response"].get("patch").is_none());
        assert_eq!(outcome.response["response"]["allowed"], true);
    }

    #[test]
    fn other_kinds_are_skipped() {
        let mut b: Value = serde_json::from_slice(&body("CREATE", pod())).unwrap_or_default();
        b["request"]["kind"]["kind"] = json!("ConfigMap");
        let bytes = b.to_string().into_bytes();
        let outcome = review(&Config::new("img"), &bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.decision, Decision::Skip(SkipReason::NotAPod));
    }

    /// The JSON patch each path answers, through the router as the apiserver calls it.
    async fn patches_by_path(config: Config, paths: &[&str]) -> Vec<Vec<Value>> {
        use crate::handler::{AppState, build_router};
        use crate::metrics::Metrics;
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use std::sync::Arc;
        use tower::ServiceExt;
        let router = build_router(AppState {
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()),
        });
        let mut seen = Vec::new();
        for path in paths {
            let request = Request::post(*path)
                .header("content-type", "application/json")
                .body(Body::from(body("CREATE", pod())))
                .unwrap_or_else(|e| panic!("{e}"));
            let response = router
                .clone()
                .oneshot(request)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY_BYTES)
                .await
                .unwrap_or_default();
            let review: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let patch = STANDARD
                .decode(review["response"]["patch"].as_str().unwrap_or_default())
                .unwrap_or_default();
            seen.push(serde_json::from_slice(&patch).unwrap_or_default());
        }
        seen
    }

    /// The sidecar each path injects.
    async fn sidecars_by_path(config: Config, paths: &[&str]) -> Vec<Value> {
        patches_by_path(config, paths)
            .await
            .into_iter()
            .map(|ops| {
                ops.iter()
                    .find(|op| op["path"] == "/spec/initContainers")
                    .map(|op| op["value"][0].clone())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[tokio::test]
    async fn each_path_injects_its_mode() {
        use crate::handler::{DIRECT_PATH, GATE_PATH};
        let mut config = Config::new("img");
        config.aws_region = Some("eu-west-1".into());
        let seen = sidecars_by_path(config.clone(), &["/mutate", DIRECT_PATH, GATE_PATH]).await;
        let [agent, direct, gate] = [&seen[0], &seen[1], &seen[2]];
        assert_eq!(
            agent["args"][3],
            "--agent-socket=/run/multus-eni/agent.sock"
        );
        assert!(agent["env"].to_string().find("AWS_REGION").is_none());
        assert_eq!(
            agent["command"],
            json!(["/usr/local/bin/multus-eni-sidecar-agent-mode"])
        );
        assert_eq!(
            direct["command"],
            json!(["/usr/local/bin/multus-eni-sidecar"])
        );
        assert_eq!(direct["args"].as_array().map(Vec::len), Some(3));
        assert!(direct["env"].to_string().contains("AWS_REGION"));
        assert!(direct.get("volumeMounts").is_none());
        assert_eq!(
            gate["command"],
            json!(["/usr/local/bin/multus-eni-sidecar-agent-mode"])
        );
        assert_eq!(gate["args"][3], "--agent-url=http://$(HOST_IP):9812");
        assert!(gate.get("volumeMounts").is_none());
        assert!(!gate["env"].to_string().contains("AWS_"));

        // A direct-mode install has no agent to ask: where hostPath is forbidden it injects
        // direct mode, which needs no volume either.
        config.ec2_access = Ec2Access::Direct;
        let seen = sidecars_by_path(config, &["/mutate", GATE_PATH]).await;
        for sidecar in &seen {
            assert_eq!(
                sidecar["command"],
                json!(["/usr/local/bin/multus-eni-sidecar"])
            );
        }
    }

    #[tokio::test]
    async fn every_path_adds_the_image_pull_secrets() {
        use crate::handler::{DIRECT_PATH, GATE_PATH};
        let mut config = Config::new("img");
        config.image_pull_secrets = vec!["private-registry".into()];
        let paths = ["/mutate", GATE_PATH, DIRECT_PATH];
        for (path, ops) in paths.iter().zip(patches_by_path(config, &paths).await) {
            let added: Vec<&Value> = ops
                .iter()
                .filter(|op| op["path"] == "/spec/imagePullSecrets")
                .map(|op| &op["value"])
                .collect();
            assert_eq!(
                added,
                [&json!([{ "name": "private-registry" }])],
                "{path}: {ops:?}"
            );
        }
    }

    #[test]
    fn ignored_overrides_are_admission_warnings() {
        let mut p = pod();
        p["metadata"]["annotations"]["multus-eni.io/probe-port"] = json!("70000");
        let outcome =
            review(&Config::new("img"), &body("CREATE", p)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(outcome.decision, Decision::Inject(_)));
        let warnings = outcome.response["response"]["warnings"].clone();
        assert!(
            warnings[0]
                .as_str()
                .is_some_and(|w| w.contains("multus-eni.io/probe-port")),
            "{warnings}"
        );
        assert!(outcome.response["response"]["patch"].is_string());
    }

    #[test]
    fn bad_bodies_are_errors() {
        let c = Config::new("img");
        assert!(matches!(
            review(&c, b"not json"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            review(
                &c,
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#
            ),
            Err(ReviewError::NoRequest)
        ));
        assert!(matches!(
            review(&c, br#"{"apiVersion":"v1","kind":"Pod"}"#),
            Err(ReviewError::UnsupportedType { .. })
        ));
        assert!(matches!(
            review(&c, b"[1,2]"),
            Err(ReviewError::NotAdmissionReview(_))
        ));
        // The cause is kept for callers that log the chain.
        let err = review(&c, b"{not json");
        assert!(
            err.as_ref()
                .err()
                .and_then(std::error::Error::source)
                .is_some(),
            "{err:?}"
        );
    }
}
