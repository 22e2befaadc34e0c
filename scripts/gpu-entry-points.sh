#!/usr/bin/env bash
# On the GPU image (old setuptools, no registry) `pip install -e` of host and its plugins can fail; this
# writes minimal .dist-info folders into $1 (a PYTHONPATH dir) so importlib.metadata finds host's pytest11
# plugin and each plugin's host.plugins entry point, with the repo on PYTHONPATH for the code itself.
set -euo pipefail
site=${1:-/tmp/site}
python3 - "$site" <<'PY'
import pathlib, sys, tomllib
site = pathlib.Path(sys.argv[1])
for pp in [pathlib.Path("pyproject.toml"), *sorted(pathlib.Path("plugins").glob("*/pyproject.toml"))]:
    proj = tomllib.loads(pp.read_text())["project"]
    name, version = proj["name"], proj.get("version", "0")
    if "version" in proj.get("dynamic", []):
        version = "0.0.0"
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = proj.get("entry-points", {})
    lines = []
    for group, items in eps.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in items.items()]
    if proj.get("scripts"):
        lines.append("[console_scripts]")
        lines += [f"{k} = {v}" for k, v in proj["scripts"].items()]
    (d / "entry_points.txt").write_text("\n".join(lines) + "\n")
    print("registered", name, version)
PY
