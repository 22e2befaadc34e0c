#!/usr/bin/env bash
# Build the sdist and wheel of host and of every plugin (as `python -m build` does for PyPI, without
# build isolation: setuptools comes from the venv) from a copy of its source, check that each wheel
# and sdist carries LICENSE, and run `twine check --strict` on all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
copy() {  # copy a project's files, leaving out build products and caches
  mkdir -p "$2"
  tar -C "$1" --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ --exclude=.venv \
      --exclude=results --exclude=outputs -cf - "${@:3}" | tar -C "$2" -xf -
}
copy . "$work/src/host" pyproject.toml README.md LICENSE host
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] && copy "$dir" "$work/src/$(basename "$dir")" .
done
for src in "$work"/src/*/; do
  if ! "$PY" -m build --no-isolation --outdir "$work/dist" "$src" > "$work/log" 2>&1; then
    cat "$work/log"; echo "check-packaging: building $(basename "$src") failed" >&2; exit 1
  fi
done
"$PY" - "$work/dist" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path
missing = []
for f in sorted(Path(sys.argv[1]).iterdir()):
    names = zipfile.ZipFile(f).namelist() if f.suffix == ".whl" else tarfile.open(f).getnames()
    if not any(n.endswith("/LICENSE") or n.endswith("licenses/LICENSE") for n in names):
        missing.append(f.name)
if missing:
    sys.exit(f"check-packaging: no LICENSE in {', '.join(missing)}")
print(f"check-packaging: {len(list(Path(sys.argv[1]).iterdir()))} files built, each with LICENSE")
PY
"$PY" -m twine check --strict "$work"/dist/*
