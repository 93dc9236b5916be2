//! Property tests of the injection (issue 5): for any annotation Multus would accept, on any
//! shape of pod, the patch applies cleanly, injects exactly one sidecar, leaves the
//! application's containers byte-identical, and re-running on the result adds nothing. And the
//! annotation parser never panics, whatever the string.
//!
//! The expected interface names come from a small model of Multus's rule written here, not
//! from the code under test. Case counts are kept moderate so this runs in seconds in debug.

use base64::Engine;
use multus_eni_webhook::inject::{INJECT_ANNOTATION, SIDECAR_NAME, STATUS_ANNOTATION};
use multus_eni_webhook::networks::NETWORKS_ANNOTATION;
use multus_eni_webhook::{
    Config, Decision, NetworksError, SidecarMode, SkipReason, mutate_pod, parse_networks, review,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

// === the annotation model ===

/// One generated attachment, before it is written in either form.
#[derive(Debug, Clone)]
struct Attachment {
    namespace: Option<String>,
    name: String,
    interface: Option<String>,
    ips: Vec<String>,
    mac: Option<String>,
}

/// How the attachments are written into the annotation.
#[derive(Debug, Clone)]
enum Form {
    /// `[ns/]name[@ifname]`, with the given padding around entries and parts.
    Comma { pad_entry: String, pad_part: String },
    /// The JSON list, compact or pretty, optionally with keys Multus knows but we ignore.
    /// Go's `encoding/json` matches keys case-insensitively (`key_case`: which letters are
    /// upper case), Multus reads `interfaceRequest` when `interface` is empty, and JSON names
    /// may be DNS subdomains (`dotted`).
    Json {
        pretty: bool,
        extra_keys: bool,
        key_case: u64,
        deprecated_interface: bool,
        dotted: bool,
    },
}

/// `key` with the letters whose bit is set in `mask` upper-cased.
fn spell(key: &str, mask: u64) -> String {
    key.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask & (1 << (i % 64)) != 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([-a-z0-9]{0,12}[a-z0-9])?"
}

/// Interface names the kernel accepts (1-15 bytes, no '/', ':', ',' or whitespace).
fn interface_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "(n|eth|net|ens)[0-9]{1,2}",
        "[a-zA-Z0-9_.\\-]{1,15}".prop_filter("not . or ..", |s| s != "." && s != ".."),
    ]
}

fn attachment() -> impl Strategy<Value = Attachment> {
    (
        prop::option::of(dns_label()),
        dns_label(),
        prop::option::weighted(0.4, interface_name()),
        prop::collection::vec("10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}/(24|29)", 0..2),
        prop::option::weighted(0.2, "02(:[0-9a-f]{2}){5}"),
    )
        .prop_map(|(namespace, name, interface, ips, mac)| Attachment {
            namespace,
            name,
            interface,
            ips,
            mac,
        })
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        (
            prop::sample::select(vec!["", " ", "  ", "\t"]),
            prop::sample::select(vec!["", " "])
        )
            .prop_map(|(e, p)| Form::Comma {
                pad_entry: e.into(),
                pad_part: p.into(),
            }),
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![Just(0u64), any::<u64>()],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(pretty, extra_keys, key_case, deprecated_interface, dotted)| Form::Json {
                    pretty,
                    extra_keys,
                    key_case,
                    deprecated_interface,
                    dotted,
                }
            ),
    ]
}

