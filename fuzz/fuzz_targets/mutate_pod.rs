//! The injection on any JSON pod: the patch applies, adds exactly one sidecar, and running
//! again on the result adds nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multus_eni_webhook::inject::{Ec2Access, SIDECAR_NAME};
use multus_eni_webhook::{Config, Decision, SidecarMode, SkipReason, mutate_pod};
use serde_json::Value;

fn sidecars(pod: &Value) -> usize {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|l| pod.get("spec")?.get(*l)?.as_array())
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(pod) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    let mut config = Config::new("registry.example/multus-eni-sidecar:fuzz");
    if first & 1 == 1 {
        config.mode = SidecarMode::Legacy;
    }
    if first & 2 == 2 {
        config.sidecar_role_arn = Some("arn:aws:iam::123456789012:role/eni".into());
    }
    if first & 4 == 4 {
        config.ec2_access = Ec2Access::Direct;
    } else if first & 8 == 8 {
        config.ec2_access = Ec2Access::Gate;
    }
    config.default_networks = u32::from(first >> 6);
    if let Decision::Inject(injection) = mutate_pod(&config, &pod) {
        let mut out = pod.clone();
        json_patch::patch(&mut out, &injection.patch).expect("the patch applies");
        assert_eq!(sidecars(&out), 1, "exactly one sidecar");
        assert_eq!(
            mutate_pod(&config, &out),
            Decision::Skip(SkipReason::AlreadyInjected),
            "re-running adds nothing"
        );
    }
});
