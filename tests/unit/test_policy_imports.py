"""The policy core stays pure: stdlib and relaymilter's stdlib-only modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import relaymilter.policy

POLICY_DIR = Path(relaymilter.policy.__file__).resolve().parent
FORBIDDEN = ("Milter", "milter", "berkeleydb", "bsddb3", "yaml", "redis",
             "relaymilter.store", "relaymilter.adapter", "relaymilter.config")
ALLOWED_RELAYMILTER = ("relaymilter.ipaddr", "relaymilter.errors", "relaymilter.replies", "relaymilter.policy",
                       "relaymilter.address")
PACKAGE_DIR = POLICY_DIR.parent


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "%s: relative import" % path.name
            assert node.module is not None
            names.append(node.module)
            # "from relaymilter import store" imports relaymilter.store
            names.extend("%s.%s" % (node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            pytest.fail("%s: dynamic import" % path.name)
    return names


MODULES = sorted(POLICY_DIR.glob("*.py"))


def test_the_policy_package_has_its_modules() -> None:
    assert {p.name for p in MODULES} >= {"__init__.py", "decision.py", "mail.py", "rcpt.py", "session.py", "verdict.py"}


ADDRESS_MODULES = sorted((PACKAGE_DIR / "address").glob("*.py"))
STORE_MODULES = sorted((PACKAGE_DIR / "store").glob("*.py"))


@pytest.mark.parametrize("path", ADDRESS_MODULES, ids=[p.name for p in ADDRESS_MODULES])
def test_the_address_package_is_neutral(path: Path) -> None:
    # Shared by the policy core and the stores, it imports neither (stdlib and ipaddr only).
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top == "relaymilter":
            assert name == "relaymilter" or name.startswith(("relaymilter.address", "relaymilter.ipaddr")), \
                "%s imports %s" % (path.name, name)
        else:
            assert top in sys.stdlib_module_names, "%s imports non-stdlib %s" % (path.name, name)


@pytest.mark.parametrize("path", STORE_MODULES, ids=[p.name for p in STORE_MODULES])
def test_the_store_never_imports_the_policy_core(path: Path) -> None:
    for name in imported_modules(path):
        assert not name.startswith(("relaymilter.policy", "relaymilter.adapter")), "%s imports %s" % (path.name, name)


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_no_forbidden_imports(path: Path) -> None:
    for name in imported_modules(path):
        for bad in FORBIDDEN:
            assert name != bad and not name.startswith(bad + "."), "%s imports %s" % (path.name, name)
        top = name.split(".")[0]
        if top == "relaymilter":
            assert name == "relaymilter" or name.startswith(ALLOWED_RELAYMILTER), "%s imports %s" % (path.name, name)
        else:
            assert top in sys.stdlib_module_names, "%s imports non-stdlib %s" % (path.name, name)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from relaymilter import store\nimport Milter\n", encoding="utf-8")
    names = imported_modules(bad)
    assert "relaymilter.store" in names and "Milter" in names


def test_the_policy_package_is_mypy_strict_clean(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install mypy)")
    # Given files, mypy finds the source root itself (milter/ has no __init__.py).
    files = [str(p) for p in MODULES]
    out, err, status = api.run([
        "--strict", "--follow-imports=silent", "--no-error-summary",
        "--cache-dir", str(tmp_path / "mypy-cache"),
        *files,
    ])
    assert status == 0, out + err
