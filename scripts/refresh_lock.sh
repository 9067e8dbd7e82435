#!/usr/bin/env bash
# Move the lock forward: resolve every dependency of pyproject.toml (all extras but `vision`) to its
# newest release, install exactly that, lint, and run the whole suite. Commit constraints/lock.txt
# only when this ends green; a red run shows which new release broke what, before anyone else sees it.
#
#   scripts/refresh_lock.sh            # newest releases
#   scripts/refresh_lock.sh --check    # re-resolve without upgrading: fails if the lock is stale
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet "uv>=0.5"

# torch stays on the CPU build of constraints/torch-cpu.txt; a GPU user installs from pyproject.toml's
# ranges instead and keeps their CUDA torch. `vision` (torchvision) is left out: PyPI's torchvision
# does not import beside the CPU torch here.
compile=(uv pip compile pyproject.toml --extra dev --extra ray --extra train --extra gpu --extra bench
         --python-version 3.11 --find-links /opt/wheels -c constraints/torch-cpu.txt --no-header)

if [[ "${1:-}" == "--check" ]]; then
    # uv keeps the versions an output file already pins, so this moves only what pyproject.toml forces.
    resolved="$(mktemp)"
    trap 'rm -f "$resolved"' EXIT
    cp constraints/lock.txt "$resolved"
    "${compile[@]}" -o "$resolved" >/dev/null 2>&1
    diff -u <(grep -v '^#' constraints/lock.txt) <(grep -v '^#' "$resolved") \
        && echo "constraints/lock.txt is what pyproject.toml resolves to"
    exit
fi

{
    echo "# Every dependency of taskvec (runtime and the dev, ray, train, gpu and bench extras) at the"
    echo "# version the suite last passed with. Made by scripts/refresh_lock.sh; do not edit by hand."
    echo "# pip install -c constraints/lock.txt -e \".[dev]\""
    "${compile[@]}" --upgrade 2>/dev/null
} >constraints/lock.txt.new
mv constraints/lock.txt.new constraints/lock.txt

python -m pip install --quiet -c constraints/lock.txt -e ".[dev]"
ruff check src tests bench scripts
mypy
python -m pytest -q -p no:cacheprovider
git --no-pager diff --stat constraints/lock.txt
