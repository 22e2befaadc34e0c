"""Every distribution (host and each plugins/*) is ready to publish, by the same rules.

A new plugin folder is checked as soon as it has a pyproject.toml; scripts/check-packaging.sh then
builds each one and runs twine check (CI runs both).
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))
#: Dependencies whose bounds must be the same in every distribution that names them (the host's).
SHARED = ("torch", "transformers", "peft", "triton")


def _project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def _requirements(project: dict) -> dict[str, Requirement]:
    return {(r := Requirement(d)).name.lower(): r for d in project["project"].get("dependencies", [])}


HOST = _project(ROOT)
HOST_VERSION = Version(HOST["project"]["version"])
HOST_REQS = _requirements(HOST)


def test_root_license_is_apache():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert HOST["project"]["license"] == "Apache-2.0"


@pytest.mark.parametrize("where", [ROOT, *PLUGINS], ids=lambda p: p.name if p != ROOT else "host")
def test_metadata_complete(where):
    project = _project(where)
    meta = project["project"]
    assert meta.get("license") == "Apache-2.0", "license = \"Apache-2.0\" (an SPDX expression)"
    assert "LICENSE" in meta.get("license-files", []), 'license-files = ["LICENSE"]'
    assert (where / "LICENSE").read_text() == (ROOT / "LICENSE").read_text(), "LICENSE must be the root's copy"
    assert meta.get("readme") and (where / meta["readme"]).is_file(), "readme = \"README.md\""
    assert meta.get("classifiers"), "classifiers"
    assert {"Homepage", "Source"} <= set(meta.get("urls", {})), "[project.urls] Homepage and Source"
    assert meta.get("urls", {}).get("Source") == HOST["project"]["urls"]["Source"], "the host's Source URL"
    assert "version" in meta and "version" not in meta.get("dynamic", []), "a static version in pyproject.toml"
    setuptools = [Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools and all(s.specifier.contains("77") for s in setuptools), "setuptools>=77 (license expressions)"


@pytest.mark.parametrize("where", [ROOT, *PLUGINS], ids=lambda p: p.name if p != ROOT else "host")
def test_shared_dependency_bounds_match_the_host(where):
    reqs = _requirements(_project(where))
    for name in SHARED:
        if name in reqs:
            assert str(reqs[name]) == str(HOST_REQS[name]), f"{name}: use the host's bounds {HOST_REQS[name]}"
    triton = reqs.get("triton")
    if triton is not None:
        assert triton.marker is not None and "linux" in str(triton.marker).lower(), "triton only on Linux"


@pytest.mark.parametrize("where", PLUGINS, ids=lambda p: p.name)
def test_plugin_pins_a_compatible_host_range(where):
    project = _project(where)
    reqs = _requirements(project)
    host = reqs.get("host")
    assert host is not None and str(host.specifier), "depend on host with a version range"
    expected = f"<{HOST_VERSION.major}.{HOST_VERSION.minor + 1},>={HOST_VERSION.major}.{HOST_VERSION.minor}"
    assert str(host.specifier) == expected, f"host{expected}: the host release line it was written against"
    for name, req in reqs.items():
        if name.startswith("host-plugin-"):
            dep = ROOT / "plugins" / name.removeprefix("host-plugin-").replace("-", "_")
            assert req.specifier and req.specifier.contains(_project(dep)["project"]["version"]), f"{name} range"


@pytest.mark.parametrize("where", PLUGINS, ids=lambda p: p.name)
def test_plugin_version_in_one_place(where):
    meta = _project(where)["project"]
    module = meta["entry-points"]["host.plugins"]
    assert list(module.values()) == [f"host_plugin_{where.name}"], "one entry point, module host_plugin_<folder>"
    for source in (where / f"host_plugin_{where.name}").rglob("*.py"):
        assert not re.search(r"^__version__\s*=\s*['\"]", source.read_text(), re.M), (
            f"{source}: read the version with importlib.metadata, it lives in pyproject.toml only"
        )
