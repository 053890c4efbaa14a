# Sourced by scripts/demo and scripts/test: make .venv with Python 3.11+ and install the project.
# Installs Debian's python3-venv first when the interpreter cannot make a venv (fresh Debian).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq; _APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "Please install: $* (Debian packages), then run this again." >&2
    exit 1
  fi
}

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || {
  echo "Python 3.11 or newer is needed (found: $("$PY" --version 2>&1))." >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; "$PY" -m venv .venv; }
fi
VENV_PY="$ROOT/.venv/bin/python"
PIP_LOG="$(mktemp)"
trap 'rm -f "$PIP_LOG"' EXIT
"$VENV_PY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