/// Writes the attachments as Multus accepts them. The comma form has no ips or mac.
fn render(attachments: &[Attachment], form: &Form) -> String {
    match form {
        Form::Comma {
            pad_entry,
            pad_part,
        } => attachments
            .iter()
            .map(|a| {
                let mut entry = String::new();
                if let Some(ns) = &a.namespace {
                    entry.push_str(&format!("{ns}{pad_part}/{pad_part}"));
                }
                entry.push_str(&a.name);
                if let Some(ifname) = &a.interface {
                    entry.push_str(&format!("{pad_part}@{pad_part}{ifname}"));
                }
                format!("{pad_entry}{entry}{pad_entry}")
            })
            .collect::<Vec<_>>()
            .join(","),
        Form::Json {
            pretty,
            extra_keys,
            key_case,
            deprecated_interface,
            dotted,
        } => {
            let key = |k: &str| spell(k, *key_case);
            let list: Vec<Value> = attachments
                .iter()
                .map(|a| {
                    let mut o = Map::new();
                    let name = if *dotted {
                        format!("{}.nets.example", a.name)
                    } else {
                        a.name.clone()
                    };
                    o.insert(key("name"), json!(name));
                    if let Some(ns) = &a.namespace {
                        o.insert(key("namespace"), json!(ns));
                    }
                    if let Some(i) = &a.interface {
                        if *deprecated_interface {
                            o.insert(key("interface"), json!(""));
                            o.insert(key("interfaceRequest"), json!(i));
                        } else {
                            o.insert(key("interface"), json!(i));
                        }
                    }
                    if !a.ips.is_empty() {
                        o.insert(key("ips"), json!(a.ips));
                    }
                    if let Some(m) = &a.mac {
                        o.insert(key("mac"), json!(m));
                    }
                    if *extra_keys {
                        o.insert("default-route".into(), json!(["10.0.0.1"]));
                        o.insert("cni-args".into(), json!({"k": "v"}));
                    }
                    Value::Object(o)
                })
                .collect();
            let list = Value::Array(list);
            if *pretty {
                serde_json::to_string_pretty(&list).unwrap_or_default()
            } else {
                list.to_string()
            }
        }
    }
}

/// Multus's naming rule: the entry's own name, else `net<position + default networks>`.
/// `None` when two entries end up with one name (the parser must refuse those).
fn expected_interfaces(attachments: &[Attachment], default_networks: u32) -> Option<Vec<String>> {
    let names: Vec<String> = attachments
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.interface
                .clone()
                .unwrap_or_else(|| format!("net{}", i as u64 + 1 + u64::from(default_networks)))
        })
        .collect();
    let unique: BTreeSet<&String> = names.iter().collect();
    (unique.len() == names.len()).then_some(names)
}

// === the pod generator ===

/// Container names an operator would not expect: escapes, slashes, unicode, near-misses.
fn odd_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][-a-z0-9]{0,20}",
        Just("a/b".to_owned()),
        Just("x~1y~0".to_owned()),
        Just("multus-eni-sidecar-old".to_owned()),
        Just("MULTUS-ENI-SIDECAR".to_owned()),
        Just("ünïcode ✓".to_owned()),
        Just(String::new()),
        ".{0,12}".prop_filter("not the sidecar", |s| s != SIDECAR_NAME),
    ]
}

fn container() -> impl Strategy<Value = Value> {
    (odd_name(), any::<bool>(), any::<bool>()).prop_map(|(name, restart, extra)| {
        let mut c = json!({
            "name": name,
            "image": "registry.example/app:1.2.3",
            "args": ["--flag=a/b", "~"],
            "resources": {"limits": {"cpu": "1"}},
        });
        if restart {
            // Fields a typed round-trip would drop must survive.
            c["restartPolicy"] = json!("Always");
        }
        if extra {
            c["x-future-field"] = json!({"nested": [1, 2, {"k": null}]});
        }
        c
    })
}

/// Annotation keys that need JSON-pointer escaping, including ones that look escaped.
fn extra_annotations() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            prop_oneof![
                Just("example.com/owner".to_owned()),
                Just("a~b".to_owned()),
                Just("multus-eni.io~1status".to_owned()),
                Just("~0~1/".to_owned()),
                Just(String::new()),
                "[a-z./~]{1,12}",
            ],
            ".{0,8}",
        ),
        0..4,
    )
}

/// How an optional list or map appears in the generated pod.
#[derive(Debug, Clone, Copy)]
enum Presence {
    Absent,
    Null,
    Empty,
    Filled,
}

fn presence() -> impl Strategy<Value = Presence> {
    prop::sample::select(vec![
        Presence::Absent,
        Presence::Null,
        Presence::Empty,
        Presence::Filled,
        Presence::Filled,
    ])
}

/// A pod carrying `annotation`, in one of many shapes.
#[derive(Debug, Clone)]
struct PodShape {
    init_containers: (Presence, Vec<Value>),
    containers: Vec<Value>,
    volumes: Presence,
    extra_annotations: Vec<(String, String)>,
    stale_status: bool,
    generate_name: bool,
    inject_true: bool,
}

