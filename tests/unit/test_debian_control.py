"""The Debian packaging agrees with setup.cfg, relaymilter.pydeps and README.

Adding a Python dependency touches three places (README, "Adding a Python
dependency"): install_requires in setup.cfg, Build-Depends in
packaging/debian/control (dh_python3 derives the package's Depends from
install_requires, through dh-python's own table of Debian names or
packaging/debian/py3dist-overrides), and a row in relaymilter.pydeps. These
tests fail, naming the missing piece, when one is forgotten. The changelog's
version follows relaymilter.__version__, and README's build line installs
every Build-Depends.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from relaymilter import __version__, pydeps

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging" / "debian"
DH_PYTHON_NAMES = Path("/usr/share/dh-python/dist/cpython3_fallback")
# Build-Depends entries that are build machinery and the packages that provide them.
PROVIDERS = {"debhelper-compat": "debhelper", "dh-sequence-python3": "dh-python"}


def build_depends() -> list[str]:
    text = (DEBIAN / "control").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    field = re.search(r"^Build-Depends:(.*?)(?=^\S)", text, re.M | re.S).group(1)
    names = [re.split(r"[\s(\[<]", item.strip(), maxsplit=1)[0] for item in field.split(",")]
    return [n for n in names if n]


def install_requires() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0]
            for line in cfg["options"]["install_requires"].strip().splitlines()]


def debian_names() -> dict[str, str]:
    """Python distribution name (normalised) -> Debian package, as dh_python3 maps them."""
    if not DH_PYTHON_NAMES.is_file():
        pytest.fail("%s is missing: apt-get install dh-python (packaging/scripts/deps.sh --test)" % DH_PYTHON_NAMES)
    names = {}
    for path in (DH_PYTHON_NAMES, DEBIAN / "py3dist-overrides"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                dist, package = line.split()[:2]
                names[normalise(dist)] = package
    return names


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def test_every_requirement_has_a_debian_package_in_build_depends():
    names = debian_names()
    build = set(build_depends())
    for dist in install_requires():
        package = names.get(normalise(dist))
        assert package, ("dh_python3 knows no Debian package for %s: add a line '%s python3-...' to "
                         "packaging/debian/py3dist-overrides" % (dist, dist))
        assert package in build, "add %s (for %s) to Build-Depends in packaging/debian/control" % (package, dist)


def test_every_requirement_has_a_pydeps_row():
    pips = {normalise(m.pip) for m in pydeps.MODULES.values()}
    for dist in install_requires():
        assert normalise(dist) in pips, "give %s a row in relaymilter/pydeps.py (MODULES)" % dist
    names = debian_names()
    for module in pydeps.MODULES.values():
        assert names.get(normalise(module.pip)) == module.debian, module


def test_changelog_version_is_the_package_version():
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"relaymilter \(([^)-]+)-(\d+)\) \S+; urgency=\w+$", first)
    assert match, first
    assert match.group(1) == __version__, "add a packaging/debian/changelog entry for %s" % __version__


def test_readme_build_line_installs_every_build_dependency():
    readme = (ROOT / "README.rst").read_text()
    block = re.search(r"^    apt-get install dpkg-dev (.*?)\n    bash packaging/scripts/build-deb.sh", readme,
                      re.M | re.S)
    assert block, "README lost its package build commands"
    listed = set(block.group(1).replace("\\", " ").split())
    for name in build_depends():
        assert PROVIDERS.get(name, name) in listed, "README's build line lacks %s" % PROVIDERS.get(name, name)


def test_console_scripts_are_the_entry_commands(monkeypatch):
    from relaymilter.cli import entry

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.strip().split(" = ")
                   for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == set(entry.COMMANDS)
    called = []
    monkeypatch.setattr(entry, "run", lambda prog: called.append(prog) or 0)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module == "relaymilter.cli.entry"
        getattr(entry, func)()
        assert called[-1] == name, (name, target)


def test_quickstart_links_every_command():
    from relaymilter.cli import entry

    text = (ROOT / "packaging" / "quickstart.sh").read_text()
    linked = re.search(r"^for cmd in (.*); do$", text, re.M).group(1).split()
    assert sorted(linked) == sorted(entry.COMMANDS)
