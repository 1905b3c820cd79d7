"""relaymilter-guard: classic usage, shell-usable output, exit codes, on real files beside a relayers.db."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relaymilter.cli.guard import field, main
from relaymilter.store.guard import Ask, HostGuardStore
from relaymilter.store.relayers import BDBRelayStore

NOW = 1_800_000_000


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "relaymilter.yaml"
    path.write_text("relayers: {path: %s}\nlimits: {recipients_per_hour: 10, suspend_minutes: 30}\n"
                    % (tmp_path / "relayers.db"))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_command_prints_the_usage_and_exits_2(capsys) -> None:
    code, out, err = run(capsys)
    assert code == 2 and err.startswith("relaymilter-guard ") and '"lift identity [...]"' in err


@pytest.mark.parametrize("argv,message", [
    (["bogus"], "unknown command 'bogus'"),
    (["lift"], "wrong number of arguments for 'lift'"),
    (["list", "1", "2"], "wrong number of arguments for 'list'"),
])
def test_bad_usage(capsys, cfg: Path, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "-c", str(cfg), *argv)
    assert code == 2 and err.splitlines()[0] == "relaymilter-guard: error: %s" % message


def test_bad_numbers_are_one_line_and_exit_2(capsys, cfg: Path) -> None:
    code, out, err = run(capsys, "-c", str(cfg), "list", "80%")
    assert code == 2 and out == "" and err == ("relaymilter-guard: error: invalid percent value: '80%' "
                                               "(want a whole number, 0..10000)\n")
    code, _, err = run(capsys, "-c", str(cfg), "suspend", "alice", "soon")
    assert code == 2 and "invalid minutes value" in err
    assert not (cfg.parent / "relayers-suspended.db").exists()


def test_list_near_over_and_suspended_in_fields(capsys, cfg: Path, tmp_path: Path) -> None:
    store = HostGuardStore(str(tmp_path / "relayers.db"))
    for _ in range(9):
        store.gate(Ask("192.0.2.1", "alice", {"recipients": 1}, {}, NOW))
    for _ in range(3):
        store.gate(Ask("192.0.2.2", "two words", {"recipients": 1}, {}, NOW))
    store.suspend("carol", NOW + 600, "messages_per_hour", NOW)
    code, out, _ = run(capsys, "-c", str(cfg), "--now", str(NOW + 30), "list")
    assert code == 0
    rows = [line.split(" ") for line in out.splitlines() if not line.startswith("#")]
    assert rows == [["alice", "recipients", "9", "10", "near"], ["carol", "suspended", str(NOW + 600),
                                                                 "messages_per_hour"]]
    code, out, _ = run(capsys, "-c", str(cfg), "--now", str(NOW + 30), "list", "0")
    assert "two\\x20words recipients 3 10 -" not in out and "two\\x20words recipients 3 10 " in out
    code, out, _ = run(capsys, "-c", str(cfg), "--now", str(NOW + 30), "suspended")
    assert [line for line in out.splitlines() if not line.startswith("#")] == [
        "carol suspended %d messages_per_hour" % (NOW + 600)]


def test_lift_and_suspend(capsys, cfg: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "relayers.db")
    BDBRelayStore(db).add({"192.0.2.7": int(time.time())})
    HostGuardStore(db).record_users({"192.0.2.7": "dave"}, 3600)
    code, out, _ = run(capsys, "-c", str(cfg), "suspend", "dave")
    assert code == 0 and "removed from the relayers map: 192.0.2.7" in out
    assert BDBRelayStore(db).lookup("192.0.2.7") is None
    assert HostGuardStore(db).suspension("dave", time.time()).until >= time.time() + 29 * 60
    code, _, err = run(capsys, "-c", str(cfg), "lift", "dave", "erin")
    assert code == 1 and err == "relaymilter-guard: erin: not suspended\n"
    assert HostGuardStore(db).suspension("dave", time.time()) is None
    assert run(capsys, "-c", str(cfg), "lift", "dave")[0] == 1        # lifted already


def test_a_store_that_cannot_be_read_exits_1(capsys, cfg: Path, tmp_path: Path) -> None:
    (tmp_path / "relayers-counters").write_bytes(b"garbage")
    code, out, err = run(capsys, "-c", str(cfg), "list")
    assert code == 1 and err.startswith("relaymilter-guard: error: ") and "not a relaymilter counter file" in err


def test_field_escapes_what_would_split_a_line() -> None:
    assert field("a b\tc\\d\ne") == "a\\x20b\\x09c\\x5cd\\x0ae"
    assert field("") == "\\x00"
