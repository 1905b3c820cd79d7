#!/usr/bin/env bash
# Build a Debian package of relaymilter from this checkout, on Debian 12:
#     bash packaging/debian/build-deb.sh [OUTDIR]
# writes OUTDIR/relaymilter_VERSION-REVISION_ARCH.deb (OUTDIR defaults to
# dist/ in the checkout) and prints its path. Install it with
#     dpkg -i dist/relaymilter_*.deb
#
# What it does: a virtualenv made with Debian's own /usr/bin/python3 (never a
# pyenv or other private interpreter: the package depends on Debian's
# python3.X) is built in a staging tree at /usr/lib/relaymilter, and pip
# installs relaymilter and its dependencies into it (pymilter and berkeleydb
# compile against libmilter-dev and libdb5.3-dev; pip keeps the built wheels
# in its cache, so later builds are quick). The venv is made relocatable
# (script headers, bytecode paths), then the commands are linked into
# /usr/bin and the systemd units, the cron file, the configuration, the man
# pages and the MTA snippets are added, and dpkg-deb builds the package.
# Depends: are worked out from the shared libraries the compiled modules
# link against (dpkg -S), plus the interpreter, adduser and
# init-system-helpers.
#
# Environment: PYTHON (default /usr/bin/python3), DEB_REVISION (default 1),
# DEBFULLNAME / DEBEMAIL (the Maintainer field), and pip's own variables
# (PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 for a build from local wheels only).
# Needs: python3-venv python3-dev gcc libmilter-dev libdb5.3-dev (it says
# which are missing); root is not required (dpkg-deb --root-owner-group).
set -euo pipefail

top="$(cd "$(dirname "$0")/../.." && pwd)"
here="$top/packaging/debian"
outdir="${1:-$top/dist}"
prefix=/usr/lib/relaymilter

die() { echo "build-deb.sh: error: $*" >&2; exit 1; }

# What the build itself needs (not sendmail nor postfix: build on a mail
# server of either kind, or elsewhere).
build_deps=(python3-venv python3-dev gcc libmilter-dev libdb5.3-dev dpkg)
missing=()
for pkg in "${build_deps[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] || die "missing build packages: apt-get install ${missing[*]}"

python="$(readlink -f "${PYTHON:-/usr/bin/python3}")"
[ -x "$python" ] || die "no Python interpreter at ${PYTHON:-/usr/bin/python3}"
# The venv runs on the target with this very interpreter: it must come from
# a Debian package, or the .deb would depend on a file no package provides.
dpkg -S "$python" >/dev/null 2>&1 || die "$python does not belong to a Debian package (want /usr/bin/python3: apt-get install python3-venv python3-dev)"
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$python" -c 'import venv, ensurepip' 2>/dev/null || die "$python lacks venv/ensurepip: apt-get install python3-venv"

version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/milter/relaymilter/__init__.py")"
[ -n "$version" ] || die "cannot read __version__ from milter/relaymilter/__init__.py"
debversion="$version-${DEB_REVISION:-1}"
arch="$(dpkg --print-architecture)"
maintainer="${DEBFULLNAME:-relaymilter maintainers} <${DEBEMAIL:-postmaster@localhost}>"

umask 022
work="$(mktemp -d /tmp/relaymilter-deb.XXXXXX)"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
venv="$stage$prefix"
mkdir -p "$stage"

