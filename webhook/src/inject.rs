//! The injection decision for one pod and the JSON patch that carries it out.
//!
//! The patch is built as explicit RFC 6902 operations against the pod's raw JSON. The pod is
//! never deserialized into typed structs and written back: that silently drops fields the
//! crate version does not know (e.g. a container's `restartPolicy`).

use crate::networks::{NETWORKS_ANNOTATION, NetworksError, parse_networks};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, MoveOperation, Patch, PatchOperation};
use serde_json::{Map, Value, json};

/// Name of the injected container; also how a pod is recognised as already injected.
pub const SIDECAR_NAME: &str = "multus-eni-sidecar";
/// Path of the sidecar binary in its image (docs/contract.md).
pub const SIDECAR_COMMAND: &str = "/usr/local/bin/multus-eni-sidecar";
/// Pod annotation recording what was injected.
pub const STATUS_ANNOTATION: &str = "multus-eni.io/status";
/// Pod annotation that opts a pod out when set to `"false"`.
pub const INJECT_ANNOTATION: &str = "multus-eni.io/inject";
/// Name of the projected token volume used by `--sidecar-role-arn`.
pub const AWS_TOKEN_VOLUME: &str = "multus-eni-aws-token";
/// Where the sidecar finds its web-identity token when `--sidecar-role-arn` is set.
pub const AWS_TOKEN_DIR: &str = "/var/run/secrets/multus-eni/aws";
/// UID/GID the sidecar runs as (the distroless `nonroot` user).
pub const SIDECAR_UID: i64 = 65532;

/// Where the sidecar goes in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// First init container with `restartPolicy: Always` (Kubernetes native sidecar, 1.29+):
    /// it starts, and its startup probe passes, before any other container.
    Native,
    /// Appended to `containers`, for clusters without native sidecars.
    Legacy,
}

impl SidecarMode {
    /// The value used in flags, logs and the status annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Legacy => "legacy",
        }
    }
}

/// CPU and memory requests/limits of the sidecar, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
}

impl Default for SidecarResources {
    fn default() -> Self {
        SidecarResources {
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: "100m".into(),
            memory_limit: "64Mi".into(),
        }
    }
}

/// What to inject and how; shared by the webhook and the offline `inject` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image of the sidecar container.
    pub sidecar_image: String,
    /// Native (init container) or legacy (regular container) sidecar.
    pub mode: SidecarMode,
    /// Count of Multus default networks, which shifts `net<k>` numbering.
    pub default_networks: u32,
    /// Port of the sidecar's `/readyz` and `/healthz`.
    pub probe_port: u16,
    /// Region passed to the sidecar as `AWS_REGION`; unset lets the SDK use IMDS.
    pub aws_region: Option<String>,
    /// IAM role the sidecar alone assumes via a projected web-identity token (IRSA).
    pub sidecar_role_arn: Option<String>,
    /// Requests and limits of the sidecar container.
    pub resources: SidecarResources,
}

impl Config {
    /// A configuration with the documented defaults and the given sidecar image.
    pub fn new(sidecar_image: impl Into<String>) -> Self {
        Config {
            sidecar_image: sidecar_image.into(),
            mode: SidecarMode::Native,
            default_networks: 0,
            probe_port: 9811,
            aws_region: None,
            sidecar_role_arn: None,
            resources: SidecarResources::default(),
        }
    }
}

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The admitted object is not a Pod.
    NotAPod,
    /// The operation is not CREATE (the sidecar can only be added at creation).
    NotCreate,
    /// `spec.hostNetwork: true`: there are no pod-owned secondary interfaces.
    HostNetwork,
    /// `multus-eni.io/inject: "false"`.
    OptedOut,
    /// A container named `multus-eni-sidecar` is already there (reinvocation or offline inject).
    AlreadyInjected,
    /// No `k8s.v1.cni.cncf.io/networks` annotation.
    NoNetworks,
    /// The annotation is present but selects no network.
    EmptyNetworks,
    /// The annotation could not be parsed; the pod is admitted with a warning.
    MalformedNetworks(NetworksError),
    /// Legacy mode and `restartPolicy` `Never`/`OnFailure`: an appended sidecar never exits,
    /// so the pod (and its Job) would never complete. Admitted with a warning.
    RunToCompletion { restart_policy: String },
}

