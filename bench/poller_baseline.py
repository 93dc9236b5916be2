"""The baseline: how the polling tools in use today behave, against the same EC2 buckets.

Each simulated pod loops forever: read its addresses (the `ip a` of those tools; here a
table the driver changes), one `DescribeNetworkInterfaces` for its ENI, and one
`AssignPrivateIpAddresses` (AllowReassignment) for what is missing; then sleep `period`
(1 s). Like those tools it never unassigns (not on address removal, not on pod deletion),
and it retries only through its next poll plus the SDK's own retries (boto3 "standard"
mode, `sdk_attempts` attempts, the AWS CLI v2 default of 3). Each pod has its own boto3
client, as each pod runs its own process. The loops run as threads inside the emulator's
namespace: the baseline's cost is in EC2 calls, which is what this measures.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from botocore.config import Config

from cluster import Emulator, Pod
from tests.lib import moto as motolib


class PollingFleet:
    """One polling loop per pod; `start()` releases them all at once, `stop()` ends them."""

    def __init__(self, emu: Emulator, endpoint: str, pods: list[Pod], period: float = 1.0, sdk_attempts: int = 3):
        self.emu = emu
        self.endpoint = endpoint
        self.pods = pods
        self.period = period
        self.sdk_attempts = sdk_attempts
        self._lock = threading.Lock()
        self._desired: dict[int, set[str]] = {p.index: set(p.addresses) for p in pods}
        self._go = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self.client_errors = 0

    def set_addresses(self, pod: Pod, addresses: set[str]) -> None:
        """What the pod's `ip a` shows from now on."""
        with self._lock:
            self._desired[pod.index] = set(addresses)

    def prepare(self) -> None:
        """Starts the threads and builds their clients; they wait for `start()`."""
        for pod in self.pods:
            self._threads.append(self.emu.ns.thread(lambda pod=pod: self._loop(pod), name=f"poller-{pod.index}"))
        for _ in self.pods:
            self._ready.acquire()

    def start(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(15)

    def _client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "ec2",
            region_name=motolib.REGION,
            endpoint_url=self.endpoint,
            config=Config(
                retries={"mode": "standard", "max_attempts": self.sdk_attempts},
                connect_timeout=3,
                read_timeout=10,
                max_pool_connections=1,
            ),
            **motolib.CREDENTIALS,
        )

    def _loop(self, pod: Pod) -> None:
        try:
            ec2 = self._client()
        finally:
            self._ready.release()
        self._go.wait()
        # The pods of a rollout start within the same second, not in lockstep.
        if self._stop.wait(random.uniform(0, self.period)):
            return
        while not self._stop.is_set():
            with self._lock:
                wanted = set(self._desired[pod.index])
            try:
                out = ec2.describe_network_interfaces(
                    Filters=[{"Name": "mac-address", "Values": [pod.eni.mac]}]
                )["NetworkInterfaces"]
                if out:
                    eni = out[0]
                    held = {p["PrivateIpAddress"] for p in eni.get("PrivateIpAddresses", [])}
                    missing = sorted(wanted - held)
                    if missing:
                        ec2.assign_private_ip_addresses(
                            NetworkInterfaceId=eni["NetworkInterfaceId"],
                            PrivateIpAddresses=missing,
                            AllowReassignment=True,
                        )
            except Exception:  # throttled or failed: the next poll tries again
                with self._lock:
                    self.client_errors += 1
            self._stop.wait(self.period)
