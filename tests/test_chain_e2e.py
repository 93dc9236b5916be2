"""End-to-end chain: admission → patched pod → sidecar → emulated ENI (issue 4).

The real webhook binary serves TLS with the material `multus-eni-webhook certs` wrote and the
flags of the rendered Deployment; the busybox sample goes through it as an apiserver would
send it; the injected sidecar container is run exactly as the patched pod says, inside a
network namespace wired like that pod, against the EC2 emulator. The steps live in
tests/lib/chain.py, which scripts/demo.sh runs too.

Convergence is awaited by bounded polling; nothing here measures time.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lib import apiserver
from lib.chain import (
    ASSIGN4,
    NETWORKS_ANNOTATION,
    SIDECAR_CONTAINER,
    SIDECAR_IMAGE_BINARY,
    Chain,
    expand,
    flag_value,
    host_path_of,
    replace_flag,
    replicaset_pod,
)


@pytest.fixture(scope="module", params=["agent", "direct"])
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """Steps 1–2 for the whole module, once per EC2 access mode: certs written, the webhook
    serving (`agent` is the Deployment's default; `direct` is what /mutate/direct injects)."""
    c = Chain(ec2_access=request.param)
    try:
        c.generate_certs()
        c.start_webhook()
        yield c
    finally:
        failed = any(getattr(item, "rep_call", None) and item.rep_call.failed for item in request.session.items)
        if failed:
            for path in c.log_files():
                sys.stderr.write(f"--- {path}\n{path.read_text(errors='replace')[-6000:]}\n")
        c.close()
        if not failed:
            shutil.rmtree(c.workdir, ignore_errors=True)


def deployment_flag(chain: Chain, flag: str) -> str:
    """A webhook setting of the Deployment: its flag, or its `MULTUS_ENI_<FLAG>` env value."""
    container = chain.manifests.webhook_container
    value = flag_value(container["args"], flag)
    if value is None:
        env_name = "MULTUS_ENI_" + flag.removeprefix("--").upper().replace("-", "_")
        value = next((e.get("value") for e in container.get("env", []) if e["name"] == env_name), None)
    assert value is not None, f"the Deployment passes no {flag}"
    return value


# === TLS as the kube-apiserver sees it ===


def test_webhook_is_trusted_only_through_the_cabundle_under_the_service_name(chain: Chain, tmp_path: Path):
    pod = apiserver.defaulted_pod(
        {"metadata": {"name": "plain", "namespace": "multus"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    )
    ok = chain.client().review(apiserver.create_review(pod))
    assert ok.allowed and ok.patch is None, "a pod without Multus networks is left alone"
    assert ok.tls_version in ("TLSv1.2", "TLSv1.3")
    assert ok.server_name == "multus-eni-webhook.multus-eni.svc"

    # Another CA from the same command: the apiserver would refuse the serving certificate.
    other = tmp_path / "other-certs"
    subprocess.run([str(chain.webhook_binary), "certs", "--out-dir", str(other)], check=True, capture_output=True)
    stranger = apiserver.WebhookClient(
        chain.webhook_result.addr, (other / "ca.crt").read_bytes(), "multus-eni-webhook", "multus-eni"
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        stranger.review(apiserver.create_review(pod))

    # The right CA, but a name the certificate does not carry.
    ca = (chain.certs_result.out_dir / "ca.crt").read_bytes()
    misnamed = apiserver.WebhookClient(chain.webhook_result.addr, ca, "multus-eni-webhook", "default")
    with pytest.raises(ssl.SSLCertVerificationError):
        misnamed.review(apiserver.create_review(pod))


# === admission ===


def test_apiserver_gate_sends_the_sample_pod_only_where_the_configuration_says(chain: Chain):
    hook = chain.webhook_configuration()["webhooks"][0]
    pod = apiserver.defaulted_pod(replicaset_pod(chain.manifests.sample_deployment))
    opted_in = {"multus-eni.io/injection": "enabled", "kubernetes.io/metadata.name": "multus"}
    assert apiserver.reasons_not_called(hook, apiserver.create_review(pod), opted_in) == []

    not_opted_in = {"kubernetes.io/metadata.name": "multus"}
    assert apiserver.reasons_not_called(hook, apiserver.create_review(pod), not_opted_in)
    own = {"multus-eni.io/injection": "enabled", "kubernetes.io/metadata.name": "multus-eni"}
    assert apiserver.reasons_not_called(hook, apiserver.create_review(pod), own)

    host = copy.deepcopy(pod)
    host["spec"]["hostNetwork"] = True
    (reason,) = apiserver.reasons_not_called(hook, apiserver.create_review(host), opted_in)
    assert "not-host-network" in reason
    plain = copy.deepcopy(pod)
    del plain["metadata"]["annotations"][NETWORKS_ANNOTATION]
    assert apiserver.reasons_not_called(hook, apiserver.create_review(plain), opted_in)


def test_sample_pod_gets_the_native_sidecar_and_nothing_else_changes(chain: Chain):
    adm = chain.admit_sample_pod()
    pod = adm.review_request["request"]["object"]
    assert "name" not in adm.review_request["request"], "a ReplicaSet pod has no name at admission"
    assert adm.result.uid == adm.review_request["request"]["uid"]

    assert adm.sidecar_position == "initContainers[0]"
    sidecar = adm.sidecar
    assert sidecar["name"] == SIDECAR_CONTAINER
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == deployment_flag(chain, "--sidecar-image")
    # Agent mode runs the image's binary without the AWS SDK; direct mode the full one.
    assert sidecar["command"] == [SIDECAR_IMAGE_BINARY[chain.ec2_access]]
    port = int(deployment_flag(chain, "--sidecar-probe-port"))
    # The probe listens on the pod IP only (the kubelet probes it there), not on net1's address.
    expected_args = ["run", "--interfaces=net1", f"--probe-addr=$(POD_IP):{port}"]
    if chain.ec2_access == "agent":
        socket_dir = deployment_flag(chain, "--agent-socket-dir")
        expected_args.append(f"--agent-socket={socket_dir}/agent.sock")
        (mount,) = sidecar["volumeMounts"]
        assert mount["mountPath"] == socket_dir and mount["readOnly"] is True
    assert sidecar["args"] == expected_args
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    env = {e["name"]: e for e in sidecar["env"]}
    downward = {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "NODE_NAME": "spec.nodeName",
        "POD_IP": "status.podIP",
    }
    for name, path in downward.items():
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    if chain.ec2_access == "agent":
        assert not [name for name in env if name.startswith("AWS_")], "agent mode injects no AWS settings"
    else:
        region = flag_value(chain.manifests.webhook_container["args"], "--aws-region")
        assert env.get("AWS_REGION", {}).get("value") == region, "AWS_REGION exactly when the Deployment sets --aws-region"

    admitted = adm.admitted
    assert admitted["spec"]["containers"] == pod["spec"]["containers"], "the application container is untouched"
    added_volumes = [v for v in admitted["spec"]["volumes"] if v not in pod["spec"]["volumes"]]
    assert admitted["spec"]["volumes"][: len(pod["spec"]["volumes"])] == pod["spec"]["volumes"]
    if chain.ec2_access == "agent":
        (socket_volume,) = added_volumes
        assert socket_volume["hostPath"]["path"] == deployment_flag(chain, "--agent-socket-dir")
    else:
        assert added_volumes == []
    status = json.loads(admitted["metadata"]["annotations"]["multus-eni.io/status"])
    assert status["interfaces"] == ["net1"] and status["mode"] == "native"
    assert status["ec2Access"] == chain.ec2_access
    assert admitted["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"] == SIDECAR_CONTAINER

    # With reinvocationPolicy IfNeeded the apiserver may send the patched pod again: no-op.
    again = chain.client().review(apiserver.create_review(admitted))
    assert again.allowed and not again.patch


# === the whole chain ===


def test_injected_sidecar_puts_the_address_on_the_right_eni_and_releases_it(chain: Chain, require_root: None):
    if chain.admission is None:
        chain.admit_sample_pod()
    net = chain.build_network()
    chain.build_pod_namespace()
    pod = chain.schedule_pod()
    spec = chain.sidecar_spec(chain.endpoint)
    address = str(net.net1_address.ip)
    before = chain.eni_addresses()
    assert not any(state.holds(address) for state in before.values())
    if chain.ec2_access == "agent":
        chain.start_agent()
        # The agent manages every pod of its node, sidecar or not: it assigns as soon as the
        # pod's namespace appears, so the assignment is held from then on.
        chain.proxy.hold(ASSIGN4)
        chain.link_pod_namespace()

    # Exactly the injected container: the image's binary swapped, the agent's socket path
    # mapped from the node to this test's node directory, the rest verbatim.
    sidecar = chain.admission.sidecar
    injected = sidecar["command"][1:] + sidecar["args"]
    if chain.ec2_access == "agent":
        socket_path = flag_value(sidecar["args"], "--agent-socket")
        assert socket_path is not None
        node_path = host_path_of(pod["spec"], sidecar, socket_path)
        injected = replace_flag(injected, "--agent-socket", str(chain.on_node(node_path)))
        assert not [k for k in spec.env if k.startswith("AWS_")], "the sidecar runs without any AWS setting"
    assert spec.injected_env == {
        "POD_NAME": pod["metadata"]["name"],
        "POD_NAMESPACE": "multus",
        "NODE_NAME": net.node_name,
        "POD_IP": net.pod_ip,
    }
    # As the kubelet runs it: $(POD_IP) expanded, so the probe listens on the pod IP only.
    assert spec.argv[1:] == [expand(a, spec.injected_env) for a in injected]
    assert f"--probe-addr={net.pod_ip}:{spec.probe_port}" in spec.argv
    assert pod["metadata"]["name"].startswith(pod["metadata"]["generateName"])
    assert spec.run_as.uid == 65532 and spec.run_as.drop_all_capabilities and spec.run_as.no_new_privs

    s = chain.start_sidecar(spec, hold_assign=True)
    readiness = chain.await_readiness(spec)
    assert readiness.statuses == [503, 200], readiness
    # The process that became ready is the built binary the injected command names.
    running = Path(os.readlink(f"/proc/{s.proc.pid}/exe")).name
    assert running == {"agent": "multus-eni-sidecar-agent-mode", "direct": "multus-eni-sidecar"}[chain.ec2_access]
    assert readiness.held_assign_calls == 1

    after = chain.eni_addresses()
    assert after["net1"].holds(address)
    assert not after["eth0"].holds(address) and not after["other"].holds(address)
    assert chain.placement_problems(before, after) == []
    (assign,) = chain.proxy.requests(ASSIGN4)
    assert assign.param("NetworkInterfaceId") == net.enis["net1"]
    assert assign.values("PrivateIpAddress") == [address]
    assert chain.probe("/healthz") == 200

    assert chain.terminate_sidecar() == 0
    if chain.ec2_access == "direct":
        # The release happens before the process exits: no waiting.
        assert not chain.eni(net.enis["net1"]).holds(address)
    chain.await_release()
    released = chain.eni_addresses()
    assert net.world.enis[0].primary_ip in released["net1"].ipv4, "the ENI's primary IP stays"
    assert released["eth0"] == before["eth0"] and released["other"] == before["other"]
    assert released["net1"] == before["net1"]
