#!/usr/bin/env bash
# Install relaymilter from this checkout and start the milter on the bundled
# default rules (inet:8894@127.0.0.1), in the foreground. As root on Debian 12:
#     bash packaging/quickstart.sh
# Installs the Debian packages it needs, a virtualenv in /opt/relaymilter with
# the package, links the commands into /usr/local/bin, creates ~/etc (the
# classic home of relayers.db and spammers), then runs `relaymilter`.
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
bash "$top/packaging/scripts/deps.sh"
prefix=${RELAYMILTER_PREFIX:-/opt/relaymilter}
python=${PYTHON:-python3}
[ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix"
"$prefix/bin/python" -m pip install -q --upgrade pip >/dev/null
"$prefix/bin/python" -m pip install -q "$top"
for cmd in relaymilter vsmtprelay vnewspammers relaymilter-popwatch relaymilter-test relaymilter-mirror relaymilter-guard; do
    ln -sf "$prefix/bin/$cmd" "/usr/local/bin/$cmd"
done
mkdir -p "$HOME/etc"
"$prefix/bin/relaymilter" --check-config
exec "$prefix/bin/relaymilter" "$@"
