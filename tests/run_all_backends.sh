#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process (Keras
# picks its backend at import). Extra arguments go to pytest, e.g.
#   bash tests/run_all_backends.sh -x -k merge
# Set BACKENDS="jax torch" to run a subset. Each pass lists its 15 slowest
# tests, to keep the suite's time in view.
set -u
cd "$(dirname "$0")/.."
failed=()
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=${backend} ==="
    KERAS_BACKEND="${backend}" python -m pytest -q -p no:cacheprovider --durations=15 "$@" || failed+=("${backend}")
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED on: ${failed[*]}"
    exit 1
fi
echo "All backends passed."
