#!/usr/bin/env bash
# Every test, from the repo's own files: each plugin alone (only host + that plugin + its declared
# plugin dependencies installed), then the host's tests with every plugin installed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_INTERPRET=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"
PYTEST=("$BIN/python" -m pytest -q -p no:cacheprovider --import-mode=importlib)

# plugin folder -> plugin folders it depends on (read from its pyproject's host-plugin-* deps)
deps_of() {
  "$BIN/python" - "$1" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(f"plugins/{sys.argv[1]}/pyproject.toml", "rb"))["project"].get("dependencies", [])
print(" ".join(m.group(1).replace("-", "_") for d in deps if (m := re.match(r"host-plugin-([a-z0-9-]+)", d))))
PY
}

echo "=== packaging: build every distribution, twine check"
bash scripts/check-packaging.sh

all=()
for dir in plugins/*/; do
  p=$(basename "$dir")
  [ -f "plugins/$p/pyproject.toml" ] || continue
  all+=("$p")
  need=($(deps_of "$p") "$p")
  echo "=== plugin $p (installed: host ${need[*]})"
  installed=$("$BIN/pip" list --format=freeze 2>/dev/null | grep -oE '^host-plugin-[a-z0-9-]+' || true)
  [ -n "$installed" ] && "$BIN/pip" uninstall -q -y $installed
  for n in "${need[@]}"; do "$BIN/pip" install -q -e "plugins/$n"; done
  "${PYTEST[@]}" "plugins/$p/tests" --rootdir "plugins/$p"
done

echo "=== host and end-to-end tests (installed: host ${all[*]:-})"
for n in "${all[@]}"; do "$BIN/pip" install -q --no-deps -e "plugins/$n"; done
"${PYTEST[@]}" tests "$@"
