//! Offline `inject`: mutates the pod templates of a YAML stream with the webhook's own code
//! path ([`mutate_pod`] + the same JSON patch), for GitOps and clusters without webhooks.

use crate::inject::{Config, Decision, mutate_pod};
use crate::yaml_out::to_yaml;
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// Result of mutating a YAML stream.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectReport {
    /// The stream with pod templates mutated, other documents unchanged in content.
    pub output: String,
    /// Warnings for objects left unchanged for a reason the user should fix (a malformed
    /// networks annotation, a Job's pod in legacy mode).
    pub warnings: Vec<String>,
    /// How many pods or templates got the sidecar.
    pub injected: usize,
}

/// Where a workload kind keeps its pod template, by API group prefix and kind.
pub fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some("/spec/template")
        }
        ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Mutates one object in place (recursing into `kind: List`). Returns what it did.
pub fn inject_object(config: &Config, object: &mut Value) -> Result<Option<Decision>> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(pointer) = template_pointer(&api_version, &kind) else {
        return Ok(None);
    };
    let Some(template) = object.pointer_mut(pointer) else {
        return Ok(None);
    };
    let decision = mutate_pod(config, template);
    if let Some(patch) = decision.patch() {
        json_patch::patch(template, patch).map_err(|source| Error::Mutate {
            what: format!("{kind} {}", name_of(object)),
            source,
        })?;
    }
    Ok(Some(decision))
}

fn name_of(object: &Value) -> String {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned()
}

/// Mutates every Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob of a
/// YAML stream (also inside `kind: List`); other documents pass through. Empty documents are
/// dropped; comments and YAML formatting are not preserved, and strings that YAML 1.1 would
/// read as something else are quoted (see [`crate::yaml_out`]).
pub fn inject_stream(config: &Config, input: &str) -> Result<InjectReport> {
    let mut report = InjectReport {
        output: String::new(),
        warnings: Vec::new(),
        injected: 0,
    };
    for mut value in read_documents(input)? {
        let mut decisions = Vec::new();
        let is_list = value.get("kind").and_then(Value::as_str) == Some("List");
        if is_list {
            if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    decisions.push((name_of(item), inject_object(config, item)?));
                }
            }
        } else {
            decisions.push((name_of(&value), inject_object(config, &mut value)?));
        }
        for (name, decision) in decisions {
            match decision {
                Some(Decision::Inject(injection)) => {
                    report.injected += 1;
                    for w in &injection.warnings {
                        report.warnings.push(format!("{name}: {w}"));
                    }
                }
                Some(Decision::Skip(reason)) => {
                    if let Some(w) = reason.warning() {
                        report.warnings.push(format!("{name}: {w}"));
                    }
                }
                _ => {}
            }
        }
        report.output.push_str("---\n");
        report.output.push_str(&to_yaml(&value));
    }
    Ok(report)
}

/// Reads a YAML stream the way kubectl would send its objects: empty documents dropped, and
/// octal file modes in pod templates read as numbers (see [`restore_octal_modes`]).
pub fn read_documents(input: &str) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let mut value =
            Value::deserialize(document).map_err(|source| Error::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
                items.iter_mut().for_each(restore_template_modes);
            }
        } else {
            restore_template_modes(&mut value);
        }
        documents.push(value);
    }
    Ok(documents)
}

fn restore_template_modes(object: &mut Value) {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(pointer) = template_pointer(api_version, kind)
        && let Some(template) = object.pointer_mut(pointer)
    {
        restore_octal_modes(template);
    }
}

/// kubectl reads YAML 1.1, where an unquoted `0644` is octal 420; serde_yaml_ng follows YAML
/// 1.2 and keeps it as the string `"0644"`, which the API would reject. File modes are the one
/// place pod specs write octal, so inside pod templates `mode`/`defaultMode` strings of octal
/// digits with a leading zero are turned back into the number kubectl would have sent.
fn restore_octal_modes(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if (key == "mode" || key == "defaultMode")
                    && let Some(octal) = child.as_str().and_then(parse_octal)
                {
                    *child = Value::from(octal);
                    continue;
                }
                restore_octal_modes(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(restore_octal_modes),
        _ => {}
    }
}

fn parse_octal(text: &str) -> Option<u32> {
    let digits = text.strip_prefix('0')?;
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_locations() {
        assert_eq!(template_pointer("v1", "Pod"), Some(""));
        assert_eq!(
            template_pointer("apps/v1", "Deployment"),
            Some("/spec/template")
        );
        assert_eq!(
            template_pointer("batch/v1", "CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_pointer("v1", "ConfigMap"), None);
        // A custom resource that happens to be called Deployment is not touched.
        assert_eq!(template_pointer("example.com/v1", "Deployment"), None);
    }

    #[test]
    fn list_items_are_mutated_and_empty_documents_dropped() {
        let input = r#"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: a
    annotations: {k8s.v1.cni.cncf.io/networks: ipvlan}
  spec:
    containers: [{name: app, image: busybox}]
---
"#;
        let report = inject_stream(&Config::new("img"), input).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.injected, 1);
        assert_eq!(report.output.matches("---\n").count(), 1);
        assert!(report.output.contains("multus-eni-sidecar"));
    }

    #[test]
    fn malformed_annotation_warns_and_passes_through() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  annotations:\n    k8s.v1.cni.cncf.io/networks: 'a,,b'\nspec:\n  containers: [{name: app, image: busybox}]\n";
        let report = inject_stream(&Config::new("img"), input).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.injected, 0);
        assert_eq!(report.warnings.len(), 1);
        assert!(report.warnings[0].starts_with("bad: "));
    }

    #[test]
    fn octal_file_modes_are_read_as_kubectl_reads_them() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: m}\nspec:\n  volumes:\n  - name: v\n    configMap: {name: c, defaultMode: 0644, items: [{key: k, path: p, mode: 0777}]}\n  other: 0644\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\ndata:\n  mode: '0644'\n";
        let report = inject_stream(&Config::new("img"), input).unwrap_or_else(|e| panic!("{e}"));
        let mut docs = serde_yaml_ng::Deserializer::from_str(&report.output)
            .map(|d| Value::deserialize(d).unwrap_or_default());
        let out = docs.next().unwrap_or_default();
        let config_map = docs.next().unwrap_or_default();
        assert_eq!(config_map["data"]["mode"], "0644");
        assert_eq!(out["spec"]["volumes"][0]["configMap"]["defaultMode"], 420);
        assert_eq!(
            out["spec"]["volumes"][0]["configMap"]["items"][0]["mode"],
            511
        );
        assert_eq!(out["spec"]["other"], "0644");
        assert_eq!(parse_octal("0"), None);
        assert_eq!(parse_octal("0800"), None);
        assert_eq!(parse_octal("644"), None);
    }

    #[test]
    fn invalid_yaml_is_an_error() {
        assert!(inject_stream(&Config::new("img"), "a: [").is_err());
    }
}
