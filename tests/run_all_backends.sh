#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process (Keras
# picks its backend at import). Extra arguments go to pytest, e.g.
#   bash tests/run_all_backends.sh -x -k merge
# Set BACKENDS="jax torch" to run a subset. Each pass lists its 15 slowest
# tests, to keep the suite's time in view, and runs its test files on
# PYTEST_WORKERS processes (pytest-xdist, default 2; 1 runs them in this
# one): the suite is mostly single-threaded Python and subprocess start-up,
# and two workers took a torch pass from 969 s to 578 s on 2 cores.
set -u
cd "$(dirname "$0")/.."
failed=()
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=${backend} ==="
    KERAS_BACKEND="${backend}" python -m pytest -q -p no:cacheprovider --durations=15 \
        -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" || failed+=("${backend}")
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED on: ${failed[*]}"
    exit 1
fi
echo "All backends passed."