# --- the virtualenv -----------------------------------------------------------
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-compile --no-warn-script-location --use-pep517 "$top[redis]"
"$venv/bin/python" -m pip uninstall -q -y pip setuptools
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$venv" -name direct_url.json -delete
# The commands are relaymilter's console scripts, as installed (setup.cfg).
mapfile -t commands < <(PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c '
from importlib.metadata import distribution
for ep in distribution("relaymilter").entry_points:
    if ep.group == "console_scripts":
        print(ep.name)' | sort)
[ "${#commands[@]}" -gt 0 ] || die "relaymilter installed no commands"
for script in "$venv"/bin/*; do
    [ -f "$script" ] && [ ! -L "$script" ] || continue
    sed -i "1s|^#!$venv/bin/python.*\$|#!$prefix/bin/python|" "$script"
done
for cmd in "${commands[@]}"; do
    [ -f "$venv/bin/$cmd" ] || die "pip did not install the command $cmd"
done
sed -i "s|$stage||g" "$venv/pyvenv.cfg"

# Byte-compile with the installed paths (a .pyc records its source file).
"$venv/bin/python" -B -m compileall -q -s "$stage" -p / "$venv/lib" >/dev/null
if grep -rlF "$work" "$stage" >/dev/null; then
    die "the staging path leaked into: $(grep -rlF "$work" "$stage" | head -3 | tr '\n' ' ')"
fi

# --- files around it ----------------------------------------------------------
install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/relaymilter" "$stage/etc/cron.d" \
    "$stage/usr/share/relaymilter/sendmail" "$stage/usr/share/relaymilter/postfix" \
    "$stage/usr/share/doc/relaymilter" "$stage/usr/share/man/man1" "$stage/usr/share/man/man5" \
    "$stage/usr/share/man/man8"
for cmd in "${commands[@]}"; do
    ln -s "../lib/relaymilter/bin/$cmd" "$stage/usr/bin/$cmd"
done
install -m 0644 "$top"/packaging/systemd/*.service "$top"/packaging/systemd/*.timer "$stage/lib/systemd/system/"
install -m 0644 "$top/packaging/cron/relaymilter" "$stage/etc/cron.d/relaymilter"
"$python" "$here/system-config.py" "$top/rules/relaymilter.sample.yaml" "$stage/etc/relaymilter/relaymilter.yaml"
chmod 0644 "$stage/etc/relaymilter/relaymilter.yaml"
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m relaymilter.cli.milter \
    -c "$stage/etc/relaymilter/relaymilter.yaml" --check-config >/dev/null
install -m 0644 "$here/spammers" "$stage/etc/relaymilter/spammers"
install -m 0644 "$top/packaging/sendmail/relaymilter.m4" "$top/packaging/sendmail/sendmail.mc.sample" \
    "$stage/usr/share/relaymilter/sendmail/"
install -m 0644 "$top/packaging/postfix/main.cf.snippet" "$top/packaging/postfix/README.postfix" \
    "$stage/usr/share/relaymilter/postfix/"
rules="$(cd "$venv" && echo lib/python*/site-packages/relaymilter/rules)"
[ -f "$venv/$rules/default.yaml" ] || die "the bundled rules are missing from the venv ($rules)"
ln -s "../../lib/relaymilter/$rules" "$stage/usr/share/relaymilter/rules"
install -m 0644 "$here/copyright" "$stage/usr/share/doc/relaymilter/copyright"
gzip -9n -c "$top/README.rst" > "$stage/usr/share/doc/relaymilter/README.rst.gz"
for page in "$top"/packaging/man/*.[158]; do
    section="${page##*.}"
    # The page footer names the version being packaged.
    sed '1s/"relaymilter [^"]*"/"relaymilter '"$version"'"/' "$page" | gzip -9n \
        > "$stage/usr/share/man/man$section/$(basename "$page").gz"
done

# --- control files ------------------------------------------------------------
# Depends: the packages of the shared libraries the compiled modules need.
libpkgs=()
while read -r lib; do
    pkg=""
    for candidate in "$lib" "$(readlink -f "$lib")" "${lib#/usr}" "/usr$lib"; do
        pkg="$(dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1)" && [ -n "$pkg" ] && break
    done
    [ -n "$pkg" ] || die "no Debian package provides $lib (needed by a compiled module)"
    libpkgs+=("$pkg")
done < <(find "$venv" -name '*.so' -exec ldd {} + 2>/dev/null \
         | sed -n 's/^\s*[^ ]* => \(\/[^ ]*\) .*/\1/p; s/^\s*\(\/[^ ]*\) (.*/\1/p' \
         | grep -v "^$venv" | sort -u)
depends="$(printf '%s\n' "python$pyver" adduser init-system-helpers "${libpkgs[@]}" | sort -u | paste -sd, - | sed 's/,/, /g')"
installed_size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"

mkdir -p "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<EOF
Package: relaymilter
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Suggests: sendmail-bin | postfix, dovecot-pop3d | dovecot-imapd, rsyslog
Section: mail
Priority: optional
Description: relay-control milter for sendmail and Postfix (POP-before-SMTP)
 relaymilter decides every RCPT TO the way sendmail's check_rcpt does: mail
 to local and relay domains is accepted, and relaying is allowed for trusted
 networks, SMTP AUTH users and clients that recently logged in by POP or
 IMAP (relayers.db, a Berkeley DB map that sendmail and Postfix also read).
 Everything else gets 550 5.7.1 Relaying denied.
 .
 The package holds the milter (relaymilter.service), the log watcher that
 records POP/IMAP logins (relaymilter-popwatch), the classic vsmtprelay and
 vnewspammers commands, a milter test client, systemd units and timers, a
 cron file, and the sendmail and Postfix snippets. Python and its modules
 live in a private virtual environment in $prefix.
EOF
printf '%s\n' /etc/relaymilter/relaymilter.yaml /etc/relaymilter/spammers /etc/cron.d/relaymilter \
    > "$stage/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)

mkdir -p "$outdir"
deb="$outdir/relaymilter_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
