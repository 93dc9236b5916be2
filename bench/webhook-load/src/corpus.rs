//! Seed corpora for the fuzz targets in `fuzz/`, made from the fixture pods and the same bad
//! bodies the sustained run sends, so fuzzing starts from what the apiserver really sends.

use crate::bodies::{Fixtures, Mix, admission_review};
use crate::{Error, Result};
use multus_eni_webhook::networks::NETWORKS_ANNOTATION;
use serde_json::Value;
use std::path::Path;

/// Bodies larger than this stay out of the corpus (libFuzzer works best on small inputs).
const MAX_SEED_BYTES: usize = 64 * 1024;

/// Annotation strings worth starting from besides the fixtures'.
const ANNOTATIONS: [&str; 8] = [
    "ipvlan-multus-1",
    "a, other/b@n3 ,c",
    "kube-system/macvlan@eth1",
    r#"[{"name":"n3network","interface":"n3","ips":["10.100.50.233/29"]}]"#,
    r#"[{"name":"n6","namespace":"nets","mac":"02:00:00:00:00:01","default-route":["10.0.0.1"]}]"#,
    "a@net2,b",
    "[]",
    "a,,b",
];

/// Writes `networks_annotation/`, `admission_review/` and `mutate_pod/` under `out`; returns
/// how many files were written.
pub fn write_seeds(fixtures: &Fixtures, out: &Path) -> Result<usize> {
    let mut written = 0;
    let mut write = |target: &str, name: String, bytes: &[u8]| -> Result<()> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
        std::fs::write(dir.join(name), bytes)
            .map_err(|e| Error::io(format!("writing a seed in {}", dir.display()), e))?;
        written += 1;
        Ok(())
    };
    let pods = fixtures.multus.iter().chain(&fixtures.plain);
    for (i, pod) in pods.enumerate() {
        let json = pod.to_string();
        for config_byte in [0u8, 1] {
            let mut seed = vec![config_byte];
            seed.extend_from_slice(json.as_bytes());
            write("mutate_pod", format!("fixture-{i}-{config_byte}"), &seed)?;
        }
        let review = admission_review(&format!("seed-{i}"), "CREATE", pod).to_string();
        write(
            "admission_review",
            format!("fixture-{i}"),
            review.as_bytes(),
        )?;
        if let Some(annotation) = pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(NETWORKS_ANNOTATION))
            .and_then(Value::as_str)
        {
            let mut seed = vec![0u8];
            seed.extend_from_slice(annotation.as_bytes());
            write("networks_annotation", format!("fixture-{i}"), &seed)?;
        }
    }
    for (i, annotation) in ANNOTATIONS.iter().enumerate() {
        let mut seed = vec![(i % 3) as u8];
        seed.extend_from_slice(annotation.as_bytes());
        write("networks_annotation", format!("example-{i}"), &seed)?;
    }
    let mix = Mix::with_bad_input(fixtures, 1);
    for (i, body) in mix.bodies().iter().enumerate() {
        if body.bytes.len() <= MAX_SEED_BYTES && i % 4 == 0 {
            write(
                "admission_review",
                format!("{}-{i}", body.class.label()),
                &body.bytes,
            )?;
        }
    }
    Ok(written)
}
