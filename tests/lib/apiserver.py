"""The kube-apiserver's side of a mutating admission webhook call, for tests and the demo.

What the apiserver does before and around the HTTPS call, reduced to what the webhook can
observe: the Pod as it arrives at mutating admission (built-in defaulting and the
ServiceAccount admission plugin already applied, no name yet when the controller asked for a
generated one), the AdmissionReview v1 envelope, and the call itself — TLS 1.2+ with the
webhook configuration's `caBundle` as the only trust root, the Service's DNS name
`<service>.<namespace>.svc` as server name, `POST <path>?timeout=<timeoutSeconds>s`. The answer
is checked the way the apiserver checks it (envelope, uid echo, `patchType: JSONPatch`,
base64 patch) before the patch is handed back.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import http.client
import json
import secrets
import socket
import ssl
import uuid
from typing import Any

ADMISSION_API = "admission.k8s.io/v1"

# The identity the ReplicaSet controller creates pods with.
REPLICASET_CONTROLLER = {
    "username": "system:serviceaccount:kube-system:replicaset-controller",
    "uid": "5f1c7d4e-3b1a-4c1e-9f0e-2d6a1b7c8e90",
    "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
}

# Alphabet of Kubernetes' generated name suffixes and hashes (k8s.io/apimachinery util/rand).
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class AdmissionError(AssertionError):
    """The webhook's answer is one the kube-apiserver would reject (or the call failed)."""


@dataclasses.dataclass
class AdmissionResult:
    """A checked AdmissionReview response."""

    uid: str
    allowed: bool
    patch: list[dict[str, Any]] | None
    warnings: list[str]
    review: dict[str, Any]  # the whole response body
    tls_version: str
    server_name: str
    path: str


# === the Pod as mutating admission sees it ===


def generated_suffix(length: int = 5) -> str:
    """Random suffix like the apiserver's `generateName` (`busybox-5d8f9-x7k2q`)."""
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(length))


def defaulted_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """`pod` with what the apiserver adds before mutating webhooks run: API defaults and the
    ServiceAccount plugin's token volume. A webhook must cope with these, so send them."""
    pod = copy.deepcopy(pod)
    spec = pod.setdefault("spec", {})
    for key, value in {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "serviceAccountName": "default",
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
    }.items():
        spec.setdefault(key, value)
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault(
        "tolerations",
        [
            {"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            for t in ("not-ready", "unreachable")
        ],
    )
    token_volume = f"kube-api-access-{generated_suffix()}"
    if spec.get("automountServiceAccountToken", True):
        spec.setdefault("volumes", []).append(
            {
                "name": token_volume,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                    }
                                ]
                            }
                        },
                    ],
                },
            }
        )
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind, []):
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("imagePullPolicy", "IfNotPresent")
            if spec.get("automountServiceAccountToken", True):
                c.setdefault("volumeMounts", []).append(
                    {
                        "name": token_volume,
                        "readOnly": True,
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    }
                )
    return pod


