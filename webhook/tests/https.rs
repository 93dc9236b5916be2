//! The webhook over real TLS, as the kube-apiserver talks to it: certificates from a test CA,
//! the client verifies the chain and the Service name, AdmissionReviews in, JSONPatch out.

mod common;

use common::{
    TestCa, TestResult, TestServer, admission_review, data_dir, golden_config, load_yaml,
    response_patch, write_plain,
};
use serde_json::{Value, json};

async fn started() -> TestResult<(TestCa, TestServer, tempfile::TempDir)> {
    let ca = TestCa::new()?;
    let (cert, key, _) = ca.issue()?;
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = write_plain(dir.path(), &cert, &key)?;
    let server = TestServer::start(golden_config(), &cert_path, &key_path).await?;
    Ok((ca, server, dir))
}

fn body(review: &Value) -> Vec<u8> {
    review.to_string().into_bytes()
}

#[tokio::test]
async fn create_is_patched_reinvocation_and_update_are_not() -> TestResult {
    let (ca, server, _dir) = started().await?;
    let client = ca.client(server.addr)?;
    let pod = load_yaml(&data_dir().join("ueransim-gnb.yaml"))?;

    let reply = client
        .post(
            "/mutate",
            body(&admission_review(&pod, "CREATE", "uid-create")),
        )
        .await?;
    assert_eq!(reply.status, 200);
    let review = reply.json()?;
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["uid"], "uid-create");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patch = response_patch(&review)?.ok_or("CREATE must be patched")?;
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch)?;

    let inits = patched["spec"]["initContainers"]
        .as_array()
        .ok_or("no initContainers")?;
    assert_eq!(inits[0]["name"], "multus-eni-sidecar");
    assert_eq!(inits[0]["restartPolicy"], "Always");
    assert_eq!(
        inits[0]["command"],
        json!(["/usr/local/bin/multus-eni-sidecar-agent-mode"])
    );
    assert_eq!(
        inits[0]["args"],
        json!([
            "run",
            "--interfaces=n2,n3",
            "--probe-addr=$(POD_IP):9811",
            "--agent-socket=/run/multus-eni/agent.sock"
        ])
    );
    assert_eq!(inits[1], pod["spec"]["initContainers"][0]);
    // The application's containers come out byte-identical.
    assert_eq!(
        serde_json::to_vec(&patched["spec"]["containers"])?,
        serde_json::to_vec(&pod["spec"]["containers"])?
    );
    let status: Value = serde_json::from_str(
        patched["metadata"]["annotations"]["multus-eni.io/status"]
            .as_str()
            .ok_or("no status annotation")?,
    )?;
    assert_eq!(status["interfaces"], json!(["n2", "n3"]));
    assert_eq!(status["mode"], "native");

    // Reinvocation: the patched pod comes back; nothing more is added.
    let again = client
        .post(
            "/mutate",
            body(&admission_review(&patched, "CREATE", "uid-again")),
        )
        .await?;
    assert_eq!(again.status, 200);
    let again = again.json()?;
    assert_eq!(again["response"]["allowed"], true);
    assert!(response_patch(&again)?.is_none());

    // UPDATE: allowed, untouched.
    let update = client
        .post(
            "/mutate",
            body(&admission_review(&pod, "UPDATE", "uid-update")),
        )
        .await?;
    let update = update.json()?;
    assert_eq!(update["response"]["uid"], "uid-update");
    assert_eq!(update["response"]["allowed"], true);
    assert!(response_patch(&update)?.is_none());

    let metrics = server.metrics.encode()?;
    assert!(
        metrics.contains(r#"multus_eni_webhook_admissions_total{outcome="injected",reason=""} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"multus_eni_webhook_admissions_total{outcome="skipped",reason="already_injected"} 1"#
    ));
    assert!(metrics.contains(
        r#"multus_eni_webhook_admissions_total{outcome="skipped",reason="not_create"} 1"#
    ));
    server.stop().await
}

#[tokio::test]
async fn malformed_annotation_is_allowed_with_a_warning() -> TestResult {
    let (ca, server, _dir) = started().await?;
    let client = ca.client(server.addr)?;
    let pod = load_yaml(&data_dir().join("pod-malformed-annotation.yaml"))?;
    let reply = client
        .post(
            "/mutate",
            body(&admission_review(&pod, "CREATE", "uid-bad")),
        )
        .await?;
    assert_eq!(reply.status, 200);
    let review = reply.json()?;
    assert_eq!(review["response"]["allowed"], true);
    assert!(response_patch(&review)?.is_none());
    let warnings = review["response"]["warnings"]
        .as_array()
        .ok_or("no warnings")?;
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0]
            .as_str()
            .unwrap_or_default()
            .contains("k8s.v1.cni.cncf.io/networks"),
        "{warnings:?}"
    );
    server.stop().await
}

