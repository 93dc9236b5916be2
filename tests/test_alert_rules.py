"""The alert rules an operator applies (manifests/components/monitoring and monitoring-agent),
checked the way Prometheus would run them:

- `promtool check rules` on each PrometheusRule's groups as rendered by `kubectl kustomize`;
- `promtool test rules` with the unit tests in tests/data/alerts/*.test.yaml, where every alert
  has a series that fires it (labels and rendered annotations compared) and one that does not;
- every rule has a `for:`, every alert a severity and a summary;
- a direct-mode install (the docs' overlay plus components/monitoring) carries no agent rule,
  and the agent's rules are only in components/monitoring-agent;
- the metric names the rules read are the ones the webhook and agent export (their sources and
  docs/contract.md);
- a rule that names webhook entries fires for every entry of the rendered
  MutatingWebhookConfiguration (a new entry that a rule misses fails here);
- every rule has a `runbook_url` whose anchor is a heading of docs/install.md;
- every sidecar rule that reads an init container's series (native mode) also reads the regular
  container's (legacy mode);
- the kube-prometheus-stack overlay in docs/install.md labels the monitoring objects only.

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
    # A node without a ready agent blocks every new Multus pod there: that pages.
    assert alerts["MultusEniAgentUnavailable"]["labels"]["severity"] == "critical"
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


# === every webhook entry ===

# Series whose `name` label is a MutatingWebhookConfiguration entry (the API server's metrics).
ENTRY_METRIC = re.compile(r"\b(apiserver_admission_webhook_[a-z_]+)\b")


def webhook_entries() -> list[str]:
    """The entry names an operator's API server reports, from the rendered default install."""
    names = [hook["name"] for hook in only(render(MANIFESTS), "MutatingWebhookConfiguration")["webhooks"]]
    assert len(names) >= 4, names
    return names


def entry_rules(docs: list[dict]) -> dict[str, dict]:
    return {a: r for a, r in rules_of(docs).items() if ENTRY_METRIC.search(r["expr"])}


def entry_unit_test(alert: str, rule: dict, entry: str) -> dict:
    """A promtool test where only `entry` fails (one call a minute) and `alert` must fire.
    Annotations are left out: this checks which series the rule selects, not its text."""
    [metric] = set(ENTRY_METRIC.findall(rule["expr"]))
    labels = {"severity": rule["labels"]["severity"]}
    grouped = re.search(r"by \(([^)]*)\)", rule["expr"])
    if grouped and "name" in [g.strip() for g in grouped.group(1).split(",")]:
        labels["name"] = entry
    return {
        "rule_files": ["entries.rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{
                "series": f'{metric}{{name="{entry}",type="admit",operation="CREATE",'
                          f'error_type="calling_webhook_error",rejection_code="500"}}',
                "values": "0+1x60",
            }],
            "alert_rule_test": [{"eval_time": "40m", "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}],
        }],
    }


