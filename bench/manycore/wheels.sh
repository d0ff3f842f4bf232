#!/bin/sh
# Here, in the repository's root, before the many-core run (README.md beside this): the CPython
# 3.12 x86-64 wheels that machine lacks, into .whl/ (git ignores it), at the versions this
# checkout's .venv runs. Over there numpy, aiohttp, psutil and uvloop are installed already.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
rm -rf .whl
pins=$(.venv/bin/python -m pip freeze | grep -i -E '^(aiortc|av|aioice|pyee|pylibsrtp|cryptography|pyopenssl|cffi|pycparser|google-crc32c|dnspython|ifaddr|grpcio|grpcio-health-checking|grpcio-reflection|grpcio-status|googleapis-common-protos|protobuf|prometheus[-_]client|cython)==')
# setuptools too: setup.py's pyproject.toml needs 77 or later, and pip freeze leaves it out.
pins="$pins setuptools==$(.venv/bin/python -c 'import setuptools; print(setuptools.__version__)')"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    -d .whl $pins
ls .whl
du -sh .whl
