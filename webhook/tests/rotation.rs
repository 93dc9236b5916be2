//! Certificate rotation the way kubelet updates a Secret volume, under load: a new timestamped
//! directory, a `..data_tmp` symlink renamed over `..data`, the old directory removed, with
//! `tls.crt`/`tls.key` symlinks through `..data`. No request may fail, and new connections must
//! get the new certificate without a restart.

mod common;

use common::{
    TestCa, TestResult, TestServer, admission_review, data_dir, golden_config, load_yaml,
};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bound for the watcher to pick up the new certificate. Not a performance assertion:
/// only a reload that never happens can exceed it.
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

/// Writes the pair into a new `..<timestamp>` directory and atomically points `..data` at it.
fn kubelet_update(dir: &Path, generation: u32, cert: &str, key: &str) -> TestResult<PathBuf> {
    let ts = dir.join(format!("..2026_11_25_18_00_00.{generation:09}"));
    std::fs::create_dir(&ts)?;
    std::fs::write(ts.join("tls.crt"), cert)?;
    std::fs::write(ts.join("tls.key"), key)?;
    let tmp = dir.join("..data_tmp");
    symlink(ts.file_name().ok_or("no name")?, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    Ok(ts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_secret_swap_under_load() -> TestResult {
    let ca = TestCa::new()?;
    let (cert_a, key_a, der_a) = ca.issue()?;
    let (cert_b, key_b, der_b) = ca.issue()?;
    assert_ne!(der_a, der_b);

    let dir = tempfile::tempdir()?;
    let old = kubelet_update(dir.path(), 1, &cert_a, &key_a)?;
    symlink("..data/tls.crt", dir.path().join("tls.crt"))?;
    symlink("..data/tls.key", dir.path().join("tls.key"))?;
    let server = TestServer::start(
        golden_config(),
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
    )
    .await?;

    let client = Arc::new(ca.client(server.addr)?);
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let body = admission_review(&pod, "CREATE", "uid-rotation")
        .to_string()
        .into_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let ok_new = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (client, body, stop, ok, ok_new, failed, der_b) = (
            client.clone(),
            body.clone(),
            stop.clone(),
            ok.clone(),
            ok_new.clone(),
            failed.clone(),
            der_b.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.post("/mutate", body.clone()).await {
                    Ok(reply) if reply.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if reply.server_cert == der_b {
                            ok_new.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(reply) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("status {}", reply.status));
                    }
                    Err(err) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(err.to_string());
                    }
                }
            }
            errors
        }));
    }

    // Let the load run on the first certificate (bounded wait for progress).
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while ok.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok.load(Ordering::Relaxed) >= 20, "load never got going");

    kubelet_update(dir.path(), 2, &cert_b, &key_b)?;
    std::fs::remove_dir_all(old)?;

    // Bounded poll: new connections present the new certificate.
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while ok_new.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for task in load {
        errors.extend(task.await?);
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests: {errors:?}"
    );
    assert!(
        ok_new.load(Ordering::Relaxed) >= 20,
        "the new certificate was not served within {RELOAD_DEADLINE:?}"
    );
    assert_eq!(server.store.current().cert[0], der_b);
    // A fresh connection after the swap sees exactly the new certificate.
    let reply = client.post("/mutate", body.clone()).await?;
    assert_eq!(reply.server_cert, der_b);

    // A broken update (key of another certificate) is refused; the served one stays.
    let (_, key_c, _) = ca.issue()?;
    kubelet_update(dir.path(), 3, &cert_b, &key_c)?;
    let reply = client.post("/mutate", body).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(server.store.current().cert[0], der_b);
    server.stop().await
}