def run_entry_test(alert: str, rule: dict, entry: str, directory: Path) -> subprocess.CompletedProcess:
    bare = {k: v for k, v in rule.items() if k != "annotations"}
    (directory / "entries.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "entries", "rules": [bare]}]}))
    (directory / "entries.test.yaml").write_text(yaml.safe_dump(entry_unit_test(alert, rule, entry)))
    return run(promtool(), "test", "rules", "entries.test.yaml", cwd=directory)


def test_rules_naming_webhook_entries_fire_for_every_entry(monitoring, tmp_path):
    """The entry names come from the rendered MutatingWebhookConfiguration, so an entry added
    there and missed by a rule's `name` matcher fails here (the gate entries once were)."""
    rules = entry_rules(monitoring)
    assert "MultusEniAdmissionsFailing" in rules, sorted(rules)
    entries = webhook_entries()
    assert {"inject-gate.multus-eni.io", "inject-gate-label.multus-eni.io"} <= set(entries)
    for alert, rule in rules.items():
        for entry in entries:
            proc = run_entry_test(alert, rule, entry, tmp_path)
            assert proc.returncode == 0, f"{alert} misses webhook entry {entry}:\n{proc.stdout}{proc.stderr}"


def test_entry_coverage_check_can_fail(monitoring, tmp_path):
    """The matcher this rule had before the gate entries were counted fails the check above."""
    rule = copy.deepcopy(entry_rules(monitoring)["MultusEniAdmissionsFailing"])
    rule["expr"] = re.sub(r'name=~"[^"]*"', r'name=~"inject(-direct)?\\\\.multus-eni\\\\.io"', rule["expr"])
    assert run_entry_test("MultusEniAdmissionsFailing", rule, "inject.multus-eni.io", tmp_path).returncode == 0
    assert run_entry_test("MultusEniAdmissionsFailing", rule, "inject-gate.multus-eni.io", tmp_path).returncode != 0


# === runbooks ===

RUNBOOK_BASE = "https://github.com/multus-eni/multus-eni/blob/main/docs/install.md#"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens (so `Agent mode → direct mode` is `agent-mode--direct-mode`)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def install_md_anchors() -> set[str]:
    text = re.sub(r"```.*?```", "", (REPO / "docs" / "install.md").read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_github_anchor_model():
    assert github_anchor("Agent mode → direct mode") == "agent-mode--direct-mode"
    assert github_anchor("Direct mode (`--ec2-access direct`, or namespaces labelled `multus-eni.io/ec2-access=direct`)") == (
        "direct-mode---ec2-access-direct-or-namespaces-labelled-multus-eniioec2-accessdirect"
    )
    assert github_anchor("MultusEniAdmissionsFailing") == "multuseniadmissionsfailing"


def test_every_rule_links_a_runbook_in_install_md(monitoring):
    """runbook_url on every rule (Alertmanager templates and Grafana show it), pointing at the
    heading of docs/install.md that says what to do, and that heading exists."""
    anchors = install_md_anchors()
    for name, rule in rules_of(monitoring).items():
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), f"{name}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchor in anchors, f"{name}: docs/install.md has no heading for #{anchor}"


def test_install_md_links_only_to_its_own_headings():
    """Every `(#anchor)` link inside docs/install.md lands on a heading (a renamed heading broke
    two of them once)."""
    text = (REPO / "docs" / "install.md").read_text()
    anchors = install_md_anchors()
    broken = sorted({a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors})
    assert not broken, f"docs/install.md links to missing headings: {broken}"


# === legacy-mode sidecars ===


def test_sidecar_rules_cover_legacy_mode_sidecars(monitoring):
    """A native sidecar is an init container, a legacy one (--sidecar-mode legacy) a regular
    container: kube-state-metrics reports them in different series, and a rule reading only
    the init container's would be blind to every legacy-mode pod."""
    sidecar_rules = {a: r for a, r in rules_of(monitoring).items() if "multus-eni-sidecar" in r["expr"]}
    assert {"MultusEniSidecarNotRoutable", "MultusEniSidecarRestarting"} <= set(sidecar_rules)
    for name, rule in sidecar_rules.items():
        for series in set(re.findall(r"kube_pod_init_container_(\w+)", rule["expr"])):
            assert f"kube_pod_container_{series}" in rule["expr"], f"{name}: no legacy-mode kube_pod_container_{series}"


# === kube-prometheus-stack ===


def test_kube_prometheus_stack_overlay_in_docs_labels_only_the_monitoring_objects(tmp_path):
    """kube-prometheus-stack's Prometheus selects PodMonitors and PrometheusRules by the Helm
    release's `release` label by default; the docs' overlay adds it to those objects alone
    (labels on Deployments or Services would be harmless, in selectors they would not)."""
    text = (REPO / "docs" / "install.md").read_text()
    [block] = re.findall(r"```yaml\n# my-multus-eni/kustomization.yaml, kube-prometheus-stack\n(.*?)```", text, re.S)
    overlay = yaml.safe_load(block)
    prefix = "../multus-eni/manifests"
    overlay["resources"] = [os.path.relpath(MANIFESTS / r.removeprefix(prefix).lstrip("/"), tmp_path) for r in overlay["resources"]]
    overlay["components"] = [os.path.relpath(MANIFESTS / c.removeprefix(prefix).lstrip("/"), tmp_path) for c in overlay.get("components", [])]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = render(tmp_path)
    monitoring_kinds = {"PodMonitor", "PrometheusRule"}
    labelled = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"].get("labels", {}).get("release")}
    expected = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in monitoring_kinds}
    assert expected and labelled == expected, (labelled, expected)
    for monitor in all_of(docs, "PodMonitor"):
        assert "release" not in monitor["spec"]["selector"].get("matchLabels", {}), monitor["metadata"]["name"]
