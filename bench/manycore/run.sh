#!/bin/sh
# On the many-core machine, in the repository's root, with .whl/ (wheels.sh) and relay_server/api
# (the generated gRPC stubs) carried: install the wheels, build the Cython hot path with the
# carried Cython, run the capacity sweep with loopback processors (one relay process, then
# `serve --workers 8`), and leave its report under $OUT. Sized for one command of under 10
# minutes: one 8 s window per count. COUNTS=...: other counts.
set -eu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 setup.py -q build_ext --inplace
python3 -c 'import relay_server._fast.planes as p, relay_server.api; print("hot path:", p.__file__)'
echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo || true)"
python3 -m bench.capacity --processor loopback --workers 1 --workers 8 \
    --counts "${COUNTS:-4,8,12,16,24,32,48}" --windows 1 --seconds 8
cp bench/results/capacity.md bench/results/capacity.json "${OUT:-/tmp}/"