fn pod_shape() -> impl Strategy<Value = PodShape> {
    (
        presence(),
        prop::collection::vec(container(), 1..3),
        prop::collection::vec(container(), 1..4),
        presence(),
        extra_annotations(),
        prop::bool::weighted(0.1),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(
                init_presence,
                inits,
                containers,
                volumes,
                extra_annotations,
                stale_status,
                generate_name,
                inject_true,
            )| PodShape {
                init_containers: (init_presence, inits),
                containers,
                volumes,
                extra_annotations,
                stale_status,
                generate_name,
                inject_true,
            },
        )
}

fn list(presence: Presence, items: Vec<Value>) -> Option<Value> {
    match presence {
        Presence::Absent => None,
        Presence::Null => Some(Value::Null),
        Presence::Empty => Some(json!([])),
        Presence::Filled => Some(Value::Array(items)),
    }
}

fn build_pod(shape: &PodShape, annotation: &str) -> Value {
    let mut annotations = Map::new();
    for (k, v) in &shape.extra_annotations {
        annotations.insert(k.clone(), json!(v));
    }
    annotations.insert(NETWORKS_ANNOTATION.into(), json!(annotation));
    if shape.stale_status {
        annotations.insert(STATUS_ANNOTATION.into(), json!("stale"));
    }
    if shape.inject_true {
        annotations.insert(INJECT_ANNOTATION.into(), json!("true"));
    }
    let mut metadata =
        json!({"namespace": "ran", "annotations": annotations, "labels": {"app": "upf"}});
    if shape.generate_name {
        metadata["generateName"] = json!("upf-7d9f-");
    } else {
        metadata["name"] = json!("upf-0");
    }
    let mut spec = Map::new();
    if let Some(v) = list(shape.init_containers.0, shape.init_containers.1.clone()) {
        spec.insert("initContainers".into(), v);
    }
    spec.insert("containers".into(), Value::Array(shape.containers.clone()));
    if let Some(v) = list(shape.volumes, vec![json!({"name": "data", "emptyDir": {}})]) {
        spec.insert("volumes".into(), v);
    }
    spec.insert("restartPolicy".into(), json!("Always"));
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

fn config() -> impl Strategy<Value = Config> {
    (
        any::<bool>(),
        0u32..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(legacy, default_networks, region, role, direct)| {
            let mut c = Config::new("registry.example/multus-eni-sidecar:v0.1.0");
            if direct {
                c.ec2_access = multus_eni_webhook::inject::Ec2Access::Direct;
            }
            c.mode = if legacy {
                SidecarMode::Legacy
            } else {
                SidecarMode::Native
            };
            c.default_networks = default_networks;
            c.aws_region = region.then(|| "eu-west-1".to_owned());
            c.sidecar_role_arn = role.then(|| "arn:aws:iam::123456789012:role/eni".to_owned());
            c
        })
}

// === checks ===

fn containers_named<'a>(pod: &'a Value, list: &str) -> Vec<&'a Value> {
    pod["spec"][list]
        .as_array()
        .map(|cs| cs.iter().collect())
        .unwrap_or_default()
}

fn sidecar_count(pod: &Value) -> usize {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|l| containers_named(pod, l))
        .filter(|c| c["name"] == SIDECAR_NAME)
        .count()
}

/// The application's containers of one list, serialized, in order (the sidecar left out).
fn app_containers(pod: &Value, list: &str) -> Vec<String> {
    containers_named(pod, list)
        .into_iter()
        .filter(|c| c["name"] != SIDECAR_NAME)
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .collect()
}

/// The pod with everything the injection may add taken out, and empty/null/absent made alike,
/// so that "nothing else changed" is a plain equality.
fn without_injection(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(annotations) = pod
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(STATUS_ANNOTATION);
        // Generated pods carry no skip-containers of their own: the injection adds the key.
        annotations.remove(multus_eni_webhook::inject::SKIP_CONTAINERS_ANNOTATION);
    }
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        for list in ["initContainers", "containers", "volumes"] {
            if let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) {
                items.retain(|c| {
                    c["name"] != SIDECAR_NAME
                        && c["name"] != multus_eni_webhook::inject::AWS_TOKEN_VOLUME
                        && c["name"] != multus_eni_webhook::inject::AGENT_SOCKET_VOLUME
                });
            }
            let empty = spec
                .get(list)
                .is_some_and(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty));
            if empty {
                spec.remove(list);
            }
        }
    }
    pod
}

