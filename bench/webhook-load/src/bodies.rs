//! What is sent: AdmissionReviews for real fixture pods, pods without Multus, and bad bodies
//! (not JSON, truncated, huge, wrong kind, no request, ...). The expected answer of each body
//! is computed in-process with the webhook's own library, so a wrong answer from the server
//! process (lost patch, wrong status) is counted, not just 5xx.

use crate::server::SIDECAR_IMAGE;
use crate::{Error, Result};
use hyper::body::Bytes;
use multus_eni_webhook::admission::MAX_BODY_BYTES;
use multus_eni_webhook::{Config, review};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;

/// The classes of request body, as reported in the sustained-load table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// A fixture pod with the Multus annotation, CREATE.
    MultusPod,
    /// A fixture pod without the annotation, CREATE.
    PlainPod,
    /// A Multus pod, UPDATE (allowed, never patched).
    Update,
    /// A ConfigMap review (allowed, not a pod).
    NotAPod,
    /// A pod whose annotation does not parse (allowed with a warning).
    MalformedAnnotation,
    /// A 1.5 MiB pod (big annotation), under the apiserver limit.
    Large,
    /// Not JSON at all.
    NotJson,
    /// A valid review cut short.
    Truncated,
    /// JSON, but `kind`/`apiVersion` is not an AdmissionReview.
    WrongKind,
    /// An AdmissionReview without `request`.
    NoRequest,
    /// An empty body.
    Empty,
    /// `[[[[…` deep enough to hit any recursion limit.
    DeepNesting,
    /// Random bytes.
    RandomBytes,
    /// Over the apiserver's 3 MiB request limit.
    Huge,
}

impl Class {
    /// Short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Class::MultusPod => "multus-pod",
            Class::PlainPod => "plain-pod",
            Class::Update => "update",
            Class::NotAPod => "not-a-pod",
            Class::MalformedAnnotation => "malformed-annotation",
            Class::Large => "large-1.5MiB",
            Class::NotJson => "not-json",
            Class::Truncated => "truncated",
            Class::WrongKind => "wrong-kind",
            Class::NoRequest => "no-request",
            Class::Empty => "empty",
            Class::DeepNesting => "deep-nesting",
            Class::RandomBytes => "random-bytes",
            Class::Huge => "huge-3.5MiB",
        }
    }
}

/// What the server must answer for a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// HTTP status.
    pub status: u16,
    /// `request.uid` to be echoed (200 only).
    pub uid: Option<String>,
    /// Whether the response carries a patch (200 only).
    pub patched: bool,
}

/// One prepared request body.
#[derive(Debug, Clone)]
pub struct Body {
    pub class: Class,
    pub bytes: Bytes,
    pub expected: Expected,
}

/// Pods taken from the fixture files.
#[derive(Debug, Clone, Default)]
pub struct Fixtures {
    /// Pods with a Multus networks annotation.
    pub multus: Vec<Value>,
    /// Pods without it.
    pub plain: Vec<Value>,
}

/// Reads every pod in `dir` (JSON or YAML; Pods, AdmissionReviews of Pods, and the pod
/// templates of workloads). Falls back to built-in pods when the directory has none.
pub fn load_fixtures(dir: &Path) -> Result<Fixtures> {
    let mut fixtures = Fixtures::default();
    let mut files = Vec::new();
    collect_files(dir, &mut files);
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Fixture {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            // Files that are not Kubernetes objects (goldens, patches) are skipped.
            let Ok(value) = Value::deserialize(document) else {
                continue;
            };
            for pod in pods_in(&value) {
                let annotated = pod
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(multus_eni_webhook::networks::NETWORKS_ANNOTATION))
                    .is_some();
                if annotated {
                    fixtures.multus.push(pod);
                } else {
                    fixtures.plain.push(pod);
                }
            }
        }
    }
    if fixtures.multus.is_empty() {
        fixtures.multus = builtin_multus_pods();
    }
    if fixtures.plain.is_empty() {
        fixtures.plain = vec![builtin_plain_pod()];
    }
    Ok(fixtures)
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "json" | "yaml" | "yml"))
        {
            out.push(path);
        }
    }
}

