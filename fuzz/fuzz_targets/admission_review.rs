//! `/mutate` body handling: any body gets an answer or a 4xx error, never a panic; an answer
//! always echoes the request uid and serializes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multus_eni_webhook::{Config, review};

fuzz_target!(|data: &[u8]| {
    let config = Config::new("registry.example/multus-eni-sidecar:fuzz");
    if let Ok(outcome) = review(&config, data) {
        let out = serde_json::to_value(&outcome.response).expect("the response serializes");
        assert_eq!(out["response"]["uid"], outcome.uid.as_str());
        assert_eq!(out["response"]["allowed"], true);
    }
});
