"""The harness is the MTA side of the milter protocol: it must never import pymilter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import relaymilter.harness

HARNESS_DIR = Path(relaymilter.harness.__file__).resolve().parent
CLI = HARNESS_DIR.parent / "cli" / "harness.py"
FORBIDDEN = {"Milter", "milter"}  # pymilter's package and its C extension


def imported_modules(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


def test_harness_sources_never_import_pymilter() -> None:
    sources = sorted(HARNESS_DIR.glob("*.py")) + [CLI]
    assert len(sources) >= 8
    for path in sources:
        top_levels = {name.split(".")[0] for name in imported_modules(path)}
        assert not top_levels & FORBIDDEN, "%s imports %s" % (path, top_levels & FORBIDDEN)


def test_the_guard_sees_an_import(tmp_path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom Milter import testctx\nimportlib.import_module('milter')\n")
    assert {"Milter", "milter", "os"} <= imported_modules(sample)


def test_importing_the_harness_loads_no_pymilter() -> None:
    code = ("import sys, relaymilter.harness, relaymilter.cli.harness; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('Milter', 'milter')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
