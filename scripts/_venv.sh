# Sourced by the scripts: make .venv with Python 3.11+ and install Carina into it.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Carina needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
target="."
[ -n "${CARINA_EXTRAS:-}" ] && target=".[${CARINA_EXTRAS}]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"