/// The pods a Kubernetes object carries.
fn pods_in(value: &Value) -> Vec<Value> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let template = |pointer: &str| {
        value.pointer(pointer).map(|t| {
            let mut pod = t.clone();
            pod["apiVersion"] = json!("v1");
            pod["kind"] = json!("Pod");
            pod
        })
    };
    match kind {
        "Pod" if value.get("spec").is_some() => vec![value.clone()],
        "AdmissionReview" => value
            .pointer("/request/object")
            .filter(|o| o.get("kind").and_then(Value::as_str) == Some("Pod"))
            .cloned()
            .into_iter()
            .collect(),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            template("/spec/template").into_iter().collect()
        }
        "CronJob" => template("/spec/jobTemplate/spec/template")
            .into_iter()
            .collect(),
        "List" => value
            .get("items")
            .and_then(Value::as_array)
            .map(|items| items.iter().flat_map(pods_in).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn builtin_multus_pods() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "free5gc-upf-6d8b5c9f7-", "namespace": "free5gc",
                "labels": {"app.kubernetes.io/name": "free5gc-upf", "nf": "upf"},
                "annotations": {"k8s.v1.cni.cncf.io/networks":
                    "[{\"name\":\"n3network-free5gc-free5gc-upf\",\"interface\":\"n3\",\"ips\":[\"10.100.50.233/29\"]},{\"name\":\"n6network-free5gc-free5gc-upf\",\"interface\":\"n6\",\"ips\":[\"10.100.100.12/24\"]},{\"name\":\"n4network-free5gc-free5gc-upf\",\"interface\":\"n4\",\"ips\":[\"10.100.50.241/29\"]}]"}},
            "spec": {
                "containers": [{"name": "upf", "image": "towards5gs/free5gc-upf:v3.2.0",
                    "command": ["/free5gc/config//wrapper.sh"],
                    "resources": {"limits": {"cpu": "150m", "memory": "128Mi"}, "requests": {"cpu": "150m", "memory": "128Mi"}},
                    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
                    "volumeMounts": [{"name": "upf-volume", "mountPath": "/free5gc/config/"}]}],
                "volumes": [{"name": "upf-volume", "projected": {"sources": [{"configMap": {"name": "free5gc-upf-configmap"}}]}}],
                "restartPolicy": "Always"
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "busybox-deployment-5d4f8b7c9-", "namespace": "default",
                "labels": {"app": "busybox"},
                "annotations": {"k8s.v1.cni.cncf.io/networks": "ipvlan-multus-1, ipvlan-multus-2"}},
            "spec": {"containers": [{"name": "busybox", "image": "busybox",
                "command": ["sleep", "36000"], "imagePullPolicy": "IfNotPresent"}]}
        }),
    ]
}

fn builtin_plain_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "nginx-7c5ddbdf54-", "namespace": "default", "labels": {"app": "nginx"}},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}
    })
}

/// An AdmissionReview as the kube-apiserver sends it.
pub fn admission_review(uid: &str, operation: &str, object: &Value) -> Value {
    let (kind, resource) = match object.get("kind").and_then(Value::as_str) {
        Some("Pod") | None => ("Pod", "pods"),
        Some(other) => (other, "configmaps"),
    };
    let namespace = object
        .pointer("/metadata/namespace")
        .cloned()
        .unwrap_or(json!("default"));
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "7f1b2a9e-8e0c-4b7e-9d55-2b0f0a3f4c11",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
            "object": object,
            "oldObject": if operation == "UPDATE" { object.clone() } else { Value::Null },
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": if operation == "UPDATE" { "UpdateOptions" } else { "CreateOptions" }}
        }
    })
}

