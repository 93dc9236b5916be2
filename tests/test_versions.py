"""Releases: one version for the workspace, the images and the CHANGELOG, and the previous
release the version-skew tests build is really that release.

- Cargo.toml's `[workspace.package] version` is this release; every workspace crate inherits it
  and Cargo.lock agrees;
- CHANGELOG.md (Keep a Changelog) has a section for this release and for the previous one, which
  names the commit tests/conftest.py builds it from, and the commit's Cargo.toml says that version;
- docs/install.md's upgrade section points at the CHANGELOG;
- the Dockerfile passes the commit to the build (build.rs reads MULTUS_ENI_GIT_COMMIT: the build
  context has no .git), and both binaries that export multus_eni_build_info run the build script that reads it.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from conftest import PREVIOUS_RELEASE, PREVIOUS_RELEASE_COMMIT

REPO = Path(__file__).resolve().parent.parent
CHANGELOG = REPO / "CHANGELOG.md"


def workspace_version(cargo_toml: str) -> str:
    return tomllib.loads(cargo_toml)["workspace"]["package"]["version"]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def current() -> str:
    return workspace_version((REPO / "Cargo.toml").read_text())


def test_every_workspace_crate_has_the_release_version():
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if "source" not in p}
    for member in cargo["workspace"]["members"]:
        package = tomllib.loads((REPO / member / "Cargo.toml").read_text())["package"]
        assert package["version"] == {"workspace": True}, f"{member} does not inherit the workspace version"
        assert locked[package["name"]] == current(), f"Cargo.lock: {package['name']} {locked[package['name']]}"


def test_the_previous_release_commit_is_that_release():
    """The skew tests build PREVIOUS_RELEASE_COMMIT and call it PREVIOUS_RELEASE: git agrees."""
    proc = subprocess.run(
        ["git", "show", f"{PREVIOUS_RELEASE_COMMIT}:Cargo.toml"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert workspace_version(proc.stdout) == PREVIOUS_RELEASE
    assert version_tuple(PREVIOUS_RELEASE) < version_tuple(current())
    script = (REPO / "scripts" / "build-previous-sidecar.sh").read_text()
    assert f'commit="${{MULTUS_ENI_PREV_RELEASE:-{PREVIOUS_RELEASE_COMMIT}}}"' in script


def changelog_sections() -> dict[str, str]:
    text = CHANGELOG.read_text()
    parts = re.split(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 2] for i in range(1, len(parts), 3)}


def test_changelog_has_this_release_and_the_previous_one():
    sections = changelog_sections()
    assert list(sections)[:3] == ["Unreleased", current(), PREVIOUS_RELEASE], list(sections)
    assert PREVIOUS_RELEASE_COMMIT in sections[PREVIOUS_RELEASE]
    for version in (current(), PREVIOUS_RELEASE):
        body = sections[version]
        assert "### Added" in body, version
        # Each release names the sidecar protocol versions its agent accepts (docs/contract.md).
        assert re.search(r"Protocol: sidecars speak \*\*v\d\*\*; the agent accepts \*\*v\d", body), version
        assert re.search(rf"^\[{re.escape(version)}\]: https://", CHANGELOG.read_text(), re.M), version


def test_the_upgrade_section_points_at_the_changelog():
    text = (REPO / "docs" / "install.md").read_text()
    upgrade = text.split("\n## Upgrade\n", 1)[1].split("\n## ", 1)[0]
    assert "](../CHANGELOG.md)" in upgrade


def test_docker_builds_pass_the_commit_to_build_rs():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG MULTUS_ENI_GIT_COMMIT=unknown$", dockerfile, re.M)
    # An ENV instruction (its lines joined) hands the argument to cargo's build scripts.
    joined = dockerfile.replace("\\\n", " ")
    assert re.search(r"^ENV .*\bMULTUS_ENI_GIT_COMMIT=\$\{?MULTUS_ENI_GIT_COMMIT\}?", joined, re.M)
    for crate in ("webhook", "agent"):
        # One build script for both (in the build context: .dockerignore leaves it in).
        manifest = (REPO / crate / "Cargo.toml").read_text()
        script = re.search(r'^build = "([^"]+)"$', manifest, re.M)
        assert script, f"{crate}/Cargo.toml names no build script"
        build_rs = (REPO / crate / script.group(1)).read_text()
        assert "rev-parse" in build_rs and "MULTUS_ENI_GIT_COMMIT" in build_rs, crate
        metrics = (REPO / crate / "src" / "metrics.rs").read_text()
        assert 'env!("MULTUS_ENI_GIT_COMMIT")' in metrics and "git_commit" in metrics, crate