/// The patch as the kube-apiserver receives it: through `/mutate`'s body handling.
fn patch_via_review(config: &Config, pod: &Value) -> Result<Option<json_patch::Patch>, String> {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b3e1f44-5b1e-4a44-9a43-3c3f2c1f0c9d",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ran",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    let outcome = review(config, body.to_string().as_bytes()).map_err(|e| e.to_string())?;
    let response = serde_json::to_value(&outcome.response).map_err(|e| e.to_string())?;
    if response["response"]["uid"] != body["request"]["uid"] {
        return Err(format!("uid not echoed: {response}"));
    }
    if response["response"]["allowed"] != true {
        return Err(format!("not allowed: {response}"));
    }
    let Some(encoded) = response["response"]["patch"].as_str() else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// The parser reads back exactly what was written, in both forms.
    #[test]
    fn parser_agrees_with_the_multus_model(
        attachments in prop::collection::vec(attachment(), 1..6),
        form in form(),
        default_networks in 0u32..4,
    ) {
        let annotation = render(&attachments, &form);
        let parsed = parse_networks(&annotation, default_networks);
        match expected_interfaces(&attachments, default_networks) {
            None => prop_assert!(
                matches!(parsed, Err(NetworksError::DuplicateInterface(_))),
                "{annotation:?} has a duplicate interface but gave {parsed:?}"
            ),
            Some(expected) => {
                let parsed = parsed.map_err(|e| TestCaseError::fail(format!("{annotation:?}: {e}")))?;
                let names: Vec<String> = parsed.iter().map(|s| s.interface.clone()).collect();
                prop_assert_eq!(names, expected);
                for (got, want) in parsed.iter().zip(&attachments) {
                    let dotted = matches!(form, Form::Json { dotted: true, .. });
                    let want_name = if dotted {
                        format!("{}.nets.example", want.name)
                    } else {
                        want.name.clone()
                    };
                    prop_assert_eq!(&got.name, &want_name);
                    prop_assert_eq!(&got.namespace, &want.namespace);
                    if matches!(form, Form::Json { .. }) {
                        prop_assert_eq!(&got.ips, &want.ips);
                        prop_assert_eq!(&got.mac, &want.mac);
                    }
                }
            }
        }
    }

    /// Injection on any pod shape: clean patch, one sidecar, apps untouched, idempotent, and
    /// the same patch whether computed directly or through `/mutate`'s body handling.
    #[test]
    fn injection_is_clean_single_and_idempotent(
        attachments in prop::collection::vec(attachment(), 1..5),
        form in form(),
        shape in pod_shape(),
        config in config(),
    ) {
        let Some(interfaces) = expected_interfaces(&attachments, config.default_networks) else {
            return Ok(()); // not parsable: covered by the parser property
        };
        let annotation = render(&attachments, &form);
        let pod = build_pod(&shape, &annotation);

        let Decision::Inject(injection) = mutate_pod(&config, &pod) else {
            return Err(TestCaseError::fail(format!("not injected: {:?}", mutate_pod(&config, &pod))));
        };
        prop_assert_eq!(&injection.interfaces, &interfaces);

        let mut out = pod.clone();
        json_patch::patch(&mut out, &injection.patch)
            .map_err(|e| TestCaseError::fail(format!("patch does not apply: {e}\n{pod}")))?;

        // Exactly one sidecar, where the mode says.
        prop_assert_eq!(sidecar_count(&out), 1);
        match config.mode {
            SidecarMode::Native => prop_assert_eq!(&out["spec"]["initContainers"][0]["name"], SIDECAR_NAME),
            SidecarMode::Legacy => {
                let cs = containers_named(&out, "containers");
                prop_assert_eq!(&cs[cs.len() - 1]["name"], SIDECAR_NAME);
            }
        }
        let sidecar = ["initContainers", "containers"]
            .iter()
            .flat_map(|l| containers_named(&out, l))
            .find(|c| c["name"] == SIDECAR_NAME)
            .cloned()
            .unwrap_or_default();
        prop_assert_eq!(&sidecar["args"][1], &json!(format!("--interfaces={}", interfaces.join(","))));

        // Application containers byte-identical, in both lists.
        for list in ["initContainers", "containers"] {
            prop_assert_eq!(app_containers(&out, list), app_containers(&pod, list), "{}", list);
        }
        // Nothing else changed: other annotations (escaped keys included), volumes, fields.
        prop_assert_eq!(without_injection(&out), without_injection(&pod));
        prop_assert!(out["metadata"]["annotations"][STATUS_ANNOTATION].is_string());

        // Re-running on the output adds nothing.
        prop_assert_eq!(mutate_pod(&config, &out), Decision::Skip(SkipReason::AlreadyInjected));

        // The apiserver's path gives the same patch, and no patch for the injected pod.
        let via_review = patch_via_review(&config, &pod).map_err(TestCaseError::fail)?;
        prop_assert_eq!(via_review.as_ref(), Some(&injection.patch));
        let again = patch_via_review(&config, &out).map_err(TestCaseError::fail)?;
        prop_assert!(again.is_none(), "reinvocation patched: {again:?}");

        // Reinvocation after another webhook put an init container first: the sidecar goes
        // back to index 0 and nothing else moves.
        if config.mode == SidecarMode::Native {
            let mut pushed = out.clone();
            if let Some(inits) = pushed["spec"]["initContainers"].as_array_mut() {
                inits.insert(0, json!({"name": "mesh-init", "image": "proxy"}));
            }
            let moved = patch_via_review(&config, &pushed).map_err(TestCaseError::fail)?;
            let moved = moved.ok_or_else(|| TestCaseError::fail("sidecar left behind"))?;
            let mut fixed = pushed.clone();
            json_patch::patch(&mut fixed, &moved)
                .map_err(|e| TestCaseError::fail(format!("move does not apply: {e}")))?;
            prop_assert_eq!(&fixed["spec"]["initContainers"][0], &out["spec"]["initContainers"][0]);
            prop_assert_eq!(&fixed["spec"]["initContainers"][1]["name"], "mesh-init");
            prop_assert_eq!(app_containers(&fixed, "initContainers"), app_containers(&pushed, "initContainers"));
        }
    }

    /// A pod without an annotations map (or without the networks key) is left alone.
    #[test]
    fn pods_without_the_annotation_are_skipped(shape in pod_shape(), config in config()) {
        let mut pod = build_pod(&shape, "x");
        let no_map = shape.generate_name;
        if let Some(metadata) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
            if no_map {
                metadata.remove("annotations");
            } else if let Some(a) = metadata.get_mut("annotations").and_then(Value::as_object_mut) {
                a.remove(NETWORKS_ANNOTATION);
            }
        }
        prop_assert_eq!(mutate_pod(&config, &pod), Decision::Skip(SkipReason::NoNetworks));
        prop_assert!(patch_via_review(&config, &pod).map_err(TestCaseError::fail)?.is_none());
    }
}

