"""The alert rules an operator applies (manifests/components/monitoring and monitoring-agent),
checked the way Prometheus would run them:

- `promtool check rules` on each PrometheusRule's groups as rendered by `kubectl kustomize`;
- `promtool test rules` with the unit tests in tests/data/alerts/*.test.yaml, where every alert
  has a series that fires it (labels and rendered annotations compared) and one that does not;
- every rule has a `for:`, every alert a severity and a summary;
- a direct-mode install (the docs' overlay plus components/monitoring) carries no agent rule,
  and the agent's rules are only in components/monitoring-agent;
- the metric names the rules read are the ones the webhook and agent export (their sources and
  docs/contract.md).

Needs promtool (Debian's `prometheus` package; scripts/setup-test-env.sh unpacks it into
.venv/bin). Without it these tests skip locally and fail under CI=true (tests/conftest.py).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_manifests import MANIFESTS, REPO, all_of, only, render

ALERT_TESTS = REPO / "tests" / "data" / "alerts"
MONITORING = MANIFESTS / "components" / "monitoring"
MONITORING_AGENT = MANIFESTS / "components" / "monitoring-agent"
# Metric families the rules may read that multus-eni does not export itself.
EXTERNAL_PREFIXES = ("kube_", "apiserver_", "up")


def promtool() -> str:
    found = shutil.which("promtool") or next(
        (str(p) for p in [REPO / ".venv" / "bin" / "promtool"] if p.is_file() and os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("promtool is not installed: run scripts/setup-test-env.sh (a failure under CI=true)")
    return found


@pytest.fixture(scope="module")
def monitoring() -> list[dict]:
    return render(MANIFESTS / "overlays" / "monitoring")


def rules_of(docs: list[dict]) -> dict[str, dict]:
    """alert name -> rule, over every PrometheusRule in the rendered docs."""
    out: dict[str, dict] = {}
    for rule_obj in all_of(docs, "PrometheusRule"):
        for group in rule_obj["spec"]["groups"]:
            for rule in group["rules"]:
                assert rule["alert"] not in out, f"alert {rule['alert']} defined twice"
                out[rule["alert"]] = rule
    return out


def write_rule_files(docs: list[dict], directory: Path) -> list[Path]:
    """Each PrometheusRule's spec as the rule file Prometheus would load
    (`<name>.rules.yaml`, the names the unit tests' rule_files use)."""
    paths = []
    for rule_obj in all_of(docs, "PrometheusRule"):
        path = directory / f"{rule_obj['metadata']['name']}.rules.yaml"
        path.write_text(yaml.safe_dump(rule_obj["spec"], sort_keys=False))
        paths.append(path)
    return paths


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)