#[tokio::test]
async fn bad_bodies_get_4xx_and_the_server_keeps_serving() -> TestResult {
    let (ca, server, _dir) = started().await?;
    let client = ca.client(server.addr)?;

    let not_json = client.post("/mutate", b"{not json".to_vec()).await?;
    assert_eq!(not_json.status, 400);
    assert!(String::from_utf8_lossy(&not_json.body).contains("not JSON"));

    let no_request = client
        .post(
            "/mutate",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        )
        .await?;
    assert_eq!(no_request.status, 400);
    assert!(String::from_utf8_lossy(&no_request.body).contains("no request"));

    let wrong_kind = client
        .post("/mutate", br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec())
        .await?;
    assert_eq!(wrong_kind.status, 400);

    // Over the kube-apiserver's 3 MiB limit: a syntactically valid review with a huge field.
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let mut big = admission_review(&pod, "CREATE", "uid-big");
    big["request"]["object"]["metadata"]["annotations"]["filler"] =
        Value::String("x".repeat(3 * 1024 * 1024));
    let too_big = client.post("/mutate", body(&big)).await?;
    assert_eq!(too_big.status, 413);

    // Just under the limit is still answered.
    let mut large = admission_review(&pod, "CREATE", "uid-large");
    large["request"]["object"]["metadata"]["annotations"]["filler"] =
        Value::String("x".repeat(2 * 1024 * 1024));
    let ok = client.post("/mutate", body(&large)).await?;
    assert_eq!(ok.status, 200);
    assert!(response_patch(&ok.json()?)?.is_some());

    let not_found = client.post("/other", b"{}".to_vec()).await?;
    assert_eq!(not_found.status, 404);

    // Still serving after all of the above.
    let reply = client
        .post(
            "/mutate",
            body(&admission_review(&pod, "CREATE", "uid-after")),
        )
        .await?;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()?["response"]["uid"], "uid-after");
    let metrics = server.metrics.encode()?;
    assert!(
        metrics.contains(
            r#"multus_eni_webhook_admissions_total{outcome="rejected",reason="too_large"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"multus_eni_webhook_admissions_total{outcome="rejected",reason="bad_request"} 3"#
    ));
    server.stop().await
}

#[tokio::test]
async fn http2_is_negotiated_like_the_apiserver_does() -> TestResult {
    let (ca, server, _dir) = started().await?;
    let client = ca.h2_client(server.addr)?;
    let pod = load_yaml(&data_dir().join("free5gc-upf.yaml"))?;
    let reply = client
        .post("/mutate", body(&admission_review(&pod, "CREATE", "uid-h2")))
        .await?;
    assert_eq!(reply.protocol, common::Protocol::Http2);
    assert_eq!(reply.status, 200);
    let review = reply.json()?;
    assert_eq!(review["response"]["uid"], "uid-h2");
    assert!(response_patch(&review)?.is_some());
    // The 3 MiB limit holds over h2 too.
    let mut big = admission_review(&pod, "CREATE", "uid-h2-big");
    big["request"]["object"]["metadata"]["annotations"]["filler"] =
        Value::String("x".repeat(3 * 1024 * 1024 + 1));
    assert_eq!(client.post("/mutate", body(&big)).await?.status, 413);
    let http1 = ca
        .client(server.addr)?
        .post("/mutate", b"{}".to_vec())
        .await?;
    assert_eq!(http1.protocol, common::Protocol::Http1);
    server.stop().await
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused() -> TestResult {
    let (_ca, server, _dir) = started().await?;
    let other = TestCa::new()?;
    let client = other.client(server.addr)?;
    assert!(client.post("/mutate", b"{}".to_vec()).await.is_err());
    // What a stale caBundle looks like from the server: the client's alert, counted.
    let counted = r#"multus_eni_webhook_tls_handshake_failures_total{reason="client_rejected_certificate"} 1"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.metrics.encode()?.contains(counted) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.metrics.encode()?
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Plain HTTP on the TLS port.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    let not_tls = r#"multus_eni_webhook_tls_handshake_failures_total{reason="not_tls"} 1"#;
    while !server.metrics.encode()?.contains(not_tls) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.metrics.encode()?
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.stop().await
}