/// Strings biased towards the characters the parser branches on.
fn annotation_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9@/, \\-\\[\\]{}\":\\\\.]{0,40}",
        prop::collection::vec(
            prop::sample::select(vec![
                "a",
                "-",
                "/",
                "@",
                ",",
                " ",
                "[",
                "]",
                "{",
                "}",
                "\"",
                ":",
                "name",
                "interface",
                "namespace",
                "ips",
                "null",
                "1",
                "\\u0000",
                "é",
                "net1",
                "..",
            ]),
            0..24
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Never panics; whatever it accepts is something the sidecar can be told.
    #[test]
    fn parser_never_panics_and_accepts_only_valid_interfaces(
        annotation in annotation_like(),
        default_networks in prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()],
    ) {
        if let Ok(selections) = parse_networks(&annotation, default_networks) {
            let mut seen = BTreeSet::new();
            for s in &selections {
                let i = &s.interface;
                prop_assert!(!i.is_empty() && i.len() < 16, "{i:?}");
                prop_assert!(!i.contains(['/', ':', ',']) && !i.chars().any(char::is_whitespace), "{i:?}");
                prop_assert!(seen.insert(i.clone()), "duplicate {i:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// `/mutate`'s body handling never panics on arbitrary bytes or JSON.
    #[test]
    fn review_never_panics(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        annotation_like().prop_map(String::into_bytes),
    ]) {
        let _ = review(&Config::new("img"), &body);
    }
}