impl SkipReason {
    /// Stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::NotAPod => "not_a_pod",
            SkipReason::NotCreate => "not_create",
            SkipReason::HostNetwork => "host_network",
            SkipReason::OptedOut => "opted_out",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::NoNetworks => "no_networks",
            SkipReason::EmptyNetworks => "empty_networks",
            SkipReason::MalformedNetworks(_) => "malformed_networks",
            SkipReason::RunToCompletion { .. } => "run_to_completion",
        }
    }

    /// Every label, so metrics can be pre-registered at zero.
    pub const LABELS: [&'static str; 9] = [
        "not_a_pod",
        "not_create",
        "host_network",
        "opted_out",
        "already_injected",
        "no_networks",
        "empty_networks",
        "malformed_networks",
        "run_to_completion",
    ];

    /// The admission warning shown to the user (`kubectl` prints it), if any.
    pub fn warning(&self) -> Option<String> {
        match self {
            SkipReason::MalformedNetworks(err) => Some(format!(
                "multus-eni: sidecar not injected, annotation {NETWORKS_ANNOTATION} is malformed: {err}"
            )),
            SkipReason::RunToCompletion { restart_policy } => Some(format!(
                "multus-eni: sidecar not injected, restartPolicy {restart_policy}: in legacy mode the \
                 sidecar is a regular container that never exits, so the pod would never complete; \
                 native mode (Kubernetes >= 1.29) supports such pods"
            )),
            _ => None,
        }
    }
}

/// A sidecar injection: the patch and what it manages.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// JSON patch against the pod (or pod template) it was computed for.
    pub patch: Patch,
    /// Interfaces the sidecar is told to manage, in annotation order.
    pub interfaces: Vec<String>,
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Inject(Injection),
    /// The sidecar is already there as an init container, but not first: with
    /// `reinvocationPolicy: IfNeeded`, a later webhook put init containers before it. The patch
    /// moves it back to index 0 so nothing runs before the pod's IPs are routable.
    MoveSidecarFirst(Patch),
    Skip(SkipReason),
}

impl Decision {
    /// The JSON patch to send back, if the pod changes.
    pub fn patch(&self) -> Option<&Patch> {
        match self {
            Decision::Inject(injection) => Some(&injection.patch),
            Decision::MoveSidecarFirst(patch) => Some(patch),
            Decision::Skip(_) => None,
        }
    }
}

/// Decides whether a pod (or pod template: `metadata` + `spec`) gets the sidecar, and builds
/// the patch. Pure: no I/O, never panics on input.
pub fn mutate_pod(config: &Config, pod: &Value) -> Decision {
    let Some(pod) = pod.as_object() else {
        return Decision::Skip(SkipReason::NotAPod);
    };
    let annotations = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    let spec = pod.get("spec");

    if annotation(INJECT_ANNOTATION)
        .and_then(Value::as_str)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
    {
        return Decision::Skip(SkipReason::OptedOut);
    }
    if spec
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Decision::Skip(SkipReason::HostNetwork);
    }
    match sidecar_position(spec) {
        Some(SidecarPosition::InitContainer(index)) if index > 0 => {
            return Decision::MoveSidecarFirst(move_sidecar_first(index));
        }
        Some(_) => return Decision::Skip(SkipReason::AlreadyInjected),
        None => {}
    }
    let networks = match annotation(NETWORKS_ANNOTATION) {
        None | Some(Value::Null) => return Decision::Skip(SkipReason::NoNetworks),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Decision::Skip(SkipReason::MalformedNetworks(NetworksError::Json(
                "the annotation value is not a string".into(),
            )));
        }
    };
    let selections = match parse_networks(networks, config.default_networks) {
        Ok(s) if s.is_empty() => return Decision::Skip(SkipReason::EmptyNetworks),
        Ok(s) => s,
        Err(e) => return Decision::Skip(SkipReason::MalformedNetworks(e)),
    };
    if config.mode == SidecarMode::Legacy
        && let Some(policy) = spec
            .and_then(|s| s.get("restartPolicy"))
            .and_then(Value::as_str)
            .filter(|p| matches!(*p, "Never" | "OnFailure"))
    {
        return Decision::Skip(SkipReason::RunToCompletion {
            restart_policy: policy.to_owned(),
        });
    }
    let interfaces: Vec<String> = selections.into_iter().map(|s| s.interface).collect();
    let patch = build_patch(config, pod, spec, annotations.is_some(), &interfaces);
    Decision::Inject(Injection { patch, interfaces })
}

