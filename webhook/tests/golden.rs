//! Golden patches: every fixture under tests/data gets the patch in `<fixture>.patch.json`
//! (pretty JSON; a skip is recorded as `{"skip": "<reason>"}`). A stale golden fails the test.
//! After reviewing a behaviour change, regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p multus-eni-webhook --test golden` and review the diff.

mod common;

use common::{TestResult, fixtures, golden_config, load_yaml};
use multus_eni_webhook::inject::{
    Config, Decision, DirectSettings, Ec2Access, SidecarMode, mutate_pod,
};
use multus_eni_webhook::manifest::template_pointer;
use serde_json::{Value, json};
use std::path::Path;

/// What the webhook does with a fixture: the patch for the pod (template), or the skip reason.
fn golden_value(config: &Config, object: &Value) -> TestResult<Value> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let Some(pointer) = template_pointer(api_version, kind) else {
        return Ok(json!({ "skip": "not_a_workload" }));
    };
    let template = object
        .pointer(pointer)
        .ok_or("fixture has no pod template")?;
    Ok(match mutate_pod(config, template) {
        Decision::Inject(injection) => serde_json::to_value(&injection.patch)?,
        Decision::MoveSidecarFirst(patch) => serde_json::to_value(&patch)?,
        Decision::Skip(reason) => json!({ "skip": reason.label() }),
    })
}

fn check(path: &Path, actual: &Value) -> TestResult<Option<String>> {
    let pretty = serde_json::to_string_pretty(actual)? + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &pretty)?;
        return Ok(None);
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == pretty {
        Ok(None)
    } else {
        Ok(Some(format!(
            "{} is stale or missing; got:\n{pretty}",
            path.display()
        )))
    }
}

#[test]
fn every_fixture_matches_its_golden_patch() -> TestResult {
    let mut stale = Vec::new();
    let fixtures = fixtures();
    assert!(fixtures.len() >= 10, "fixtures missing: {fixtures:?}");
    for fixture in &fixtures {
        let object = load_yaml(fixture)?;
        let actual = golden_value(&golden_config(), &object)?;
        stale.extend(check(&fixture.with_extension("patch.json"), &actual)?);
    }
    // One variant in legacy mode with the sidecar-only IRSA role.
    let upf = load_yaml(&common::data_dir().join("free5gc-upf.yaml"))?;
    let mut legacy = golden_config().with_ec2_access(Ec2Access::Direct);
    legacy.mode = SidecarMode::Legacy;
    legacy.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/multus-eni-sidecar".into());
    let actual = golden_value(&legacy, &upf)?;
    stale.extend(check(
        &common::data_dir().join("free5gc-upf.legacy-irsa.patch.json"),
        &actual,
    )?);
    // A CronJob's pods run to completion: legacy mode leaves them alone.
    let cronjob = load_yaml(&common::data_dir().join("cronjob-probe.yaml"))?;
    let actual = golden_value(&legacy, &cronjob)?;
    stale.extend(check(
        &common::data_dir().join("cronjob-probe.legacy.patch.json"),
        &actual,
    )?);
    // Direct mode with every setting passed on to the sidecar (proxy, VPC endpoint, knobs).
    let mut direct = golden_config().with_ec2_access(Ec2Access::Direct);
    direct.direct = DirectSettings {
        resync_interval: Some("10m".into()),
        shutdown_timeout: Some("20s".into()),
        release_on_exit: Some(false),
        https_proxy: Some("http://proxy.internal:3128".into()),
        no_proxy: Some("169.254.169.254,.internal".into()),
        ec2_endpoint: Some("https://vpce-0abc.ec2.us-west-2.vpce.amazonaws.com".into()),
    };
    direct.startup_timeout = std::time::Duration::from_secs(600);
    let actual = golden_value(&direct, &upf)?;
    stale.extend(check(
        &common::data_dir().join("free5gc-upf.direct-settings.patch.json"),
        &actual,
    )?);
    // The HTTP startup gate (`/mutate/gate`): no volume, the node's address from the downward API.
    let gate = golden_config().with_ec2_access(Ec2Access::Gate);
    let actual = golden_value(&gate, &upf)?;
    stale.extend(check(
        &common::data_dir().join("free5gc-upf.gate.patch.json"),
        &actual,
    )?);
    assert!(
        stale.is_empty(),
        "{}\nrun UPDATE_GOLDEN=1 cargo test -p multus-eni-webhook --test golden and review",
        stale.join("\n")
    );
    Ok(())
}

#[test]
fn goldens_apply_and_keep_app_containers() -> TestResult {
    for fixture in fixtures() {
        let object = load_yaml(&fixture)?;
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(
            fixture.with_extension("patch.json"),
        )?)?;
        if golden.get("skip").is_some() {
            continue;
        }
        let pointer = template_pointer(
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default(),
        )
        .ok_or("no template")?;
        let mut template = object.pointer(pointer).cloned().ok_or("no template")?;
        let patch: json_patch::Patch = serde_json::from_value(golden)?;
        json_patch::patch(&mut template, &patch)?;
        let before = object.pointer(pointer).ok_or("no template")?;
        assert_eq!(
            template["spec"]["containers"],
            before["spec"]["containers"],
            "{}",
            fixture.display()
        );
        assert_eq!(
            template["spec"]["initContainers"][0]["name"],
            "multus-eni-sidecar",
            "{}",
            fixture.display()
        );
    }
    Ok(())
}
