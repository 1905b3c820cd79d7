"""vsmtprelay -f redis://... behaves and prints exactly as with a file.

The same command sequence runs against a relayers.db and against a real
redis-server; every step's exit code, stdout and stderr must be identical,
byte for byte. The installed script is run once against Redis to prove the
entry point, and `makemap hash` rebuilds a file from the Redis dump that
reads back the same.
"""

from __future__ import annotations

import subprocess

import pytest

from relaymilter.cli import vsmtprelay
from relaymilter.store.relayers import BDBRelayStore, open_relay_store


pytestmark = pytest.mark.integration

NOW = "1000000000"

SEQUENCE = [
    ["add", "10.11.12.13", "906502527"],
    ["add", "192.0.2.5"],
    ["add", "2001:DB8::1", "2000000000"],
    ["add", "::ffff:198.51.100.7", "999999000"],
    ["add", "192.0.2.10", "999996000"],
    ["dump"],
    ["list"],
    ["list", "60"],
    ["expire", "60"],
    ["dump"],
    ["delete", "192.0.2.5", "192.0.2.99", "[IPv6:2001:db8::1]"],
    ["delete", "bogus"],
    ["add", "192.0.2.300"],
    ["add", "192.0.2.7", "12x"],
    ["list", "many"],
    ["frobnicate"],
    [],
    ["add", "192.0.2.5", "1000000000"],
    ["dump"],
    ["expire"],
    ["dump"],
    ["list"],
]

FIRST_DUMP = """\
# timestamp (UTC): Tue Sep 22 22:15:27 1998
10.11.12.13 906502527
# timestamp (UTC): Sun Sep  9 01:46:40 2001
192.0.2.5 1000000000
# timestamp (UTC): Sun Sep  9 00:40:00 2001
192.0.2.10 999996000
# timestamp (UTC): Sun Sep  9 01:30:00 2001
198.51.100.7 999999000
# timestamp (UTC): Wed May 18 03:33:20 2033
2001:db8::1 2000000000
"""


def run(capsys: pytest.CaptureFixture, location: str, args: list[str]) -> tuple[int, str, str]:
    rc = vsmtprelay.main(["-f", location, "--now", NOW] + args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_same_commands_same_output_file_and_redis(tmp_path, redis_server, capsys):
    path = str(tmp_path / "relayers.db")
    url = redis_server.url(query="prefix=vs:")
    file_steps = [run(capsys, path, args) for args in SEQUENCE]
    redis_steps = [run(capsys, url, args) for args in SEQUENCE]
    for args, f, r in zip(SEQUENCE, file_steps, redis_steps):
        assert r == f, "vsmtprelay %s differs:\nfile:  %r\nredis: %r" % (" ".join(args), f, r)
    # The comparison is not vacuous: the outputs are the documented ones.
    assert file_steps[5] == (0, FIRST_DUMP, "")
    assert file_steps[10] == (1, "", "vsmtprelay: 192.0.2.99: not found\n")
    assert file_steps[11][0] == 2 and "bogus" in file_steps[11][2]
    assert file_steps[16][0] == 2 and "usage" in file_steps[16][2]
    assert file_steps[-1] == (0, "", "")
    assert BDBRelayStore(path).entries() == open_relay_store(url).entries() == []
    with redis_server.client() as c:
        assert list(c.scan_iter()) == []


def test_installed_script_and_makemap_round_trip(tmp_path, redis_server):
    url = redis_server.url()
    for args in (["add", "192.0.2.1", "906502527"], ["add", "2001:db8::7", "1000000001"]):
        subprocess.run(["vsmtprelay", "-f", url] + args, check=True, timeout=60)
    dump = subprocess.run(["vsmtprelay", "-f", url, "dump"], check=True, timeout=60,
                          capture_output=True).stdout
    subprocess.run(["makemap", "hash", str(tmp_path / "rebuilt")], input=dump, check=True, timeout=60)
    assert BDBRelayStore(str(tmp_path / "rebuilt.db")).entries() == open_relay_store(url).entries() == [
        ("192.0.2.1", 906502527), ("2001:db8::7", 1000000001)]


def test_unreachable_redis_is_one_line_and_exit_1(tmp_path, redis_server, capsys):
    port = redis_server.port
    redis_server.stop()
    rc, out, err = run(capsys, "redis://:pw@127.0.0.1:%d/0" % port, ["dump"])
    assert (rc, out) == (1, "")
    assert err.startswith("vsmtprelay: error: redis://:***@127.0.0.1:%d/0: cannot list entries: " % port)
    assert err.count("\n") == 1
    rc, out, err = run(capsys, "redis://127.0.0.1:%d/0?bogus=1" % port, ["dump"])
    assert (rc, out) == (2, "") and err == "vsmtprelay: error: redis://127.0.0.1:%d/0?bogus=1: unknown option 'bogus'\n" % port