/// Where an already injected sidecar sits.
enum SidecarPosition {
    InitContainer(usize),
    Container,
}

fn sidecar_position(spec: Option<&Value>) -> Option<SidecarPosition> {
    let index_in = |list: &str| {
        spec.and_then(|s| s.get(list))
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .position(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
            })
    };
    index_in("initContainers")
        .map(SidecarPosition::InitContainer)
        .or_else(|| index_in("containers").map(|_| SidecarPosition::Container))
}

/// Moves the init container at `index` (the sidecar) to the front, keeping the others' order.
fn move_sidecar_first(index: usize) -> Patch {
    Patch(vec![PatchOperation::Move(MoveOperation {
        from: pointer(&["spec", "initContainers", &index.to_string()]),
        path: pointer(&["spec", "initContainers", "0"]),
    })])
}

fn build_patch(
    config: &Config,
    pod: &Map<String, Value>,
    spec: Option<&Value>,
    has_annotations: bool,
    interfaces: &[String],
) -> Patch {
    let mut ops = Vec::with_capacity(4);
    let status = status_annotation(config, interfaces);

    // Annotation: add the key, or the map, or the whole metadata; never replace what is there.
    if has_annotations {
        ops.push(add(
            &["metadata", "annotations", STATUS_ANNOTATION],
            Value::String(status),
        ));
    } else if pod.get("metadata").is_some_and(Value::is_object) {
        ops.push(add(
            &["metadata", "annotations"],
            json!({ STATUS_ANNOTATION: status }),
        ));
    } else {
        ops.push(add(
            &["metadata"],
            json!({ "annotations": { STATUS_ANNOTATION: status } }),
        ));
    }

    let spec_exists = spec.is_some_and(Value::is_object);
    let list_exists = |name: &str| spec.and_then(|s| s.get(name)).is_some_and(Value::is_array);
    let mut spec_additions = Map::new();
    let container = sidecar_container(config, interfaces);
    let (list, first) = match config.mode {
        SidecarMode::Native => ("initContainers", "0"),
        SidecarMode::Legacy => ("containers", "-"),
    };
    if list_exists(list) {
        ops.push(add(&["spec", list, first], container));
    } else {
        spec_additions.insert(list.into(), Value::Array(vec![container]));
    }
    if config.sidecar_role_arn.is_some() {
        let volume = aws_token_volume();
        if list_exists("volumes") {
            ops.push(add(&["spec", "volumes", "-"], volume));
        } else {
            spec_additions.insert("volumes".into(), Value::Array(vec![volume]));
        }
    }
    if !spec_additions.is_empty() {
        if spec_exists {
            for (key, value) in spec_additions {
                ops.push(add(&["spec", &key], value));
            }
        } else {
            ops.push(add(&["spec"], Value::Object(spec_additions)));
        }
    }
    Patch(ops)
}

/// A JSON pointer from unescaped tokens (`/` → `~1`, `~` → `~0`).
pub fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

/// The value of `multus-eni.io/status`: compact JSON an operator can read with `jq`.
fn status_annotation(config: &Config, interfaces: &[String]) -> String {
    json!({
        "container": SIDECAR_NAME,
        "image": config.sidecar_image,
        "mode": config.mode.as_str(),
        "interfaces": interfaces,
    })
    .to_string()
}

