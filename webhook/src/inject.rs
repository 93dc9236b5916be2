//! The injection decision for one pod and the JSON patch that carries it out.
//!
//! The patch is built as explicit RFC 6902 operations against the pod's raw JSON. The pod is
//! never deserialized into typed structs and written back: that silently drops fields the
//! crate version does not know (e.g. a container's `restartPolicy`).

use crate::networks::{NETWORKS_ANNOTATION, NetworksError, parse_networks};
use crate::qos::{QosClass, pod_qos_class};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, MoveOperation, Patch, PatchOperation};
use serde_json::{Map, Value, json};

/// Name of the injected container; also how a pod is recognised as already injected.
pub const SIDECAR_NAME: &str = "multus-eni-sidecar";
/// Path of the full sidecar binary in its image, which direct mode runs (docs/contract.md).
pub const SIDECAR_COMMAND: &str = "/usr/local/bin/multus-eni-sidecar";
/// Path of the agent-mode-only sidecar binary in the same image, which agent mode runs: it has
/// no AWS SDK, so it is a fraction of the full binary's size and memory, once per pod.
pub const SIDECAR_AGENT_MODE_COMMAND: &str = "/usr/local/bin/multus-eni-sidecar-agent-mode";
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
/// Containers EKS's pod identity webhook (IRSA, Pod Identity) must leave alone: it runs after
/// ours and would otherwise give the sidecar the application's role.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "eks.amazonaws.com/skip-containers";
/// Name of the hostPath volume holding the node agent's socket (agent mode).
pub const AGENT_SOCKET_VOLUME: &str = "multus-eni-agent-socket";
/// File name of the agent's socket inside `--agent-socket-dir`.
pub const AGENT_SOCKET_FILE: &str = "agent.sock";
/// Period of the native sidecar's startup probe; `--sidecar-startup-timeout` is counted in it.
pub const STARTUP_PROBE_PERIOD_SECONDS: u64 = 1;
/// Pod annotation overriding `--sidecar-probe-port` for one pod (an application that already
/// listens on 9811).
pub const PROBE_PORT_ANNOTATION: &str = "multus-eni.io/probe-port";
/// Pod annotation overriding `--sidecar-startup-timeout` for one pod (humantime, e.g. `10m`).
pub const STARTUP_TIMEOUT_ANNOTATION: &str = "multus-eni.io/startup-timeout";
/// Longest startup timeout a pod may ask for: a day of probes is already far past any rollout.
pub const MAX_STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Who calls EC2 for the pod's addresses, and how the sidecar learns they are routable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ec2Access {
    /// The node agent (`multus-eni-agent` DaemonSet) over its Unix socket: the sidecar needs no
    /// AWS credentials and the agent batches the node's calls.
    Agent,
    /// The node agent makes the calls (it watches every pod namespace of its node); the
    /// sidecar only asks it over HTTP on the node's address whether the pod's addresses are
    /// routable: no volume, no credentials, valid under Pod Security `restricted`.
    Gate,
    /// The sidecar calls EC2 itself with credentials from the SDK chain.
    Direct,
}

impl Ec2Access {
    /// The value used in flags, logs and the status annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Ec2Access::Agent => "agent",
            Ec2Access::Gate => "gate",
            Ec2Access::Direct => "direct",
        }
    }

    /// The binary the injected sidecar runs (both are in the `--sidecar-image`).
    pub fn sidecar_command(self) -> &'static str {
        match self {
            Ec2Access::Agent | Ec2Access::Gate => SIDECAR_AGENT_MODE_COMMAND,
            Ec2Access::Direct => SIDECAR_COMMAND,
        }
    }

    /// What to inject where no hostPath volume is allowed (`/mutate/gate`): the gate, or the
    /// configured direct mode when the cluster runs without the agent (nobody to ask).
    pub fn without_host_path(self) -> Self {
        match self {
            Ec2Access::Agent | Ec2Access::Gate => Ec2Access::Gate,
            Ec2Access::Direct => Ec2Access::Direct,
        }
    }
}

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
    /// Requests and limits of the sidecar container (for pods that are not Guaranteed).
    pub resources: SidecarResources,
    /// Node agent or the sidecar itself calls EC2.
    pub ec2_access: Ec2Access,
    /// Host directory of the node agent's socket, mounted read-only into the sidecar (agent mode).
    pub agent_socket_dir: String,
    /// The node agent's plain-HTTP port on the node (its `--metrics-addr`), which the gate asks.
    pub agent_port: u16,
    /// How long the native sidecar's startup probe waits for the addresses to be routable
    /// before the kubelet restarts it (sets the probe's `failureThreshold`).
    pub startup_timeout: std::time::Duration,
    /// Settings passed on to a sidecar that calls EC2 itself; unset keeps the sidecar's default.
    pub direct: DirectSettings,
    /// Secrets added to every injected pod's `imagePullSecrets` (the sidecar image in a private
    /// registry); in every mode, since the sidecar's image is pulled in all of them.
    pub image_pull_secrets: Vec<String>,
}