def create_review(pod: dict[str, Any], user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The AdmissionReview v1 the apiserver sends for `POST /api/v1/namespaces/NS/pods`."""
    meta = pod.get("metadata", {})
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "namespace": meta.get("namespace", ""),
        "operation": "CREATE",
        "userInfo": user or REPLICASET_CONTROLLER,
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    # Empty when the name is still to be generated (`generateName`): the apiserver names the
    # pod after admission, so the webhook never sees it.
    if meta.get("name"):
        request["name"] = meta["name"]
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "request": request}


# === whether the apiserver calls the webhook at all ===


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector over `labels` (an empty selector matches everything)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _rule_matches(rule: dict[str, Any], request: dict[str, Any]) -> bool:
    def has(field: str, value: str) -> bool:
        allowed = rule.get(field) or []
        return "*" in allowed or value in allowed

    gvr = request["resource"]
    return (
        has("operations", request["operation"])
        and has("apiGroups", gvr["group"])
        and has("apiVersions", gvr["version"])
        and has("resources", gvr["resource"])
    )


def reasons_not_called(hook: dict[str, Any], review: dict[str, Any], namespace_labels: dict[str, str]) -> list[str]:
    """Why the apiserver would not send `review` to `hook` (empty: it would): rules,
    namespaceSelector, objectSelector and the CEL matchConditions, as the apiserver checks
    them. A matchCondition that errors is reported too (the apiserver would apply
    failurePolicy)."""
    import celpy  # cel-python, pinned in tests/requirements.txt

    request = review["request"]
    obj = request["object"]
    reasons = []
    if not any(_rule_matches(r, request) for r in hook.get("rules") or []):
        reasons.append(f"no rule matches {request['operation']} {request['resource']}")
    if not label_selector_matches(hook.get("namespaceSelector") or {}, namespace_labels):
        reasons.append(f"namespaceSelector does not select namespace labels {namespace_labels}")
    if not label_selector_matches(hook.get("objectSelector") or {}, obj["metadata"].get("labels") or {}):
        reasons.append("objectSelector does not select the pod")
    env = celpy.Environment()
    activation = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(None),
        "request": celpy.json_to_cel({k: v for k, v in request.items() if k not in ("object", "oldObject")}),
    }
    for condition in hook.get("matchConditions") or []:
        try:
            value = env.program(env.compile(condition["expression"])).evaluate(activation)
        except Exception as e:  # noqa: BLE001 - any CEL failure is a reason
            reasons.append(f"matchCondition {condition['name']} failed: {e}")
            continue
        if not isinstance(value, celpy.celtypes.BoolType):
            reasons.append(f"matchCondition {condition['name']} gave {value!r}, not a bool")
        elif not value:
            reasons.append(f"matchCondition {condition['name']} is false")
    return reasons


# === the HTTPS call ===


class WebhookClient:
    """Calls one webhook of a MutatingWebhookConfiguration like the kube-apiserver.

    `connect_to` is where the Service would route (here a loopback address and port); the
    TLS server name and the `Host` header are the Service's DNS name, and only `ca_bundle`
    (PEM) is trusted — no system roots.
    """

    def __init__(
        self,
        connect_to: tuple[str, int],
        ca_bundle: bytes,
        service: str,
        namespace: str,
        path: str = "/mutate",
        service_port: int = 443,
        timeout_seconds: int = 10,
        io_timeout: float = 60.0,
    ):
        self.connect_to = connect_to
        self.server_name = f"{service}.{namespace}.svc"
        self.service_port = service_port
        self.path = path
        self.timeout_seconds = timeout_seconds
        # The apiserver gives up after timeoutSeconds; this process only needs a bound that
        # never fires on a busy test machine, so the socket timeout is far larger.
        self.io_timeout = io_timeout
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name, no roots
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=ca_bundle.decode("ascii"))
        ctx.set_alpn_protocols(["http/1.1"])
        self.context = ctx

    @classmethod
    def for_configuration(
        cls, configuration: dict[str, Any], connect_to: tuple[str, int], webhook_index: int = 0
    ) -> "WebhookClient":
        """A client for `webhooks[webhook_index]` of a MutatingWebhookConfiguration whose
        `clientConfig.caBundle` is set (base64 PEM, as after the caBundle patch)."""
        hook = configuration["webhooks"][webhook_index]
        client_config = hook["clientConfig"]
        if "caBundle" not in client_config:
            raise AdmissionError(f"webhook {hook['name']} has no caBundle: the apiserver could not verify it")
        svc = client_config["service"]
        return cls(
            connect_to,
            base64.b64decode(client_config["caBundle"]),
            svc["name"],
            svc["namespace"],
            path=svc.get("path", "/"),
            service_port=svc.get("port", 443),
            timeout_seconds=hook.get("timeoutSeconds", 10),
        )

    def post(self, body: bytes) -> tuple[int, bytes, str]:
        """One HTTPS POST; returns (status, body, negotiated TLS version)."""
        raw = socket.create_connection(self.connect_to, timeout=self.io_timeout)
        try:
            tls = self.context.wrap_socket(raw, server_hostname=self.server_name)
        except BaseException:
            raw.close()
            raise
        conn = http.client.HTTPConnection(self.server_name, self.service_port, timeout=self.io_timeout)
        conn.sock = tls
        try:
            conn.request(
                "POST",
                f"{self.path}?timeout={self.timeout_seconds}s",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/json, */*",
                    "User-Agent": "kube-apiserver-admission",
                },
            )
            resp = conn.getresponse()
            return resp.status, resp.read(), tls.version() or ""
        finally:
            conn.close()

    def review(self, review: dict[str, Any]) -> AdmissionResult:
        """Sends `review` and checks the answer as the apiserver does."""
        status, body, version = self.post(json.dumps(review).encode())
        if status != 200:
            raise AdmissionError(f"webhook answered HTTP {status}: {body[:500]!r}")
        try:
            answer = json.loads(body)
        except ValueError as e:
            raise AdmissionError(f"webhook answered non-JSON: {body[:200]!r}") from e
        if answer.get("apiVersion") != ADMISSION_API or answer.get("kind") != "AdmissionReview":
            raise AdmissionError(
                f"expected {ADMISSION_API} AdmissionReview, got {answer.get('apiVersion')} {answer.get('kind')}"
            )
        response = answer.get("response")
        if not isinstance(response, dict):
            raise AdmissionError("webhook response was absent")
        want_uid = review["request"]["uid"]
        if response.get("uid") != want_uid:
            raise AdmissionError(f"expected response.uid={want_uid!r}, got {response.get('uid')!r}")
        patch = None
        if response.get("patch") is not None:
            if response.get("patchType") != "JSONPatch":
                raise AdmissionError(f"expected patchType JSONPatch, got {response.get('patchType')!r}")
            try:
                patch = json.loads(base64.b64decode(response["patch"], validate=True))
            except ValueError as e:
                raise AdmissionError(f"patch is not base64 JSON: {e}") from e
            if not isinstance(patch, list):
                raise AdmissionError("patch is not a JSON Patch array")
        elif response.get("patchType") is not None:
            raise AdmissionError("patchType without patch")
        return AdmissionResult(
            uid=response["uid"],
            allowed=bool(response.get("allowed")),
            patch=patch,
            warnings=list(response.get("warnings") or []),
            review=answer,
            tls_version=version,
            server_name=self.server_name,
            path=self.path,
        )
