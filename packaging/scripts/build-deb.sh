#!/usr/bin/env bash
# Build relaymilter's Debian package from this checkout, on Debian 12:
#     bash packaging/scripts/build-deb.sh [OUTDIR]
# writes OUTDIR/relaymilter_VERSION_all.deb (with its .buildinfo and
# .changes; OUTDIR defaults to dist/ in the checkout) and prints the .deb's
# path. Install it with `apt-get install ./dist/relaymilter_*.deb`.
#
# The build is Debian's own: dpkg-buildpackage -us -uc -b on the debian/
# source directory, which lives in packaging/debian (the top level of the
# tree holds only setup.cfg, milter/, rules/, tests/, packaging/ and
# README.rst). This script copies the tracked files of the checkout into a
# temporary directory, places packaging/debian there as debian/, and runs
# dpkg-buildpackage in it, so the checkout gets no build products and the
# .deb lands in OUTDIR rather than in the checkout's parent.
#
# Needs the Build-Depends of packaging/debian/control (`dpkg-checkbuilddeps`
# names what is missing; packaging/scripts/deps.sh --test installs them);
# root is not required (Rules-Requires-Root: no). Extra arguments go to
# dpkg-buildpackage (e.g. -Pnocheck). Environment: DEB_VERSION overrides
# the version of packaging/debian/changelog for this build (an entry is
# added in the copy; the installed-package tests use it for an upgrade).
set -euo pipefail

top="$(cd "$(dirname "$0")/../.." && pwd)"
outdir="${1:-$top/dist}"
shift || true
die() { echo "build-deb.sh: error: $*" >&2; exit 1; }

command -v dpkg-buildpackage >/dev/null || die "dpkg-buildpackage is missing: apt-get install dpkg-dev (or bash packaging/scripts/deps.sh --test)"
unmet="$(dpkg-checkbuilddeps "$top/packaging/debian/control" 2>&1)" \
    || die "${unmet#dpkg-checkbuilddeps: error: } (bash packaging/scripts/deps.sh --test installs them)"

work="$(mktemp -d /tmp/relaymilter-deb.XXXXXX)"
trap 'rm -rf "$work"' EXIT
src="$work/relaymilter"
mkdir -p "$src"
# The files git tracks or would add: ignored ones (.venv, caches, dist/) never reach the package.
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --no-recursion --ignore-failed-read -T - -cf -) | tar -xf - -C "$src"
else
    cp -a "$top/." "$src/"
    rm -rf "$src/.venv" "$src/dist" "$src/debian"
fi
rm -rf "$src/debian"
cp -a "$top/packaging/debian" "$src/debian"

if [ -n "${DEB_VERSION:-}" ]; then
    old="$(cat "$src/debian/changelog")"
    {
        printf 'relaymilter (%s) unstable; urgency=medium\n\n  * Rebuild as %s.\n\n' "$DEB_VERSION" "$DEB_VERSION"
        printf ' -- %s  %s\n\n' "$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$src/debian/changelog" | head -1)" "$(date -R)"
        printf '%s\n' "$old"
    } > "$src/debian/changelog"
fi

# Debian's python3 builds it, whatever interpreter or virtualenv the caller has on PATH.
(cd "$src" && env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u PYTHONUSERBASE PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b "$@") > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; die "dpkg-buildpackage failed (last lines above)"; }

mkdir -p "$outdir"
debs=("$work"/relaymilter_*_all.deb)
[ -f "${debs[0]}" ] || die "dpkg-buildpackage made no .deb"
mv "$work"/relaymilter_*.deb "$work"/relaymilter_*.buildinfo "$work"/relaymilter_*.changes "$outdir/"
echo "$outdir/$(basename "${debs[0]}")"
