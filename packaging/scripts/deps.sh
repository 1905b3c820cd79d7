#!/usr/bin/env bash
# Install the Debian packages relaymilter needs (and, with --test, what its
# test suite starts: dovecot, redis, systemd-analyze, groff and man for the
# man pages, the libraries of the postfix package the tests unpack, and what
# building and checking the Debian package takes: the Build-Depends of
# packaging/debian/control, which include the Python modules the package
# depends on, and lintian). Idempotent; needs root.
set -euo pipefail
top="$(cd "$(dirname "$0")/../.." && pwd)"
pkgs=(sendmail-bin sendmail-cf m4 libmilter-dev libdb5.3-dev db5.3-util python3-dev python3-venv gcc file)
if [ "${1:-}" = "--test" ]; then
    # libicu72 libnsl2 libsasl2-2 libssl3: what the unpacked (never installed) postfix package links against
    pkgs+=(dovecot-pop3d dovecot-imapd redis-server redis-sentinel systemd util-linux swaks groff-base man-db adduser
           dpkg-dev lintian libicu72 libnsl2 libsasl2-2 libssl3)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
build_deps_met=yes
if [ "${1:-}" = "--test" ]; then
    # dpkg-checkbuilddeps comes with dpkg-dev: without it, nothing is checked yet.
    if ! command -v dpkg-checkbuilddeps >/dev/null || ! dpkg-checkbuilddeps "$top/packaging/debian/control" 2>/dev/null; then
        build_deps_met=no
    fi
fi
if [ ${#missing[@]} -gt 0 ] || [ "$build_deps_met" = no ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ "$build_deps_met" = no ]; then
        # apt-get build-dep reads a source tree's debian/control; ours is packaging/debian.
        tree="$(mktemp -d)"
        trap 'rm -rf "$tree"' EXIT
        ln -s "$top/packaging/debian" "$tree/debian"
        apt-get -o DPkg::Lock::Timeout=600 build-dep -y -qq --no-install-recommends "$tree" >/dev/null
    fi
fi
