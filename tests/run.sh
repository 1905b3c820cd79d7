#!/usr/bin/env bash
# Run relaymilter's whole test suite on a Debian 12 machine, as root:
#     bash tests/run.sh [pytest arguments]
# Installs what the tests need (Debian packages, a virtualenv in .venv with the
# package and its test extras), then runs pytest. This is the command README.rst
# gives and the command .ci/run runs.
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
cd "$top"
bash packaging/scripts/deps.sh --test
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
export PATH="$top/.venv/bin:$PATH"
exec python -m pytest "$@"
