"""The body of scripts/demo.sh: the chain of tests/test_chain_e2e.py (same steps, from
tests/lib/chain.py), told for a newcomer. Exit 0 when every link held, 1 otherwise; the
processes' logs stay in a temp directory that is printed only on failure."""

from __future__ import annotations

import shutil
import signal
import sys
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lib.chain import ASSIGN4, Chain, check  # noqa: E402


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, title: str) -> None:
    say(f"\n== {n}. {title}")


def indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + line if line else line for line in text.rstrip("\n").splitlines())


def addresses(chain: Chain, title: str) -> dict:
    states = chain.eni_addresses()
    net = chain.network
    say(f"   ENI addresses {title}:")
    for role in ("eth0", "net1", "other"):
        label = {"eth0": "primary ENI (eth0)", "net1": "Multus ENI (net1)", "other": "other ENI, same subnet"}[role]
        say(f"     {net.enis[role]:<22} {label:<24} {', '.join(sorted(states[role].ipv4))}")
    return states


def run(chain: Chain) -> None:
    step(1, "TLS material: multus-eni-webhook certs")
    certs = chain.generate_certs()
    say(f"   {certs.stderr.splitlines()[0]}")
    say(f"   wrote {', '.join(sorted(p.name for p in certs.out_dir.iterdir()))} (a temp dir, removed at the end)")
    say(f"   Secret {certs.secret['metadata']['namespace']}/{certs.secret['metadata']['name']} "
        "mounted like the kubelet does (..data symlinks)")

    step(2, "webhook: the Deployment's flags, only addresses and the Secret path substituted")
    hook = chain.start_webhook()
    say(indent(" ".join(["multus-eni-webhook", *hook.argv[1:]])))
    say(f"   /readyz 200 on 127.0.0.1:{hook.metrics_port}")

    step(3, "admission: the busybox sample's pod, as the ReplicaSet controller creates it")
    adm = chain.admit_sample_pod()
    req = adm.review_request["request"]
    obj = req["object"]
    client = chain.client()
    say(f"   pod {obj['metadata']['namespace']}/{obj['metadata']['generateName']}… "
        f"networks={obj['metadata']['annotations']['k8s.v1.cni.cncf.io/networks']}")
    hook = chain.webhook_configuration()["webhooks"][0]
    say(f"   the apiserver calls {hook['name']}: rules, namespaceSelector and "
        f"{len(hook.get('matchConditions') or [])} CEL matchConditions all match")
    say(f"   POST https://{client.server_name}{client.path}?timeout={client.timeout_seconds}s "
        f"({adm.result.tls_version}, trusting only the caBundle patch's CA)")
    say(f"   → allowed, uid echoed, JSONPatch with {len(adm.result.patch)} operations "
        f"({', '.join(sorted({op['path'] for op in adm.result.patch}))})")
    say(f"   injected sidecar ({adm.sidecar_position}):")
    say(indent(yaml.safe_dump(adm.sidecar, sort_keys=False), "     "))

    step(4, "the node and the pod: emulated VPC (moto) and two network namespaces")
    net = chain.build_network()
    chain.build_pod_namespace()
    pod = chain.schedule_pod()
    say(f"   VPC subnet {net.world.subnet_cidr}, instance {net.world.instance_id} = node {net.node_name}")
    say(f"   pod {pod['metadata']['namespace']}/{pod['metadata']['name']} bound to the node")
    say(f"   eth0  MAC {net.world.eth0.mac}  {net.pod_ip}/32 (VPC CNI style; EC2 reached through it)")
    net1_mac = next(e.mac for e in net.world.enis if e.id == net.enis["net1"])
    say(f"   net1  MAC {net1_mac}  {net.net1_address}  (whereabouts' first address {net.nad_address} of "
        f"{net.nad_range}, same offset in the emulated subnet)")
    before = addresses(chain, "before")

    step(5, "node agent: the DaemonSet's flags, in the node's network namespace (hostNetwork)")
    chain.start_agent()
    # The agent manages every pod of its node: it assigns as soon as the pod's namespace appears,
    # so the Assign is held from then on (to show the sidecar's 503 before it).
    assert chain.proxy is not None
    chain.proxy.hold(ASSIGN4)
    chain.link_pod_namespace()
    say(indent(" ".join(["multus-eni-agent", *chain.agent_argv[1:]])))
    say(f"   /readyz 200 on 127.0.0.1:{chain.agent_metrics_port}; it alone holds AWS settings "
        f"(AWS_REGION, dummy credentials, AWS_ENDPOINT_URL_EC2={chain.endpoint}: the node role's, on a node)")

    step(6, "sidecar: the injected command, args and env, exactly (the socket's node path mapped)")
    spec = chain.sidecar_spec(chain.endpoint)
    say(indent(" ".join([Path(spec.argv[0]).name, *spec.argv[1:]])))
    say(f"   env from the pod: {', '.join(f'{k}={v}' for k, v in spec.injected_env.items())}")
    say("   no AWS setting at all: it claims its addresses over the agent's socket")
    say(f"   as uid {spec.run_as.uid}, gid {spec.run_as.gid}, no capabilities (the injected securityContext)")
    chain.start_sidecar(spec, hold_assign=True)
    say(f"   the agent's EC2 {ASSIGN4} held at the emulator for a moment …")
    readiness = chain.await_readiness(spec)
    say(f"   {spec.probe_path} on :{spec.probe_port} (the startupProbe's port): "
        + " → ".join(str(s) for s in readiness.statuses))
    after = addresses(chain, "with the sidecar running")
    problems = chain.placement_problems(before, after)
    check(not problems, "; ".join(problems))
    say(f"   {net.net1_address.ip} is on net1's ENI only")

    step(7, "pod deletion: SIGTERM to the sidecar, then the pod's network namespace goes; the agent unassigns")
    code = chain.terminate_sidecar()
    check(code == 0, f"the sidecar exited with {code}")
    say(f"   exit code {code}")
    chain.await_release()
    released = addresses(chain, "after release")
    check(not released["net1"].holds(str(net.net1_address.ip)), f"{net.net1_address.ip} is still on net1's ENI")
    check(released == before, "the ENIs did not return to their state before the pod")
    say(f"   {net.net1_address.ip} released; every ENI back to its state before the pod")


def main() -> int:
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chain, ok = None, False
    try:
        chain = Chain()
        run(chain)
        ok = True
    except AssertionError as e:  # a ChainError, or a bounded wait that ran out
        say(f"\nFAILED: {e}")
    except Exception as e:  # any other broken link ends the demo too, with its traceback
        say(f"\nFAILED: {e!r}")
        traceback.print_exc()
    finally:
        if chain is not None:
            chain.close()
            if ok:
                shutil.rmtree(chain.workdir, ignore_errors=True)
            else:
                say(f"logs (webhook, sidecar, EC2 emulator): {chain.logs}")
    if not ok:
        return 1
    say("\n== cleanup: processes stopped, network namespaces deleted, temp files removed")
    say("The chain works: admission → sidecar → node agent → IP on the right ENI → released on exit.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