def test_promtool_accepts_every_rule_file(monitoring, tmp_path):
    files = write_rule_files(monitoring, tmp_path)
    assert {f.name for f in files} == {"multus-eni.rules.yaml", "multus-eni-agent.rules.yaml"}
    proc = run(promtool(), "check", "rules", *map(str, files), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_can_fail(tmp_path):
    """The checker must be able to say no, or the test above proves nothing."""
    bad = tmp_path / "bad.rules.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(", "for": "1m"}]}]}))
    assert run(promtool(), "check", "rules", str(bad), cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("unit", sorted(p.name for p in ALERT_TESTS.glob("*.test.yaml")))
def test_alert_unit_tests_pass(monitoring, tmp_path, unit):
    write_rule_files(monitoring, tmp_path)
    shutil.copy(ALERT_TESTS / unit, tmp_path / unit)
    proc = run(promtool(), "test", "rules", unit, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_can_fail(monitoring, tmp_path):
    """A rule whose threshold moved makes its unit test fail: the harness compares results."""
    monitoring = copy.deepcopy(monitoring)
    for rule_obj in all_of(monitoring, "PrometheusRule"):
        for group in rule_obj["spec"]["groups"]:
            for rule in group["rules"]:
                if rule["alert"] == "MultusEniAgentAddressesPending":
                    rule["expr"] = rule["expr"].replace("> 120", "> 600")
    write_rule_files(monitoring, tmp_path)
    shutil.copy(ALERT_TESTS / "agent.test.yaml", tmp_path)
    proc = run(promtool(), "test", "rules", "agent.test.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "MultusEniAgentAddressesPending" in proc.stdout + proc.stderr


def unit_cases() -> dict[str, dict[str, int]]:
    """alert name -> {"fires": n, "silent": n} over all alert_rule_test entries."""
    cases: dict[str, dict[str, int]] = {}
    for path in ALERT_TESTS.glob("*.test.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                kind = "fires" if case.get("exp_alerts") else "silent"
                cases.setdefault(case["alertname"], {"fires": 0, "silent": 0})[kind] += 1
    return cases


def test_every_alert_has_a_firing_and_a_silent_unit_test(monitoring):
    alerts = rules_of(monitoring)
    cases = unit_cases()
    assert set(cases) <= set(alerts), f"unit tests of alerts that do not exist: {set(cases) - set(alerts)}"
    untested = {a for a in alerts if cases.get(a, {}).get("fires", 0) == 0 or cases[a]["silent"] == 0}
    assert not untested, f"alerts without a firing and a silent case in tests/data/alerts: {sorted(untested)}"


def test_every_rule_waits_and_says_what_is_wrong(monitoring):
    for name, rule in rules_of(monitoring).items():
        assert rule.get("for"), f"{name} has no `for:` (one bad scrape would page)"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), (name, rule["for"])
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert name.startswith("MultusEni"), name


def test_the_expected_alerts_exist(monitoring):
    alerts = rules_of(monitoring)
    webhook = {
        "MultusEniWebhookCertificateExpiring", "MultusEniWebhookCertificateExpiringSoon",
        "MultusEniAdmissionsFailing", "MultusEniWebhookDegraded", "MultusEniWebhookUnavailable",
        "MultusEniWebhookNotScraped", "MultusEniSidecarNotRoutable",
    }
    agent = {
        "MultusEniAgentUnavailable", "MultusEniAgentNotScraped", "MultusEniAgentThrottled",
        "MultusEniAgentAddressesPending", "MultusEniAgentSlowClaims", "MultusEniAgentReclaiming",
        "MultusEniAgentAddressConflicts", "MultusEniAgentEc2AuthFailing",
    }
    assert webhook | agent <= set(alerts), (webhook | agent) - set(alerts)
    # The certificate alerts read the webhook's own metric, so they work without cert-manager.
    for name in ("MultusEniWebhookCertificateExpiring", "MultusEniWebhookCertificateExpiringSoon"):
        assert "multus_eni_webhook_tls_cert_expiry_timestamp_seconds" in alerts[name]["expr"]
        assert "certmanager_" not in alerts[name]["expr"]
    assert "> 120" in alerts["MultusEniAgentAddressesPending"]["expr"]
    assert "histogram_quantile(0.99" in alerts["MultusEniAgentSlowClaims"]["expr"]
    assert alerts["MultusEniWebhookDegraded"]["for"] == "10m"


def is_agent_rule(rule: dict) -> bool:
    return "multus_eni_agent_" in rule["expr"] or "multus-eni-agent" in rule["expr"]


def test_agent_rules_live_only_in_the_agent_component():
    webhook_docs = [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d]
    agent_docs = [d for d in yaml.safe_load_all((MONITORING_AGENT / "prometheusrule.yaml").read_text()) if d]
    webhook_rules, agent_rules = rules_of(webhook_docs), rules_of(agent_docs)
    assert webhook_rules and agent_rules
    assert not [a for a, r in webhook_rules.items() if is_agent_rule(r) or a.startswith("MultusEniAgent")]
    assert all(is_agent_rule(r) and a.startswith("MultusEniAgent") for a, r in agent_rules.items())
    monitors = [d for d in yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text()) if d]
    assert [m["metadata"]["namespace"] for m in monitors] == ["multus-eni"]


def test_direct_mode_install_with_monitoring_has_no_agent_rules(tmp_path):
    """docs/install.md's direct-mode overlay plus components/monitoring, as an operator of a
    direct-mode install would build it: no agent DaemonSet, no agent PodMonitor, no agent rule
    (MultusEniAgentNotScraped would fire there forever)."""
    text = (REPO / "docs" / "install.md").read_text()
    [block] = re.findall(r"```yaml\n# my-multus-eni/kustomization.yaml, direct mode[^\n]*\n(.*?)```", text, re.S)
    overlay = yaml.safe_load(block)
    overlay["resources"] = [os.path.relpath(MANIFESTS, tmp_path)]
    overlay["components"] = [os.path.relpath(MONITORING, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = render(tmp_path)
    assert not all_of(docs, "DaemonSet")
    assert [m["metadata"]["name"] for m in all_of(docs, "PodMonitor")] == ["multus-eni-webhook"]
    rules = rules_of(docs)
    assert rules and not [a for a, r in rules.items() if is_agent_rule(r)]


def test_monitoring_overlay_is_the_cert_manager_install(monitoring):
    """The example monitoring overlay works with cert-manager: it carries the CA chain and the
    inject-ca-from annotation like the default install."""
    default = render(MANIFESTS)
    assert only(monitoring, "MutatingWebhookConfiguration") == only(default, "MutatingWebhookConfiguration")
    assert sorted(d["metadata"]["name"] for d in all_of(monitoring, "Certificate")) == sorted(
        d["metadata"]["name"] for d in all_of(default, "Certificate")
    )
    without = [d for d in monitoring if d["apiVersion"] != "monitoring.coreos.com/v1"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in without) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in default
    )


def exported_metrics() -> set[str]:
    """Metric names multus-eni exports: the names registered in the webhook's and the agent's
    metrics.rs, with their registry prefix."""
    names: set[str] = set()
    for crate, prefix in (("webhook", "multus_eni_webhook"), ("agent", "multus_eni_agent")):
        source = (REPO / crate / "src" / "metrics.rs").read_text()
        for name in re.findall(r'register\w*\(\s*"([a-z0-9_]+)"', source):
            names.add(f"{prefix}_{name}")
    return names


def documented_metrics() -> set[str]:
    return set(re.findall(r"\b(multus_eni_(?:agent|webhook)_[a-z0-9_]+)", (REPO / "docs" / "contract.md").read_text()))


def test_rules_read_only_metrics_that_exist(monitoring):
    """Every multus-eni metric a rule reads is registered in the code (a renamed metric would
    leave its alert silent forever) and named in docs/contract.md."""
    exported, documented = exported_metrics(), documented_metrics()
    assert "multus_eni_webhook_tls_cert_expiry_timestamp_seconds" in exported, sorted(exported)
    assert "multus_eni_agent_oldest_pending_seconds" in exported, sorted(exported)
    for name, rule in rules_of(monitoring).items():
        for metric in set(re.findall(r"\b(multus_eni_[a-z0-9_]+)", rule["expr"])):
            family = re.sub(r"_(bucket|count|sum)$", "", metric)
            registered = re.sub(r"_total$", "", family)  # prometheus-client adds _total to counters
            assert registered in exported, f"{name} reads {metric}, which the code does not register"
            assert family in documented, f"{name} reads {metric}, which docs/contract.md does not name"
