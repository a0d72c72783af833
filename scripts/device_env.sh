#!/usr/bin/env bash
# Python packages for a lent GPU machine that has torch (and timm) but none of our other
# dependencies, and no network.
#
#   scripts/device_env.sh prepare   # here, with network to PyPI: wheels into .whl/ (git-ignored)
#   scripts/device_env.sh install   # there: unpack them into /tmp/site; then
#   export PYTHONPATH=/tmp/site:$(pwd)
#
# The GPU machine runs Python 3.12 (cp312 wheels); DeepSpeed is built here as a pure wheel (its
# CPU-only shm op is dropped there: it is a cp311 extension, and NCCL replaces it on GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
SITE=${SITE:-/tmp/site}
PY_TAG=${PY_TAG:-3.12}

case "${1:-}" in
  prepare)
    mkdir -p "$WHL"
    python3 -m pip download -q --python-version "$PY_TAG" --implementation cp \
      --platform manylinux_2_17_x86_64 --only-binary=:all: --no-deps -d "$WHL" \
      omegaconf==2.4.0 hjson pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection
    if ! ls "$WHL"/deepspeed-*.whl >/dev/null 2>&1; then
      .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHL"
    fi
    ls -1 "$WHL"
    ;;
  install)
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
      $(ls "$WHL"/*.whl | grep -v deepspeed) 2>&1 | tail -2
    # unpacked, not installed: pip would refuse the cp311 tag of the locally built wheel
    (cd "$SITE" && python3 -m zipfile -e "$OLDPWD"/"$WHL"/deepspeed-*.whl . && rm -f deepspeed/ops/comm/*.so)
    echo "installed into $SITE: export PYTHONPATH=$SITE:$(pwd)"
    ;;
  *)
    echo "usage: $0 prepare|install" >&2
    exit 2
    ;;
esac
