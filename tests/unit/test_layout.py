"""The package layout rules: who may import pymilter, and that pymilter's own modules still win."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import milter  # pymilter's C extension, not our source root

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "milter" / "relaymilter"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_import_milter_is_pymilters_extension():
    assert milter.__file__.endswith(".so"), milter.__file__
    assert hasattr(milter, "setreply") or hasattr(milter, "register")
    assert not (ROOT / "milter" / "__init__.py").exists()


def test_only_the_adapter_imports_pymilter():
    importers = sorted(
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if {"Milter", "milter"} & {m.split(".")[0] for m in imported_modules(p)}
    )
    assert importers == ["adapter.py"]


def test_harness_and_policy_stay_pure():
    for sub, forbidden in (("harness", {"Milter", "milter"}),
                           ("policy", {"Milter", "milter", "berkeleydb", "yaml", "relaymilter.store",
                                       "relaymilter.adapter", "relaymilter.config"})):
        for path in (PKG / sub).rglob("*.py"):
            mods = imported_modules(path)
            bad = {m for m in mods for f in forbidden if m == f or m.startswith(f + ".")}
            assert not bad, "%s imports %s" % (path, bad)


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(ROOT / "milter").parts) for p in PKG.rglob("__init__.py")}
    assert on_disk | {"relaymilter.rules"} == listed
