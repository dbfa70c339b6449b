# Sourced by scripts/test.sh and scripts/demo.sh: makes a fresh machine ready, then activates .venv.
#  - Debian packages the speech data needs (espeak-ng, fortunes), installed when missing;
#  - .venv created when missing, the package installed editable with all extras, again whenever pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
[ -d /usr/share/games/fortunes ] || need_apt+=(fortunes)
if ((${#need_apt[@]})); then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.polyformer-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import polyformer" 2>/dev/null; then
  echo "bootstrap: installing polyformer with extras [all,dev] (torch comes from the local wheel cache when present)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[all,dev]"
  echo "$want" > "$stamp"
fi
export MPLBACKEND=Agg
