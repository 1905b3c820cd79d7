"""vsmtprelay: the classic surface, its exact output, and bad input that must change nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

from relaymilter import __version__
from relaymilter.cli.vsmtprelay import main
from relaymilter.store.relayers import BDBRelayStore

NOW = 1_700_000_000


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "relayers.db")


def test_documented_example(capsys, db):
    assert run(capsys, "-f", db, "add", "10.11.12.13", "906502527")[0] == 0
    code, out, err = run(capsys, "-f", db, "dump")
    assert (code, err) == (0, "")
    assert out == "# timestamp (UTC): Tue Sep 22 22:15:27 1998\n10.11.12.13 906502527\n"


def test_add_without_ticks_uses_now(capsys, db):
    before = int(time.time())
    assert run(capsys, "-f", db, "add", "192.0.2.7")[0] == 0
    ts = BDBRelayStore(db).lookup("192.0.2.7")
    assert before <= ts <= int(time.time())


def test_add_overwrites_and_normalises(capsys, db):
    run(capsys, "-f", db, "add", "::FFFF:192.0.2.1", "5")
    run(capsys, "-f", db, "add", "192.0.2.1", "6")
    run(capsys, "-f", db, "add", "2001:0DB8:0:0:0:0:0:1", "7")
    out = run(capsys, "-f", db, "dump")[1]
    assert out.splitlines()[1::2] == ["192.0.2.1 6", "2001:db8::1 7"]


def test_dump_orders_by_address_numerically(capsys, db):
    for ip in ("10.0.0.10", "2001:db8::2", "10.0.0.9", "9.255.0.1", "2001:db8::10"):
        run(capsys, "-f", db, "add", ip, "100")
    lines = run(capsys, "-f", db, "dump")[1].splitlines()[1::2]
    assert [line.split()[0] for line in lines] == ["9.255.0.1", "10.0.0.9", "10.0.0.10", "2001:db8::2", "2001:db8::10"]


def populate(capsys, db):
    # ages in minutes relative to NOW; one future entry
    for ip, ts in {
        "192.0.2.1": NOW - 60 * 120,   # two hours old
        "192.0.2.2": NOW - 60 * 60,    # exactly 60 minutes old
        "192.0.2.3": NOW - 60 * 60 + 1,  # one second younger than 60 minutes
        "192.0.2.4": NOW,              # exactly now: "old"
        "192.0.2.5": NOW + 3600,       # future
    }.items():
        assert run(capsys, "-f", db, "add", ip, str(ts))[0] == 0


def listed(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if not line.startswith("#")]


def test_list_all_old_and_older_than_n(capsys, db):
    populate(capsys, db)
    assert listed(run(capsys, "-f", db, "--now", str(NOW), "list")[1]) == [
        "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
    # "older than n minutes" means timestamp <= now - 60*n: the exactly-60 entry is listed
    assert listed(run(capsys, "-f", db, "--now", str(NOW), "list", "60")[1]) == ["192.0.2.1", "192.0.2.2"]
    assert listed(run(capsys, "-f", db, "--now", str(NOW), "list", "121")[1]) == []
    assert listed(run(capsys, "-f", db, "--now", str(NOW), "dump")[1]) == [
        "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"]


def test_expire_n_then_all_keeps_future(capsys, db):
    populate(capsys, db)
    assert run(capsys, "-f", db, "--now", str(NOW), "expire", "60") == (0, "", "")
    assert listed(run(capsys, "-f", db, "dump")[1]) == ["192.0.2.3", "192.0.2.4", "192.0.2.5"]
    assert run(capsys, "-f", db, "--now", str(NOW), "expire")[0] == 0
    assert listed(run(capsys, "-f", db, "dump")[1]) == ["192.0.2.5"]
    # the future entry becomes old once its time has come
    assert run(capsys, "-f", db, "--now", str(NOW + 3600), "expire")[0] == 0
    assert run(capsys, "-f", db, "dump")[1] == ""


def test_delete_reports_absent_and_continues(capsys, db):
    populate(capsys, db)
    code, out, err = run(capsys, "-f", db, "delete", "192.0.2.1", "198.51.100.1", "::ffff:192.0.2.2")
    assert code == 1
    assert err == "vsmtprelay: 198.51.100.1: not found\n"
    assert listed(run(capsys, "-f", db, "dump")[1]) == ["192.0.2.3", "192.0.2.4", "192.0.2.5"]


def test_missing_db_reads_empty_and_expire_is_quiet(capsys, db):
    assert run(capsys, "-f", db, "dump") == (0, "", "")
    assert run(capsys, "-f", db, "expire", "10") == (0, "", "")
    assert not os.path.exists(db)


def test_usage_text_and_exit_2(capsys):
    code, out, err = run(capsys)
    assert code == 2
    assert err.startswith("vsmtprelay %s usage (optional items in []):\n    %% vsmtprelay command [arg] [...]\n" % __version__)
    for classic in (
        '    "add ip [ticks]"   insert address with current timestamp (or ticks)\n',
        '    "delete ip [...]"  remove specified address(es)\n',
        '    "expire [n]"       expire all old (or older than n minutes) entries\n',
        '    "list [n]"         list all old (or older than n minutes) entries\n',
        '    "dump"             list every entry, including the future timestamped\n',
        'IP addresses are expressed as ASCII "dotted quads", e.g. "10.11.12.13".\n',
        "All timestamps are stored as ASCII strings representing a count of seconds\n",
    ):
        assert classic in err
    assert "IPv6" in err and "-f file" in err


@pytest.mark.parametrize("argv", [["frob"], ["add"], ["add", "1.2.3.4", "5", "6"], ["dump", "x"], ["list", "1", "2"]])
def test_bad_usage_exits_2(capsys, db, argv):
    code, out, err = run(capsys, "-f", db, *argv)
    assert code == 2 and "usage" in err and out == ""


BAD_ADDRESSES = ["1.2.3", "256.1.1.1", "::g", "", "1" * 10_000, "10.0.0.1/24", "fe80::1%eth0", "a.b.c.d", "1.2.3.4.5", "12345"]


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_bad_address_leaves_db_untouched(capsys, db, bad):
    run(capsys, "-f", db, "add", "192.0.2.1", "5")
    before = digest(db)
    for argv in (["add", bad], ["add", bad, "5"], ["delete", "192.0.2.1", bad]):
        code, out, err = run(capsys, "-f", db, *argv)
        assert code == 2
        assert err.startswith("vsmtprelay: error: invalid IP address: ") and err.count("\n") == 1
        assert len(err) < 200
        assert digest(db) == before


@pytest.mark.parametrize("ticks", ["-1", "12x", "", "1e9", "99999999999999", "0x10", "253402300800"])
def test_bad_ticks_leave_db_untouched(capsys, db, ticks):
    run(capsys, "-f", db, "add", "192.0.2.1", "5")
    before = digest(db)
    code, out, err = run(capsys, "-f", db, "add", "192.0.2.2", ticks)
    assert code == 2 and err.startswith("vsmtprelay: error: invalid ticks value") and err.count("\n") == 1
    assert digest(db) == before


@pytest.mark.parametrize("minutes", ["-5", "x", "1.5"])
def test_bad_minutes_leave_db_untouched(capsys, db, minutes):
    run(capsys, "-f", db, "add", "192.0.2.1", "5")
    before = digest(db)
    code, out, err = run(capsys, "-f", db, "expire", minutes)
    assert code == 2 and "invalid minutes value" in err
    assert digest(db) == before


@pytest.mark.parametrize("content", [b"this is not a database\n" * 50, b"\0" * 8192, os.urandom(16384)])
def test_corrupt_file_refused_and_untouched(capsys, db, content):
    with open(db, "wb") as fh:
        fh.write(content)
    for argv in (["add", "192.0.2.1"], ["delete", "192.0.2.1"], ["expire"], ["dump"], ["list", "5"]):
        code, out, err = run(capsys, "-f", db, *argv)
        assert code == 1, argv
        assert err == "vsmtprelay: error: %s: is not a hash database\n" % db
        assert open(db, "rb").read() == content


def test_unwritable_directory(capsys, tmp_path):
    # root ignores permission bits, so make the "directory" a regular file instead.
    blocker = tmp_path / "etc"
    blocker.write_text("not a directory")
    code, out, err = run(capsys, "-f", str(blocker / "relayers.db"), "add", "192.0.2.1")
    assert code == 1 and err.startswith("vsmtprelay: error: ") and "Not a directory" in err
    assert blocker.read_text() == "not a directory"


def test_read_only_directory(tmp_path):
    # A read-only bind mount refuses writes even to root (EROFS).
    d = tmp_path / "ro"
    d.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec vsmtprelay -f "$1/relayers.db" add 192.0.2.1',
         "sh", str(d)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("vsmtprelay: error: ") and "Read-only file system" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert os.listdir(d) == []


def test_default_path_comes_from_config(capsys, tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("relayers: {path: %s}\n" % (tmp_path / "from-config.db"))
    assert run(capsys, "-c", str(cfg), "add", "192.0.2.9", "42")[0] == 0
    assert BDBRelayStore(str(tmp_path / "from-config.db")).lookup("192.0.2.9") == 42
    monkeypatch.setenv("RELAYMILTER_CONFIG", str(cfg))
    assert listed(run(capsys, "dump")[1]) == ["192.0.2.9"]


def test_home_default(tmp_path):
    (tmp_path / "etc").mkdir()
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop("RELAYMILTER_CONFIG", None)
    if os.path.exists("/etc/relaymilter/relaymilter.yaml"):
        pytest.skip("a system configuration is installed on this host")
    proc = subprocess.run(["vsmtprelay", "add", "192.0.2.33", "77"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert BDBRelayStore(str(tmp_path / "etc" / "relayers.db")).lookup("192.0.2.33") == 77


def test_installed_script_round_trip(tmp_path):
    db = str(tmp_path / "r.db")
    assert subprocess.run(["vsmtprelay", "-f", db, "add", "10.11.12.13", "906502527"], timeout=60).returncode == 0
    proc = subprocess.run(["vsmtprelay", "-f", db, "dump"], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "# timestamp (UTC): Tue Sep 22 22:15:27 1998\n10.11.12.13 906502527\n"