/// The injected container, exactly as docs/contract.md describes it.
pub fn sidecar_container(config: &Config, interfaces: &[String]) -> Value {
    let port = config.probe_port;
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
    ];
    if let Some(region) = &config.aws_region {
        env.push(json!({ "name": "AWS_REGION", "value": region }));
    }
    let mut container = json!({
        "name": SIDECAR_NAME,
        "image": config.sidecar_image,
        "command": [SIDECAR_COMMAND],
        "args": [
            "run",
            format!("--interfaces={}", interfaces.join(",")),
            format!("--probe-addr=0.0.0.0:{port}"),
        ],
        "resources": {
            "requests": { "cpu": config.resources.cpu_request, "memory": config.resources.memory_request },
            "limits": { "cpu": config.resources.cpu_limit, "memory": config.resources.memory_limit },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "livenessProbe": {
            "httpGet": { "path": "/healthz", "port": port },
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(role_arn) = &config.sidecar_role_arn {
        env.push(json!({ "name": "AWS_ROLE_ARN", "value": role_arn }));
        env.push(json!({
            "name": "AWS_WEB_IDENTITY_TOKEN_FILE",
            "value": format!("{AWS_TOKEN_DIR}/token"),
        }));
        env.push(json!({ "name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional" }));
        container["volumeMounts"] = json!([{
            "name": AWS_TOKEN_VOLUME,
            "mountPath": AWS_TOKEN_DIR,
            "readOnly": true,
        }]);
    }
    container["env"] = Value::Array(env);
    let readyz = json!({
        "httpGet": { "path": "/readyz", "port": port },
        "periodSeconds": 1,
        "failureThreshold": 120,
    });
    match config.mode {
        SidecarMode::Native => {
            // Holds back the other containers until the pod's IPs are on the ENI (≤ 2 min).
            container["restartPolicy"] = json!("Always");
            container["startupProbe"] = readyz;
        }
        SidecarMode::Legacy => {
            container["readinessProbe"] = json!({
                "httpGet": { "path": "/readyz", "port": port },
                "periodSeconds": 5,
            });
        }
    }
    container
}

fn field_env(name: &str, field_path: &str) -> Value {
    json!({
        "name": name,
        "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": field_path } },
    })
}

/// A projected service-account token for STS, mounted only into the sidecar.
fn aws_token_volume() -> Value {
    json!({
        "name": AWS_TOKEN_VOLUME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": "sts.amazonaws.com",
                    "expirationSeconds": 86400,
                    "path": "token",
                }
            }]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new("example.com/multus-eni-sidecar:test")
    }

    fn pod(annotations: Value, spec: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "p", "namespace": "ns", "annotations": annotations },
            "spec": spec,
        })
    }

    fn app_spec() -> Value {
        json!({ "containers": [{ "name": "app", "image": "busybox" }] })
    }

    fn apply(pod: &Value, decision: &Decision) -> Value {
        let Decision::Inject(injection) = decision else {
            panic!("expected an injection, got {decision:?}");
        };
        let mut out = pod.clone();
        json_patch::patch(&mut out, &injection.patch).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn skip(pod: &Value) -> Option<SkipReason> {
        match mutate_pod(&config(), pod) {
            Decision::Skip(reason) => Some(reason),
            Decision::Inject(_) | Decision::MoveSidecarFirst(_) => None,
        }
    }

    #[test]
    fn injects_first_init_container_in_native_mode() {
        let mut spec = app_spec();
        spec["initContainers"] = json!([{ "name": "setup", "image": "busybox" }]);
        let p = pod(json!({ NETWORKS_ANNOTATION: "ipvlan@n3,other" }), spec);
        let out = apply(&p, &mutate_pod(&config(), &p));
        let inits = out["spec"]["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(inits.len(), 2);
        assert_eq!(inits[0]["name"], SIDECAR_NAME);
        assert_eq!(inits[0]["restartPolicy"], "Always");
        assert_eq!(inits[0]["args"][1], "--interfaces=n3,net2");
        assert_eq!(inits[0]["startupProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(inits[1]["name"], "setup");
        assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);
        assert!(out["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
        assert_eq!(
            out["metadata"]["annotations"][NETWORKS_ANNOTATION],
            "ipvlan@n3,other"
        );
    }

    #[test]
    fn appends_to_containers_in_legacy_mode() {
        let config = Config {
            mode: SidecarMode::Legacy,
            ..config()
        };
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), app_spec());
        let out = apply(&p, &mutate_pod(&config, &p));
        assert_eq!(out["spec"]["containers"][0], p["spec"]["containers"][0]);
        assert_eq!(out["spec"]["containers"][1]["name"], SIDECAR_NAME);
        assert!(out["spec"]["containers"][1].get("restartPolicy").is_none());
        assert!(out["spec"].get("initContainers").is_none());
    }

    #[test]
    fn creates_missing_parents_without_clobbering() {
        // No annotations map at all (only possible for templates, but must not break).
        let p = json!({ "metadata": { "name": "p" }, "spec": app_spec() });
        assert_eq!(skip(&p), Some(SkipReason::NoNetworks));

        // Annotations map exists, initContainers does not.
        let p = pod(
            json!({ NETWORKS_ANNOTATION: "a", "keep": "me" }),
            app_spec(),
        );
        let Decision::Inject(injection) = mutate_pod(&config(), &p) else {
            panic!("expected injection");
        };
        let paths: Vec<String> = injection
            .patch
            .0
            .iter()
            .map(|op| op.path().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/multus-eni.io~1status",
                "/spec/initContainers"
            ]
        );
        let out = apply(&p, &Decision::Inject(injection));
        assert_eq!(out["metadata"]["annotations"]["keep"], "me");

        // initContainers: null is treated as missing.
        let mut spec = app_spec();
        spec["initContainers"] = Value::Null;
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        let out = apply(&p, &mutate_pod(&config(), &p));
        assert_eq!(out["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
    }

    #[test]
    fn template_without_metadata_or_spec_gets_both() {
        let mut c = config();
        c.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/multus-eni".into());
        // Nothing to select without metadata, so build the patch directly.
        let patch = build_patch(&c, &Map::new(), None, false, &["net1".into()]);
        let mut out = json!({});
        json_patch::patch(&mut out, &patch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
        assert_eq!(out["spec"]["volumes"][0]["name"], AWS_TOKEN_VOLUME);
        assert!(out["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
    }

    #[test]
    fn role_arn_gives_only_the_sidecar_a_token() {
        let mut c = config();
        c.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/multus-eni".into());
        let mut spec = app_spec();
        spec["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        let out = apply(&p, &mutate_pod(&c, &p));
        assert_eq!(out["spec"]["volumes"][0]["name"], "data");
        assert_eq!(out["spec"]["volumes"][1]["name"], AWS_TOKEN_VOLUME);
        assert_eq!(
            out["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "sts.amazonaws.com"
        );
        let sidecar = &out["spec"]["initContainers"][0];
        let env_names: Vec<&str> = sidecar["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(env_names.contains(&"AWS_ROLE_ARN"));
        assert!(env_names.contains(&"AWS_WEB_IDENTITY_TOKEN_FILE"));
        assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);
    }

    #[test]
    fn region_is_passed_on() {
        let mut c = config();
        c.aws_region = Some("eu-west-1".into());
        let container = sidecar_container(&c, &["net1".into()]);
        assert!(
            container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == "AWS_REGION" && e["value"] == "eu-west-1")
        );
    }

    #[test]
    fn reinvocation_moves_the_sidecar_back_first() {
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), app_spec());
        let mut injected = apply(&p, &mutate_pod(&config(), &p));
        // A later webhook (e.g. a mesh) puts its own init containers in front of ours.
        let inits = injected["spec"]["initContainers"].as_array_mut();
        let Some(inits) = inits else {
            panic!("no initContainers");
        };
        inits.insert(0, json!({ "name": "istio-init", "image": "proxyv2" }));
        inits.push(json!({ "name": "setup", "image": "busybox" }));
        let decision = mutate_pod(&config(), &injected);
        assert!(
            matches!(decision, Decision::MoveSidecarFirst(_)),
            "{decision:?}"
        );
        let mut out = injected.clone();
        json_patch::patch(&mut out, decision.patch().unwrap_or(&Patch(vec![])))
            .unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = out["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, [SIDECAR_NAME, "istio-init", "setup"]);
        // The sidecar is unchanged, only moved; a third call changes nothing.
        assert_eq!(
            out["spec"]["initContainers"][0],
            injected["spec"]["initContainers"][1]
        );
        assert_eq!(skip(&out), Some(SkipReason::AlreadyInjected));
    }

    #[test]
    fn legacy_mode_skips_pods_that_run_to_completion() {
        let legacy = Config {
            mode: SidecarMode::Legacy,
            ..config()
        };
        for policy in ["Never", "OnFailure"] {
            let mut spec = app_spec();
            spec["restartPolicy"] = json!(policy);
            let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
            let Decision::Skip(reason) = mutate_pod(&legacy, &p) else {
                panic!("{policy}: a never-ending container would keep the pod from completing");
            };
            assert_eq!(reason.label(), "run_to_completion");
            let warning = reason.warning().unwrap_or_default();
            assert!(warning.contains(policy), "{warning}");
            // Native sidecars end with the pod: still injected.
            assert_eq!(skip(&p), None, "{policy} in native mode");
        }
        let mut spec = app_spec();
        spec["restartPolicy"] = json!("Always");
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        assert!(matches!(mutate_pod(&legacy, &p), Decision::Inject(_)));
    }

    #[test]
    fn skip_host_network() {
        let mut spec = app_spec();
        spec["hostNetwork"] = json!(true);
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        assert_eq!(skip(&p), Some(SkipReason::HostNetwork));
    }

    #[test]
    fn skip_opt_out() {
        for value in ["false", "False", " false "] {
            let p = pod(
                json!({ NETWORKS_ANNOTATION: "a", INJECT_ANNOTATION: value }),
                app_spec(),
            );
            assert_eq!(skip(&p), Some(SkipReason::OptedOut), "{value:?}");
        }
        let p = pod(
            json!({ NETWORKS_ANNOTATION: "a", INJECT_ANNOTATION: "true" }),
            app_spec(),
        );
        assert_eq!(skip(&p), None);
    }

    #[test]
    fn skip_already_injected_in_either_list() {
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), app_spec());
        let once = apply(&p, &mutate_pod(&config(), &p));
        assert_eq!(skip(&once), Some(SkipReason::AlreadyInjected));
        let legacy = pod(
            json!({ NETWORKS_ANNOTATION: "a" }),
            json!({ "containers": [{ "name": SIDECAR_NAME }] }),
        );
        assert_eq!(skip(&legacy), Some(SkipReason::AlreadyInjected));
    }

    #[test]
    fn skip_without_or_with_empty_annotation() {
        assert_eq!(
            skip(&pod(json!({ "other": "x" }), app_spec())),
            Some(SkipReason::NoNetworks)
        );
        assert_eq!(
            skip(&pod(json!({ NETWORKS_ANNOTATION: " " }), app_spec())),
            Some(SkipReason::EmptyNetworks)
        );
        assert_eq!(
            skip(&pod(json!({ NETWORKS_ANNOTATION: "[]" }), app_spec())),
            Some(SkipReason::EmptyNetworks)
        );
    }

    #[test]
    fn skip_malformed_with_a_warning() {
        let reason = skip(&pod(json!({ NETWORKS_ANNOTATION: "[{" }), app_spec()));
        assert!(matches!(reason, Some(SkipReason::MalformedNetworks(_))));
        let warning = reason.and_then(|r| r.warning()).unwrap_or_default();
        assert!(warning.contains(NETWORKS_ANNOTATION), "{warning}");
        let not_string = skip(&pod(json!({ NETWORKS_ANNOTATION: 5 }), app_spec()));
        assert!(matches!(not_string, Some(SkipReason::MalformedNetworks(_))));
    }

    #[test]
    fn skip_non_objects() {
        assert_eq!(skip(&json!("pod")), Some(SkipReason::NotAPod));
        assert_eq!(skip(&Value::Null), Some(SkipReason::NotAPod));
    }

    #[test]
    fn labels_are_listed() {
        for reason in [
            SkipReason::NotAPod,
            SkipReason::NotCreate,
            SkipReason::HostNetwork,
            SkipReason::OptedOut,
            SkipReason::AlreadyInjected,
            SkipReason::NoNetworks,
            SkipReason::EmptyNetworks,
            SkipReason::MalformedNetworks(NetworksError::EmptyEntry { position: 1 }),
            SkipReason::RunToCompletion {
                restart_policy: "Never".into(),
            },
        ] {
            assert!(SkipReason::LABELS.contains(&reason.label()));
        }
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(
            pointer(&["metadata", "annotations", "multus-eni.io/status"]).as_str(),
            "/metadata/annotations/multus-eni.io~1status"
        );
        assert_eq!(pointer(&["a~b/c"]).as_str(), "/a~0b~1c");
        assert_eq!(
            pointer(&["spec", "containers", "-"]).as_str(),
            "/spec/containers/-"
        );
    }
}