/// What a direct-mode sidecar is told beyond its interfaces. In agent mode these belong to the
/// agent, so none of them is injected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectSettings {
    /// `--resync-interval` (humantime).
    pub resync_interval: Option<String>,
    /// `--shutdown-timeout` (humantime).
    pub shutdown_timeout: Option<String>,
    /// `--release-on-exit`.
    pub release_on_exit: Option<bool>,
    /// `HTTPS_PROXY` for the SDK's calls to EC2 and STS.
    pub https_proxy: Option<String>,
    /// `NO_PROXY`, e.g. `169.254.169.254` so IMDS is never proxied.
    pub no_proxy: Option<String>,
    /// `AWS_ENDPOINT_URL_EC2`, e.g. an interface VPC endpoint in a private cluster.
    pub ec2_endpoint: Option<String>,
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
            ec2_access: Ec2Access::Agent,
            agent_socket_dir: "/run/multus-eni".into(),
            agent_port: 9812,
            startup_timeout: std::time::Duration::from_secs(300),
            direct: DirectSettings::default(),
            image_pull_secrets: Vec::new(),
        }
    }

    /// The same configuration with another EC2 access (the `/mutate/direct` and
    /// `/mutate/gate` paths).
    pub fn with_ec2_access(&self, ec2_access: Ec2Access) -> Self {
        Config {
            ec2_access,
            ..self.clone()
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
    /// Admission warnings (`kubectl` prints them): per-pod overrides that were ignored.
    pub warnings: Vec<String>,
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
    let (config, warnings) = with_pod_overrides(config, annotations);
    let patch = build_patch(&config, pod, spec, annotations, &interfaces);
    Decision::Inject(Injection {
        patch,
        interfaces,
        warnings,
    })
}

/// The configuration for one pod: the webhook's, with the probe port and startup timeout its
/// annotations ask for. A value that cannot work is ignored with a warning naming it, and the
/// pod is injected with the webhook's value: an override never blocks a pod.
pub fn with_pod_overrides(
    config: &Config,
    annotations: Option<&Map<String, Value>>,
) -> (Config, Vec<String>) {
    let mut config = config.clone();
    let mut warnings = Vec::new();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    if let Some(value) = annotation(PROBE_PORT_ANNOTATION) {
        match value.as_str().map(str::trim).map(str::parse::<u16>) {
            Some(Ok(port)) if port > 0 => config.probe_port = port,
            _ => warnings.push(format!(
                "multus-eni: annotation {PROBE_PORT_ANNOTATION}={value} ignored (want a port \
                 1-65535 as a string); the sidecar's probe uses port {}",
                config.probe_port
            )),
        }
    }
    if let Some(value) = annotation(STARTUP_TIMEOUT_ANNOTATION) {
        match value.as_str().map(|v| humantime::parse_duration(v.trim())) {
            Some(Ok(timeout)) if !timeout.is_zero() && timeout <= MAX_STARTUP_TIMEOUT => {
                config.startup_timeout = timeout;
            }
            _ => warnings.push(format!(
                "multus-eni: annotation {STARTUP_TIMEOUT_ANNOTATION}={value} ignored (want a \
                 duration like \"10m\", above zero and at most 24h); the sidecar's startup \
                 timeout is {}",
                humantime::format_duration(config.startup_timeout)
            )),
        }
    }
    (config, warnings)
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
    annotations: Option<&Map<String, Value>>,
    interfaces: &[String],
) -> Patch {
    let mut ops = Vec::with_capacity(5);
    let qos = pod_qos_class(spec);
    let mut new_annotations = vec![(
        STATUS_ANNOTATION,
        Value::String(status_annotation(config, interfaces, qos)),
    )];
    let existing_skip = annotations
        .and_then(|a| a.get(SKIP_CONTAINERS_ANNOTATION))
        .and_then(Value::as_str);
    if let Some(skip) = skip_containers(existing_skip) {
        new_annotations.push((SKIP_CONTAINERS_ANNOTATION, Value::String(skip)));
    }

    // Annotations: add (or, for a key already there, replace) each key, else add the map, or
    // the whole metadata; never replace the annotations other keys live in.
    if annotations.is_some() {
        for (key, value) in new_annotations {
            ops.push(add(&["metadata", "annotations", key], value));
        }
    } else {
        let map: Map<String, Value> = new_annotations
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        if pod.get("metadata").is_some_and(Value::is_object) {
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        } else {
            ops.push(add(&["metadata"], json!({ "annotations": map })));
        }
    }

    let spec_exists = spec.is_some_and(Value::is_object);
    let list_exists = |name: &str| spec.and_then(|s| s.get(name)).is_some_and(Value::is_array);
    let mut spec_additions = Map::new();
    let container = sidecar_container(config, interfaces, qos);
    let (list, first) = match config.mode {
        SidecarMode::Native => ("initContainers", "0"),
        SidecarMode::Legacy => ("containers", "-"),
    };
    if list_exists(list) {
        ops.push(add(&["spec", list, first], container));
    } else {
        spec_additions.insert(list.into(), Value::Array(vec![container]));
    }
    let volume = match config.ec2_access {
        Ec2Access::Agent => Some(agent_socket_volume(config)),
        Ec2Access::Gate => None,
        Ec2Access::Direct => config.sidecar_role_arn.as_ref().map(|_| aws_token_volume()),
    };
    if let Some(volume) = volume {
        if list_exists("volumes") {
            ops.push(add(&["spec", "volumes", "-"], volume));
        } else {
            spec_additions.insert("volumes".into(), Value::Array(vec![volume]));
        }
    }
    let pull_secrets = missing_pull_secrets(config, spec);
    if !pull_secrets.is_empty() {
        if list_exists("imagePullSecrets") {
            for secret in pull_secrets {
                ops.push(add(&["spec", "imagePullSecrets", "-"], secret));
            }
        } else {
            spec_additions.insert("imagePullSecrets".into(), Value::Array(pull_secrets));
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

/// The `--image-pull-secret` references the pod does not list yet (`{"name": ...}` each): the
/// pod's own pull secrets stay as they are, and a name already there is not added twice.
fn missing_pull_secrets(config: &Config, spec: Option<&Value>) -> Vec<Value> {
    let listed: Vec<&str> = spec
        .and_then(|s| s.get("imagePullSecrets"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    config
        .image_pull_secrets
        .iter()
        .filter(|name| !listed.contains(&name.as_str()))
        .map(|name| json!({ "name": name }))
        .collect()
}

/// The `eks.amazonaws.com/skip-containers` value with the sidecar added to what is there;
/// `None` when the sidecar is already listed.
fn skip_containers(existing: Option<&str>) -> Option<String> {
    let names: Vec<&str> = existing
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.contains(&SIDECAR_NAME) {
        return None;
    }
    Some(
        names
            .into_iter()
            .chain([SIDECAR_NAME])
            .collect::<Vec<_>>()
            .join(","),
    )
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
fn status_annotation(config: &Config, interfaces: &[String], qos: QosClass) -> String {
    json!({
        "container": SIDECAR_NAME,
        "image": config.sidecar_image,
        "mode": config.mode.as_str(),
        "ec2Access": config.ec2_access.as_str(),
        "interfaces": interfaces,
        "qosClass": qos.as_str(),
    })
    .to_string()
}

/// The injected container, exactly as docs/contract.md describes it, for a pod of the given
/// QoS class.
pub fn sidecar_container(config: &Config, interfaces: &[String], qos: QosClass) -> Value {
    let port = config.probe_port;
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
        // The probe listens on the pod IP only (the kubelet probes it there), not on the
        // Multus interfaces' addresses.
        field_env("POD_IP", "status.podIP"),
    ];
    let mut args = vec![
        "run".to_owned(),
        format!("--interfaces={}", interfaces.join(",")),
        format!("--probe-addr=$(POD_IP):{port}"),
    ];
    let mut mounts = Vec::new();
    match config.ec2_access {
        Ec2Access::Gate => {
            // No volume, no AWS settings: the agent's read-only answer on the node's address.
            env.push(field_env("HOST_IP", "status.hostIP"));
            args.push(format!(
                "--agent-url=http://$(HOST_IP):{}",
                config.agent_port
            ));
        }
        Ec2Access::Agent => {
            // No AWS settings at all: the agent holds the credentials.
            args.push(format!("--agent-socket={}", agent_socket_path(config)));
            mounts.push(json!({
                "name": AGENT_SOCKET_VOLUME,
                "mountPath": config.agent_socket_dir,
                "readOnly": true,
            }));
        }
        Ec2Access::Direct => {
            let direct = &config.direct;
            if let Some(interval) = &direct.resync_interval {
                args.push(format!("--resync-interval={interval}"));
            }
            if let Some(timeout) = &direct.shutdown_timeout {
                args.push(format!("--shutdown-timeout={timeout}"));
            }
            if let Some(release) = direct.release_on_exit {
                args.push(format!("--release-on-exit={release}"));
            }
            let plain = [
                ("AWS_REGION", &config.aws_region),
                ("AWS_ENDPOINT_URL_EC2", &direct.ec2_endpoint),
                ("HTTPS_PROXY", &direct.https_proxy),
                ("NO_PROXY", &direct.no_proxy),
            ];
            for (name, value) in plain {
                if let Some(value) = value {
                    env.push(json!({ "name": name, "value": value }));
                }
            }
            if let Some(role_arn) = &config.sidecar_role_arn {
                env.push(json!({ "name": "AWS_ROLE_ARN", "value": role_arn }));
                env.push(json!({
                    "name": "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "value": format!("{AWS_TOKEN_DIR}/token"),
                }));
                mounts.push(json!({
                    "name": AWS_TOKEN_VOLUME,
                    "mountPath": AWS_TOKEN_DIR,
                    "readOnly": true,
                }));
            }
        }
    }
    let mut container = json!({
        "name": SIDECAR_NAME,
        "image": config.sidecar_image,
        "command": [config.ec2_access.sidecar_command()],
        "args": args,
        "env": env,
    });
    if let Some(resources) = sidecar_resources(&config.resources, qos) {
        container["resources"] = resources;
    }
    container["securityContext"] = json!({
        "runAsNonRoot": true,
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    });
    container["livenessProbe"] = json!({
        "httpGet": { "path": "/healthz", "port": port },
        "periodSeconds": 10,
        "failureThreshold": 3,
    });
    container["terminationMessagePolicy"] = json!("FallbackToLogsOnError");
    if !mounts.is_empty() {
        container["volumeMounts"] = Value::Array(mounts);
    }
    match config.mode {
        SidecarMode::Native => {
            // Holds back the other containers until the pod's IPs are routable; the kubelet
            // restarts the sidecar when the budget runs out.
            container["restartPolicy"] = json!("Always");
            container["startupProbe"] = json!({
                "httpGet": { "path": "/readyz", "port": port },
                "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
                "failureThreshold": startup_failure_threshold(config.startup_timeout),
            });
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

/// The sidecar's resources for a pod of this QoS class, chosen so the class stays the same:
/// requests equal to limits in a Guaranteed pod, none in a BestEffort pod, the configured
/// requests and limits otherwise.
fn sidecar_resources(resources: &SidecarResources, qos: QosClass) -> Option<Value> {
    match qos {
        QosClass::Guaranteed => Some(json!({
            "requests": { "cpu": resources.cpu_limit, "memory": resources.memory_limit },
            "limits": { "cpu": resources.cpu_limit, "memory": resources.memory_limit },
        })),
        QosClass::Burstable => Some(json!({
            "requests": { "cpu": resources.cpu_request, "memory": resources.memory_request },
            "limits": { "cpu": resources.cpu_limit, "memory": resources.memory_limit },
        })),
        QosClass::BestEffort => None,
    }
}

/// Startup probe failures allowed within `timeout`, at one probe per period (at least one).
pub fn startup_failure_threshold(timeout: std::time::Duration) -> u64 {
    timeout
        .as_secs()
        .saturating_add(u64::from(timeout.subsec_nanos() > 0))
        .div_ceil(STARTUP_PROBE_PERIOD_SECONDS)
        .max(1)
}

/// Where the sidecar connects to the node agent.
fn agent_socket_path(config: &Config) -> String {
    format!(
        "{}/{AGENT_SOCKET_FILE}",
        config.agent_socket_dir.trim_end_matches('/')
    )
}

/// The agent's socket directory on the node. `Directory`, not `DirectoryOrCreate`: until the
/// agent has created it the kubelet keeps the pod in ContainerCreating with an event that names
/// the path, instead of starting a sidecar that has nobody to talk to.
fn agent_socket_volume(config: &Config) -> Value {
    json!({
        "name": AGENT_SOCKET_VOLUME,
        "hostPath": { "path": config.agent_socket_dir, "type": "Directory" },
    })
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

    fn pull_secret_names(pod: &Value) -> Vec<String> {
        pod["spec"]["imagePullSecrets"]
            .as_array()
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn image_pull_secrets_reach_every_injected_pod_in_every_mode() {
        let mut base = config();
        base.image_pull_secrets = vec!["private-registry".into(), "mirror".into()];
        let p = pod(json!({ NETWORKS_ANNOTATION: "ipvlan" }), app_spec());
        for access in [Ec2Access::Agent, Ec2Access::Gate, Ec2Access::Direct] {
            for mode in [SidecarMode::Native, SidecarMode::Legacy] {
                let mut config = base.with_ec2_access(access);
                config.mode = mode;
                let out = apply(&p, &mutate_pod(&config, &p));
                assert_eq!(
                    pull_secret_names(&out),
                    ["private-registry", "mirror"],
                    "{access:?} {mode:?}"
                );
            }
        }
        // Without the flag nothing is added.
        let out = apply(&p, &mutate_pod(&config(), &p));
        assert!(out["spec"].get("imagePullSecrets").is_none());
    }

    #[test]
    fn image_pull_secrets_keep_the_pods_own_and_never_repeat_one() {
        let mut config = config();
        config.image_pull_secrets = vec!["private-registry".into(), "app-registry".into()];
        let mut spec = app_spec();
        spec["imagePullSecrets"] = json!([{ "name": "app-registry" }]);
        let p = pod(json!({ NETWORKS_ANNOTATION: "ipvlan" }), spec);
        let out = apply(&p, &mutate_pod(&config, &p));
        assert_eq!(
            pull_secret_names(&out),
            ["app-registry", "private-registry"]
        );
        // A template without a spec gets the list with the rest of the spec.
        let bare = json!({ "metadata": { "annotations": { NETWORKS_ANNOTATION: "ipvlan" } } });
        let out = apply(&bare, &mutate_pod(&config, &bare));
        assert_eq!(
            pull_secret_names(&out),
            ["private-registry", "app-registry"]
        );
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
                "/metadata/annotations/eks.amazonaws.com~1skip-containers",
                "/spec/initContainers",
                "/spec/volumes"
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
        c.aws_region = Some("eu-west-1".into());
        c.ec2_access = Ec2Access::Direct;
        let patch = build_patch(&c, &Map::new(), None, None, &["net1".into()]);
        let mut out = json!({});
        json_patch::patch(&mut out, &patch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["spec"]["initContainers"][0]["name"], SIDECAR_NAME);
        assert_eq!(out["spec"]["volumes"][0]["name"], AWS_TOKEN_VOLUME);
        assert!(out["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
    }

    #[test]
    fn role_arn_gives_only_the_sidecar_a_token() {
        let mut c = config();
        c.ec2_access = Ec2Access::Direct;
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
    fn region_is_passed_on_in_direct_mode() {
        let mut c = config();
        c.ec2_access = Ec2Access::Direct;
        c.aws_region = Some("eu-west-1".into());
        let container = sidecar_container(&c, &["net1".into()], QosClass::Burstable);
        assert!(
            container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == "AWS_REGION" && e["value"] == "eu-west-1")
        );
    }

    fn env_names(container: &Value) -> Vec<String> {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect()
    }

    #[test]
    fn agent_mode_mounts_the_socket_read_only_and_injects_no_aws_settings() {
        let mut c = config();
        c.aws_region = Some("eu-west-1".into());
        c.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/multus-eni".into());
        c.direct.https_proxy = Some("http://proxy:3128".into());
        c.direct.resync_interval = Some("10m".into());
        let mut spec = app_spec();
        spec["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        let out = apply(&p, &mutate_pod(&c, &p));
        let sidecar = &out["spec"]["initContainers"][0];
        assert_eq!(
            sidecar["command"],
            json!(["/usr/local/bin/multus-eni-sidecar-agent-mode"])
        );
        assert_eq!(
            sidecar["args"],
            json!([
                "run",
                "--interfaces=net1",
                "--probe-addr=$(POD_IP):9811",
                "--agent-socket=/run/multus-eni/agent.sock"
            ])
        );
        assert_eq!(
            sidecar["volumeMounts"],
            json!([{ "name": AGENT_SOCKET_VOLUME, "mountPath": "/run/multus-eni", "readOnly": true }])
        );
        assert_eq!(
            env_names(sidecar),
            ["POD_NAME", "POD_NAMESPACE", "NODE_NAME", "POD_IP"]
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([
                { "name": "data", "emptyDir": {} },
                { "name": AGENT_SOCKET_VOLUME, "hostPath": { "path": "/run/multus-eni", "type": "Directory" } }
            ])
        );
        // The application containers get neither the volume nor anything else.
        assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);
        let status: Value = serde_json::from_str(
            out["metadata"]["annotations"][STATUS_ANNOTATION]
                .as_str()
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(status["ec2Access"], "agent");
    }

    #[test]
    fn the_gate_asks_the_node_over_http_with_no_volume_and_no_aws_settings() {
        let mut c = config().with_ec2_access(Ec2Access::Gate);
        c.aws_region = Some("eu-west-1".into());
        c.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/multus-eni".into());
        c.agent_port = 19812;
        let mut spec = app_spec();
        spec["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        let out = apply(&p, &mutate_pod(&c, &p));
        let sidecar = &out["spec"]["initContainers"][0];
        assert_eq!(
            sidecar["command"],
            json!(["/usr/local/bin/multus-eni-sidecar-agent-mode"])
        );
        assert_eq!(
            sidecar["args"],
            json!([
                "run",
                "--interfaces=net1",
                "--probe-addr=$(POD_IP):9811",
                "--agent-url=http://$(HOST_IP):19812"
            ])
        );
        assert_eq!(
            env_names(sidecar),
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "NODE_NAME",
                "POD_IP",
                "HOST_IP"
            ]
        );
        assert_eq!(
            sidecar["env"][4]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.hostIP"
        );
        assert!(sidecar.get("volumeMounts").is_none());
        // The pod's volumes are untouched: nothing of the node is mounted.
        assert_eq!(out["spec"]["volumes"], p["spec"]["volumes"]);
        assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);
    }

    #[test]
    fn only_a_direct_install_injects_direct_where_host_path_is_forbidden() {
        assert_eq!(Ec2Access::Agent.without_host_path(), Ec2Access::Gate);
        assert_eq!(Ec2Access::Gate.without_host_path(), Ec2Access::Gate);
        assert_eq!(Ec2Access::Direct.without_host_path(), Ec2Access::Direct);
    }

    #[test]
    fn pod_annotations_override_the_probe_port_and_startup_timeout() {
        let p = pod(
            json!({ NETWORKS_ANNOTATION: "a", PROBE_PORT_ANNOTATION: "9911", STARTUP_TIMEOUT_ANNOTATION: "15m" }),
            app_spec(),
        );
        let Decision::Inject(injection) = mutate_pod(&config(), &p) else {
            panic!("expected an injection");
        };
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
        let out = apply(&p, &Decision::Inject(injection));
        let sidecar = &out["spec"]["initContainers"][0];
        assert_eq!(sidecar["args"][2], "--probe-addr=$(POD_IP):9911");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 9911);
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], 9911);
        assert_eq!(sidecar["startupProbe"]["failureThreshold"], 900);
    }

    #[test]
    fn invalid_overrides_are_ignored_with_a_warning_and_the_pod_injected() {
        for (key, value) in [
            (PROBE_PORT_ANNOTATION, json!("0")),
            (PROBE_PORT_ANNOTATION, json!("65536")),
            (PROBE_PORT_ANNOTATION, json!("http")),
            (PROBE_PORT_ANNOTATION, json!(9911)),
            (STARTUP_TIMEOUT_ANNOTATION, json!("soon")),
            (STARTUP_TIMEOUT_ANNOTATION, json!("0s")),
            (STARTUP_TIMEOUT_ANNOTATION, json!("2d")),
        ] {
            let p = pod(json!({ NETWORKS_ANNOTATION: "a", key: value }), app_spec());
            let Decision::Inject(injection) = mutate_pod(&config(), &p) else {
                panic!("{key}={value}: an override must never block a pod");
            };
            assert_eq!(injection.warnings.len(), 1, "{key}={value}");
            assert!(
                injection.warnings[0].contains(key),
                "{}",
                injection.warnings[0]
            );
            let out = apply(&p, &Decision::Inject(injection));
            let sidecar = &out["spec"]["initContainers"][0];
            assert_eq!(
                sidecar["startupProbe"]["httpGet"]["port"], 9811,
                "{key}={value}"
            );
            assert_eq!(
                sidecar["startupProbe"]["failureThreshold"], 300,
                "{key}={value}"
            );
        }
    }

    #[test]
    fn agent_socket_dir_is_configurable() {
        let mut c = config();
        c.agent_socket_dir = "/var/run/multus-eni/".into();
        let container = sidecar_container(&c, &["net1".into()], QosClass::Burstable);
        assert_eq!(
            container["args"][3],
            "--agent-socket=/var/run/multus-eni/agent.sock"
        );
    }

    #[test]
    fn direct_mode_passes_the_sidecar_knobs_on() {
        let mut c = config();
        c.ec2_access = Ec2Access::Direct;
        c.direct = DirectSettings {
            resync_interval: Some("10m".into()),
            shutdown_timeout: Some("20s".into()),
            release_on_exit: Some(false),
            https_proxy: Some("http://proxy.internal:3128".into()),
            no_proxy: Some("169.254.169.254".into()),
            ec2_endpoint: Some("https://vpce-1.ec2.eu-west-1.vpce.amazonaws.com".into()),
        };
        let container = sidecar_container(&c, &["net1".into()], QosClass::Burstable);
        // The full binary: the agent-mode one refuses to start without --agent-socket.
        assert_eq!(
            container["command"],
            json!(["/usr/local/bin/multus-eni-sidecar"])
        );
        assert_eq!(
            container["args"],
            json!([
                "run",
                "--interfaces=net1",
                "--probe-addr=$(POD_IP):9811",
                "--resync-interval=10m",
                "--shutdown-timeout=20s",
                "--release-on-exit=false"
            ])
        );
        let env = &container["env"];
        assert_eq!(
            env[4],
            json!({ "name": "AWS_ENDPOINT_URL_EC2", "value": "https://vpce-1.ec2.eu-west-1.vpce.amazonaws.com" })
        );
        assert_eq!(
            env[5],
            json!({ "name": "HTTPS_PROXY", "value": "http://proxy.internal:3128" })
        );
        assert_eq!(
            env[6],
            json!({ "name": "NO_PROXY", "value": "169.254.169.254" })
        );
        assert!(container.get("volumeMounts").is_none());
        // Unset knobs keep the sidecar's own defaults: nothing is passed.
        c.direct = DirectSettings::default();
        let container = sidecar_container(&c, &["net1".into()], QosClass::Burstable);
        assert_eq!(container["args"].as_array().map(Vec::len), Some(3));
        assert_eq!(env_names(&container).len(), 4);
    }

    #[test]
    fn each_mode_runs_its_binary_and_only_agent_mode_passes_the_socket() {
        for (access, command) in [
            (Ec2Access::Agent, SIDECAR_AGENT_MODE_COMMAND),
            (Ec2Access::Direct, SIDECAR_COMMAND),
        ] {
            for mode in [SidecarMode::Native, SidecarMode::Legacy] {
                let mut c = config().with_ec2_access(access);
                c.mode = mode;
                let container = sidecar_container(&c, &["net1".into()], QosClass::BestEffort);
                assert_eq!(
                    container["command"],
                    json!([command]),
                    "{access:?} {mode:?}"
                );
                // The agent-mode binary without --agent-socket would refuse to start.
                let has_socket = container["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a.as_str().is_some_and(|a| a.starts_with("--agent-socket=")));
                assert_eq!(has_socket, command == SIDECAR_AGENT_MODE_COMMAND);
            }
        }
        assert_ne!(SIDECAR_COMMAND, SIDECAR_AGENT_MODE_COMMAND);
    }

    #[test]
    fn with_ec2_access_changes_only_the_access() {
        let c = config();
        let direct = c.with_ec2_access(Ec2Access::Direct);
        assert_eq!(direct.ec2_access, Ec2Access::Direct);
        assert_eq!(direct.with_ec2_access(Ec2Access::Agent), c);
    }

    fn resources_of(container: &Value) -> Value {
        container["resources"].clone()
    }

    #[test]
    fn sidecar_keeps_the_qos_class_of_the_pod() {
        let limits_only = json!({ "limits": { "cpu": "2", "memory": "1Gi" } });
        for (app_resources, expected) in [
            (limits_only.clone(), QosClass::Guaranteed),
            (
                json!({ "requests": { "cpu": "2", "memory": "1Gi" }, "limits": { "cpu": "2", "memory": "1Gi" } }),
                QosClass::Guaranteed,
            ),
            (json!({ "requests": { "cpu": "1" } }), QosClass::Burstable),
            (json!({}), QosClass::BestEffort),
        ] {
            let spec = json!({ "containers": [{ "name": "app", "image": "i", "resources": app_resources }] });
            assert_eq!(crate::qos::pod_qos_class(Some(&spec)), expected);
            let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
            let out = apply(&p, &mutate_pod(&config(), &p));
            assert_eq!(
                crate::qos::pod_qos_class(Some(&out["spec"])),
                expected,
                "{app_resources}"
            );
            let status: Value = serde_json::from_str(
                out["metadata"]["annotations"][STATUS_ANNOTATION]
                    .as_str()
                    .unwrap_or_default(),
            )
            .unwrap_or_default();
            assert_eq!(status["qosClass"], expected.as_str());
        }
        let sidecar = |qos| resources_of(&sidecar_container(&config(), &["net1".into()], qos));
        assert_eq!(
            sidecar(QosClass::Guaranteed),
            json!({ "requests": { "cpu": "100m", "memory": "64Mi" }, "limits": { "cpu": "100m", "memory": "64Mi" } })
        );
        assert_eq!(
            sidecar(QosClass::Burstable),
            json!({ "requests": { "cpu": "10m", "memory": "16Mi" }, "limits": { "cpu": "100m", "memory": "64Mi" } })
        );
        assert_eq!(sidecar(QosClass::BestEffort), Value::Null);
    }

    #[test]
    fn a_guaranteed_pod_with_a_burstable_init_container_stays_burstable_with_todays_sidecar() {
        let spec = json!({
            "initContainers": [{ "name": "setup", "image": "i", "resources": { "requests": { "cpu": "10m" } } }],
            "containers": [{ "name": "app", "image": "i", "resources": { "limits": { "cpu": "1", "memory": "1Gi" } } }],
        });
        let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), spec);
        let out = apply(&p, &mutate_pod(&config(), &p));
        assert_eq!(
            out["spec"]["initContainers"][0]["resources"]["requests"]["cpu"],
            "10m"
        );
    }

    #[test]
    fn skip_containers_annotation_gets_the_sidecar_merged_in() {
        assert_eq!(skip_containers(None).as_deref(), Some(SIDECAR_NAME));
        assert_eq!(
            skip_containers(Some("istio-proxy, init")).as_deref(),
            Some("istio-proxy,init,multus-eni-sidecar")
        );
        assert_eq!(skip_containers(Some("init,multus-eni-sidecar")), None);
        assert_eq!(skip_containers(Some(" ")).as_deref(), Some(SIDECAR_NAME));

        for access in [Ec2Access::Agent, Ec2Access::Direct] {
            let c = config().with_ec2_access(access);
            let p = pod(
                json!({ NETWORKS_ANNOTATION: "a", SKIP_CONTAINERS_ANNOTATION: "log-shipper" }),
                app_spec(),
            );
            let out = apply(&p, &mutate_pod(&c, &p));
            assert_eq!(
                out["metadata"]["annotations"][SKIP_CONTAINERS_ANNOTATION],
                "log-shipper,multus-eni-sidecar"
            );
            let p = pod(json!({ NETWORKS_ANNOTATION: "a" }), app_spec());
            let out = apply(&p, &mutate_pod(&c, &p));
            assert_eq!(
                out["metadata"]["annotations"][SKIP_CONTAINERS_ANNOTATION],
                SIDECAR_NAME
            );
        }
        // A pod template without annotations gets both keys in the new map.
        let patch = build_patch(&config(), &Map::new(), None, None, &["net1".into()]);
        let mut out = json!({});
        json_patch::patch(&mut out, &patch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out["metadata"]["annotations"][SKIP_CONTAINERS_ANNOTATION],
            SIDECAR_NAME
        );
    }

    #[test]
    fn startup_timeout_sets_the_failure_threshold() {
        use std::time::Duration;
        assert_eq!(startup_failure_threshold(Duration::from_secs(300)), 300);
        assert_eq!(startup_failure_threshold(Duration::from_millis(1500)), 2);
        assert_eq!(startup_failure_threshold(Duration::ZERO), 1);
        let mut c = config();
        c.startup_timeout = Duration::from_secs(900);
        let container = sidecar_container(&c, &["net1".into()], QosClass::Burstable);
        assert_eq!(container["startupProbe"]["failureThreshold"], 900);
        assert_eq!(container["startupProbe"]["periodSeconds"], 1);
        assert_eq!(
            sidecar_container(&config(), &["net1".into()], QosClass::Burstable)["startupProbe"]["failureThreshold"],
            300
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
