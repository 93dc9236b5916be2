//! CI-sized sustained load with bad input (issue 5): the debug webhook binary under a mix of
//! real fixture pods, non-Multus pods and garbage bodies for ~20 s over TLS. Asserts what must
//! always hold — no 5xx, every answer the library's answer, the process alive, no unbounded
//! memory growth — and never latency (that is the benchmark's job: scripts/bench-webhook.sh).
//!
//! Needs `target/debug/multus-eni-webhook` (scripts/test.sh builds the binaries first), or
//! `WEBHOOK_LOAD_BIN`. Length: `WEBHOOK_LOAD_SOAK_SECONDS` (default 20).

use multus_eni_webhook_load::bodies::Class;
use multus_eni_webhook_load::cli::{Common, SustainedArgs, sustained};
use multus_eni_webhook_load::report;
use std::path::PathBuf;
use std::time::Duration;

fn webhook_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEBHOOK_LOAD_BIN") {
        return bin.into();
    }
    let dir = std::env::var_os("MULTUS_ENI_BIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug"),
        PathBuf::from,
    );
    dir.join("multus-eni-webhook")
}

#[test]
fn sustained_load_with_bad_input_keeps_the_webhook_up_and_right() {
    let binary = webhook_binary();
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p multus-eni-webhook` first",
        binary.display()
    );
    let seconds = std::env::var("WEBHOOK_LOAD_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let common = Common {
        webhook_bin: binary,
        fixtures: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../webhook/tests/data"),
        client_threads: 1,
        seed: 11,
    };
    let args = SustainedArgs {
        duration: Duration::from_secs(seconds),
        // A debug build on a shared 2-core machine: modest, but every class many times over.
        rate: 250.0,
        connections: 4,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let r = runtime
        .block_on(sustained(&common, &args))
        .unwrap_or_else(|e| panic!("sustained run: {e}"));
    let table = report::sustained_table(&r);
    println!("{table}");

    assert!(r.alive, "the webhook process died\n{table}");
    assert!(r.healthy, "/healthz did not answer 200 at the end\n{table}");
    assert_eq!(r.tally.server_errors, 0, "5xx answers\n{table}");
    assert_eq!(
        r.tally.unexpected, 0,
        "answers differ from the library's\n{table}"
    );
    assert_eq!(
        r.tally.transport_errors, 0,
        "keep-alive connections failed\n{table}"
    );
    for class in [
        Class::MultusPod,
        Class::PlainPod,
        Class::NotJson,
        Class::Truncated,
        Class::WrongKind,
        Class::NoRequest,
    ] {
        assert!(
            r.tally.by_class.get(&class).is_some_and(|c| c.sent > 0),
            "{} was never sent\n{table}",
            class.label()
        );
    }
    // Memory: once warm (25% in), resident memory may move with the allocator, but not grow
    // without bound. 50% or 16 MiB over the warm level, whichever is larger, fails.
    let warm = r.rss_at(0.25).unwrap_or(0);
    let end = r.rss_at(1.0).unwrap_or(0);
    assert!(warm > 0 && end > 0, "no memory samples\n{table}");
    let allowed = warm + (warm / 2).max(16 * 1024);
    assert!(
        end <= allowed,
        "RSS grew from {warm} KiB (25%) to {end} KiB (end)\n{table}"
    );
}
