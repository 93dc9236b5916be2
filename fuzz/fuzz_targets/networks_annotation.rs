//! The Multus networks annotation parser: never panics, and whatever it accepts is something
//! the sidecar can be told (valid, unique interface names).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multus_eni_webhook::parse_networks;
use std::collections::BTreeSet;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the count of Multus default networks (0..=3, or a huge one).
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let default_networks = match first % 5 {
        4 => u32::MAX,
        n => u32::from(n),
    };
    let Ok(annotation) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(selections) = parse_networks(annotation, default_networks) {
        let mut seen = BTreeSet::new();
        for s in &selections {
            let i = s.interface.as_str();
            assert!(!i.is_empty() && i.len() < 16, "bad interface {i:?}");
            assert!(
                !i.contains(['/', ':', ',']) && !i.chars().any(char::is_whitespace),
                "bad interface {i:?}"
            );
            assert!(seen.insert(i.to_owned()), "duplicate interface {i:?}");
        }
    }
});
