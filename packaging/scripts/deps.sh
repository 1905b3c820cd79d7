#!/usr/bin/env bash
# Install the Debian packages relaymilter needs (and, with --test, what its
# test suite starts: dovecot, redis, systemd-analyze, groff and man for the
# man pages, adduser for the .deb). Idempotent; needs root.
set -euo pipefail
pkgs=(sendmail-bin sendmail-cf m4 libmilter-dev libdb5.3-dev db5.3-util python3-dev python3-venv gcc file)
if [ "${1:-}" = "--test" ]; then
    pkgs+=(dovecot-pop3d dovecot-imapd redis-server redis-sentinel systemd util-linux swaks groff-base man-db adduser)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
