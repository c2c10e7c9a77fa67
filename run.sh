#!/usr/bin/env bash
# One command to set up and run recfb on a fresh machine (Python 3.11 + pip).
#   ./run.sh main          set up, then the main job on the bundled default (recfb demo)
#   ./run.sh test [ARGS]   set up, then the test suite (ARGS go to pytest)
# Set-up is a .venv in this directory; torch is pinned to the local 2.13.0 CPU build first,
# so that nothing pulls a multi-GB CUDA build. It is redone when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

python_bin() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"
      return
    fi
  done
  echo "recfb needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
}

setup() {
  if [ -x .venv/bin/recfb ] && [ .venv/.installed -nt pyproject.toml ]; then
    return
  fi
  echo "setting up .venv (first run: about 2 minutes) ..." >&2
  "$(python_bin)" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2> >(grep -v "is ignored" >&2)
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train,serve,cpu,postgres,ray,s3,dev,bench]' 2> >(grep -v "is ignored" >&2)
  touch .venv/.installed
}

cmd="${1:-}"
shift || true
case "$cmd" in
  main)
    setup
    exec .venv/bin/recfb demo "$@"
    ;;
  test)
    setup
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh main | test [pytest args]" >&2
    exit 2
    ;;
esac
