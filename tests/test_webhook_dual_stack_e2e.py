"""The webhook as the shipped Deployment runs it, over IPv6 and IPv4 (IPv6-only EKS; issue 21
item 6): the built binary with exactly the Deployment's arguments and env (only the TLS
directory moved to this test's certificates) in a network namespace of its own, called like the
kube-apiserver calls it (TLS with the configuration's caBundle, the Service's DNS name, an
AdmissionReview) on `[::1]` through every entry of the rendered MutatingWebhookConfiguration,
and on `127.0.0.1` through the same `[::]` listener. The kubelet's probes (`/readyz`,
`/healthz` on the metrics port) answer on `[::1]` too.

Root (network namespaces) and the built webhook (target/debug or $MULTUS_ENI_BIN_DIR).
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import subprocess
import time
import tomllib

import pytest

from lib.apiserver import WebhookClient, create_review
from lib.netns import NetNS
from test_manifests import BIN_DIR, MANIFESTS, REPO, flags, only, port_of, render, webhook_container

TLS_DIR = "/etc/multus-eni/tls"


def http_get(host: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def http_body(host: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def wait_ready(ns: NetNS, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the webhook exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            if ns.call(http_get, "::1", port, "/readyz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("the webhook never became ready on [::1]")


def multus_pod() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "busybox-deployment-7c9f8d5b6-",
            "namespace": "multus",
            "annotations": {"k8s.v1.cni.cncf.io/networks": "ipvlan-multus"},
        },
        "spec": {"containers": [{"name": "busybox", "image": "busybox:1.36", "command": ["sleep", "infinity"]}]},
    }


def test_the_webhook_answers_on_ipv6_loopback_with_its_deployments_flags(tmp_path):
    webhook = BIN_DIR / "multus-eni-webhook"
    assert webhook.is_file(), f"{webhook} is missing: cargo build -p multus-eni-webhook"
    certs = tmp_path / "certs"
    proc = subprocess.run([str(webhook), "certs", "--out-dir", str(certs)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr

    docs = render(MANIFESTS)
    container = webhook_container(docs)
    args = [a.replace(TLS_DIR, str(certs)) for a in container["args"]]
    served = flags({"args": args})
    assert served["addr"].startswith("[::]:") and served["metrics-addr"].startswith("[::]:"), served
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    https_port, metrics_port = port_of(served["addr"]), port_of(served["metrics-addr"])

    configuration = copy.deepcopy(only(docs, "MutatingWebhookConfiguration"))
    ca_bundle = base64.b64encode((certs / "ca.crt").read_bytes()).decode()
    for hook in configuration["webhooks"]:
        hook["clientConfig"]["caBundle"] = ca_bundle

    with NetNS() as ns:
        server = subprocess.Popen(
            ns.exec_argv([str(webhook), *args]),
            env={"PATH": os.environ["PATH"], **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_ready(ns, metrics_port, server)
            assert ns.call(http_get, "::1", metrics_port, "/healthz") == 200
            for index, hook in enumerate(configuration["webhooks"]):
                for address in ("::1", "127.0.0.1"):
                    client = WebhookClient.for_configuration(configuration, (address, https_port), index)
                    result = ns.call(client.review, create_review(multus_pod()))
                    assert result.allowed, (hook["name"], address)
                    added = [op for op in result.patch or [] if op["path"] == "/spec/initContainers"]
                    assert added and added[0]["value"][0]["name"] == "multus-eni-sidecar", (hook["name"], address, result.patch)
                    assert added[0]["value"][0]["image"] == env["MULTUS_ENI_SIDECAR_IMAGE"]
            # The metrics listener takes IPv4 as well (Prometheus in an IPv4 cluster), and names
            # the release and the commit it was built from.
            assert ns.call(http_get, "127.0.0.1", metrics_port, "/readyz") == 200
            metrics = ns.call(http_body, "::1", metrics_port, "/metrics")
            version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
            assert re.search(
                rf'^multus_eni_build_info{{component="webhook",version="{re.escape(version)}",git_commit="([0-9a-f]{{7,}}|unknown)"}} 1$',
                metrics,
                re.M,
            ), [line for line in metrics.splitlines() if "build_info" in line]
        finally:
            # Not SIGTERM: the drain (--shutdown-delay, 10 s) is tests/lifecycle.rs's subject.
            server.kill()
            server.wait()
    # The log names where it listened: both families on one socket, not a fallback.
    log = server.stderr.read() if server.stderr else ""
    assert "no IPv6" not in log, log
    assert any('"addr":"[::]:' in line and "serving /mutate" in line for line in log.splitlines()), log