/// The bodies one run cycles through, with their weights.
pub struct Mix {
    bodies: Vec<Body>,
    /// Cumulative weights, parallel to `bodies`.
    cumulative: Vec<u32>,
}

/// Variants per class, so uids and garbage differ between requests.
const VARIANTS: usize = 16;

impl Mix {
    /// Only what a real cluster sends: fixture pods with and without Multus (the benchmark).
    pub fn admissions(fixtures: &Fixtures, seed: u64) -> Mix {
        let mut builder = MixBuilder::new(seed);
        builder.valid(Class::MultusPod, 80, fixtures);
        builder.valid(Class::PlainPod, 20, fixtures);
        builder.finish()
    }

    /// Real pods mixed with bad input (the sustained-load run).
    pub fn with_bad_input(fixtures: &Fixtures, seed: u64) -> Mix {
        let mut b = MixBuilder::new(seed);
        b.valid(Class::MultusPod, 500, fixtures);
        b.valid(Class::PlainPod, 150, fixtures);
        b.valid(Class::Update, 50, fixtures);
        b.valid(Class::NotAPod, 30, fixtures);
        b.valid(Class::MalformedAnnotation, 50, fixtures);
        b.valid(Class::Large, 5, fixtures);
        for (class, weight) in [
            (Class::NotJson, 40),
            (Class::Truncated, 50),
            (Class::WrongKind, 40),
            (Class::NoRequest, 30),
            (Class::Empty, 20),
            (Class::DeepNesting, 15),
            (Class::RandomBytes, 25),
            (Class::Huge, 5),
        ] {
            b.garbage(class, weight, fixtures);
        }
        b.finish()
    }

    /// A body drawn by weight.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> &Body {
        let total = self.cumulative.last().copied().unwrap_or(1).max(1);
        let draw = rng.u32(0..total);
        let index = self.cumulative.partition_point(|c| *c <= draw);
        &self.bodies[index.min(self.bodies.len() - 1)]
    }

    /// Every prepared body (for seeding fuzz corpora and tests).
    pub fn bodies(&self) -> &[Body] {
        &self.bodies
    }
}

struct MixBuilder {
    rng: fastrand::Rng,
    config: Config,
    bodies: Vec<Body>,
    cumulative: Vec<u32>,
    total: u32,
}

impl MixBuilder {
    fn new(seed: u64) -> Self {
        MixBuilder {
            rng: fastrand::Rng::with_seed(seed),
            config: Config::new(SIDECAR_IMAGE),
            bodies: Vec::new(),
            cumulative: Vec::new(),
            total: 0,
        }
    }

