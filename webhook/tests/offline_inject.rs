//! Offline `inject` mutates workload templates exactly as `/mutate` mutates the pod.

mod common;

use common::{TestResult, admission_review, data_dir, golden_config, response_patch};
use multus_eni_webhook::admission::review;
use multus_eni_webhook::manifest::{inject_stream, read_documents};
use serde::Deserialize;
use serde_json::{Value, json};

fn documents(yaml: &str) -> TestResult<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

#[test]
fn workloads_are_mutated_like_the_webhook_mutates_their_pods() -> TestResult {
    let config = golden_config();
    for (file, pointer) in [
        ("aws-sample-busybox.yaml", "/spec/template"),
        ("statefulset-smf.yaml", "/spec/template"),
        ("cronjob-probe.yaml", "/spec/jobTemplate/spec/template"),
        ("free5gc-upf.yaml", ""),
    ] {
        let input = std::fs::read_to_string(data_dir().join(file))?;
        // The objects as kubectl would send them (YAML 1.1 octal file modes as numbers).
        let original = read_documents(&input)?.remove(0);
        let report = inject_stream(&config, &input)?;
        assert_eq!(report.injected, 1, "{file}");
        let mutated = documents(&report.output)?.remove(0);
        let template = mutated.pointer(pointer).ok_or("no template")?;
        assert_eq!(
            template["spec"]["initContainers"][0]["name"], "multus-eni-sidecar",
            "{file}"
        );

        // The same pod through /mutate's code path.
        let mut pod = original.pointer(pointer).cloned().ok_or("no template")?;
        if pointer.is_empty() {
            pod = original.clone();
        } else {
            pod["apiVersion"] = json!("v1");
            pod["kind"] = json!("Pod");
        }
        let outcome = review(
            &config,
            admission_review(&pod, "CREATE", "u").to_string().as_bytes(),
        )?;
        let patch = response_patch(&outcome.response)?.ok_or("no patch")?;
        let mut via_webhook = pod.clone();
        json_patch::patch(&mut via_webhook, &patch)?;
        assert_eq!(via_webhook["spec"], template["spec"], "{file}");
        assert_eq!(via_webhook["metadata"], template["metadata"], "{file}");

        // Everything outside the template is unchanged.
        let mut rest_before = original.clone();
        let mut rest_after = mutated.clone();
        if !pointer.is_empty() {
            *rest_before.pointer_mut(pointer).ok_or("no template")? = Value::Null;
            *rest_after.pointer_mut(pointer).ok_or("no template")? = Value::Null;
            assert_eq!(rest_before, rest_after, "{file}");
        }

        // Injecting the output again changes nothing (offline, then the webhook at admission).
        let twice = inject_stream(&config, &report.output)?;
        assert_eq!(twice.injected, 0, "{file}");
        assert_eq!(documents(&twice.output)?, documents(&report.output)?);
    }
    Ok(())
}

#[test]
fn other_kinds_pass_through_unchanged() -> TestResult {
    let input = std::fs::read_to_string(data_dir().join("configmap.yaml"))?;
    let report = inject_stream(&golden_config(), &input)?;
    assert_eq!(report.injected, 0);
    assert_eq!(documents(&report.output)?, documents(&input)?);
    Ok(())
}

#[test]
fn a_multi_document_stream_keeps_order() -> TestResult {
    let mut input = String::new();
    for file in [
        "configmap.yaml",
        "aws-sample-busybox.yaml",
        "pod-host-network.yaml",
    ] {
        input.push_str("---\n");
        input.push_str(&std::fs::read_to_string(data_dir().join(file))?);
    }
    let report = inject_stream(&golden_config(), &input)?;
    let docs = documents(&report.output)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Pod"]);
    assert_eq!(report.injected, 1);
    Ok(())
}