    fn uid(&mut self) -> String {
        let r = &mut self.rng;
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            r.u32(..),
            r.u16(..),
            r.u16(..0x1000),
            r.u16(..0x1000),
            r.u64(..1 << 48)
        )
    }

    /// Adds `VARIANTS` bodies of a class that is a well-formed AdmissionReview.
    fn valid(&mut self, class: Class, weight: u32, fixtures: &Fixtures) {
        for i in 0..VARIANTS {
            let uid = self.uid();
            let review = match class {
                Class::MultusPod => {
                    admission_review(&uid, "CREATE", &fixtures.multus[i % fixtures.multus.len()])
                }
                Class::PlainPod => {
                    admission_review(&uid, "CREATE", &fixtures.plain[i % fixtures.plain.len()])
                }
                Class::Update => {
                    admission_review(&uid, "UPDATE", &fixtures.multus[i % fixtures.multus.len()])
                }
                Class::NotAPod => admission_review(
                    &uid,
                    "CREATE",
                    &json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "cm", "namespace": "default"}, "data": {"k": "v"}}),
                ),
                Class::MalformedAnnotation => {
                    let mut pod = fixtures.multus[i % fixtures.multus.len()].clone();
                    let bad = [
                        "[{\"name\":",
                        "a,,b",
                        "UPPER/case",
                        "a@b@c",
                        "[{\"interface\":\"n3\"}]",
                    ];
                    pod["metadata"]["annotations"]
                        [multus_eni_webhook::networks::NETWORKS_ANNOTATION] =
                        json!(bad[i % bad.len()]);
                    admission_review(&uid, "CREATE", &pod)
                }
                Class::Large => {
                    let mut pod = fixtures.multus[i % fixtures.multus.len()].clone();
                    pod["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
                        json!("x".repeat(1536 * 1024));
                    admission_review(&uid, "CREATE", &pod)
                }
                _ => continue,
            };
            let bytes = Bytes::from(review.to_string());
            self.push(class, weight, bytes);
        }
    }

    /// Adds `VARIANTS` bad bodies of a class.
    fn garbage(&mut self, class: Class, weight: u32, fixtures: &Fixtures) {
        for i in 0..VARIANTS {
            let uid = self.uid();
            let valid =
                admission_review(&uid, "CREATE", &fixtures.multus[i % fixtures.multus.len()])
                    .to_string();
            let bytes: Vec<u8> = match class {
                Class::NotJson => {
                    let samples: [&[u8]; 4] = [
                        b"hello",
                        b"<AdmissionReview/>",
                        b"apiVersion: admission.k8s.io/v1\nkind: AdmissionReview\n",
                        b"{'single': 'quotes'}",
                    ];
                    samples[i % samples.len()].to_vec()
                }
                Class::Truncated => {
                    let cut = self.rng.usize(1..valid.len());
                    valid.as_bytes()[..cut].to_vec()
                }
                Class::WrongKind => {
                    let mut v: Value = serde_json::from_str(&valid).unwrap_or_default();
                    match i % 3 {
                        0 => v["kind"] = json!("Pod"),
                        1 => v["apiVersion"] = json!("admission.k8s.io/v2"),
                        _ => v = json!([v]),
                    }
                    v.to_string().into_bytes()
                }
                Class::NoRequest => {
                    let mut v: Value = serde_json::from_str(&valid).unwrap_or_default();
                    match i % 3 {
                        0 => v["request"] = Value::Null,
                        1 => {
                            if let Some(o) = v.as_object_mut() {
                                o.remove("request");
                            }
                        }
                        _ => v["request"] = json!("not an object"),
                    }
                    v.to_string().into_bytes()
                }
                Class::Empty => Vec::new(),
                Class::DeepNesting => {
                    let depth = 10_000 + i * 1000;
                    let mut s = "[".repeat(depth);
                    s.push_str(&"]".repeat(depth));
                    s.into_bytes()
                }
                Class::RandomBytes => (0..512).map(|_| self.rng.u8(..)).collect(),
                Class::Huge => {
                    let mut v: Value = serde_json::from_str(&valid).unwrap_or_default();
                    v["request"]["object"]["metadata"]["annotations"]["blob"] =
                        json!("x".repeat(MAX_BODY_BYTES + 512 * 1024));
                    v.to_string().into_bytes()
                }
                _ => continue,
            };
            self.push(class, weight, Bytes::from(bytes));
        }
    }

    fn push(&mut self, class: Class, weight: u32, bytes: Bytes) {
        let expected = expected_answer(&self.config, &bytes);
        self.total += weight;
        self.cumulative.push(self.total);
        self.bodies.push(Body {
            class,
            bytes,
            expected,
        });
    }

    fn finish(self) -> Mix {
        Mix {
            bodies: self.bodies,
            cumulative: self.cumulative,
        }
    }
}

/// What the webhook's library says the answer to `body` is.
pub fn expected_answer(config: &Config, body: &[u8]) -> Expected {
    if body.len() > MAX_BODY_BYTES {
        return Expected {
            status: 413,
            uid: None,
            patched: false,
        };
    }
    match review(config, body) {
        Ok(outcome) => Expected {
            status: 200,
            uid: Some(outcome.uid),
            patched: outcome.decision.patch().is_some(),
        },
        Err(_) => Expected {
            status: 400,
            uid: None,
            patched: false,
        },
    }
}
