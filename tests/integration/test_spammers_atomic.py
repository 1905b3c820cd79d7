"""Rebuilding a 100,000-entry spammers.db 50 times under a reader in another process.

The reader loops over keys present in every version of the list, through the
milter's SpammersMap and through bdb.MapReader (a live single-key reader, as
sendmail does it). Because vnewspammers writes a new file and renames it, the
reader must see one whole list or the other: never a miss, never an error,
never a size other than the two lists' sizes.

Parsing 100,000 lines costs about 3 s (normalize_entry, per line), so the
last rebuild runs vnewspammers itself and the 49 before it write the two
already parsed lists with write_db, the function vnewspammers calls after
parsing: the same lock, temporary file, fsync and rename each time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from relaymilter.cli.vnewspammers import main
from relaymilter.store.spammers import read_source, write_db

pytestmark = pytest.mark.integration

ENTRIES = 100_000
REBUILDS = 50

READER = r"""
import json, os, sys, time
from berkeleydb import db
from relaymilter.errors import StoreUnavailable
from relaymilter.store.bdb import MapReader
from relaymilter.store.spammers import SpammersMap

path, probes_file, stop_file, ready_file, out_file, seen_file = sys.argv[1:7]
with open(probes_file) as fh:
    probes = fh.read().split()
smap, live = SpammersMap(path), MapReader(path, "spammers")
misses, errors, sizes = [], [], {}
rounds = lookups = changes = 0
last = None
deadline = time.monotonic() + 600
while not os.path.exists(stop_file) and time.monotonic() < deadline:
    for key in probes:
        try:
            if not smap.contains(key):
                misses.append("SpammersMap " + key)
            if live.get(key.encode()) is None:
                misses.append("MapReader " + key)
        except (StoreUnavailable, db.DBError, OSError) as exc:
            errors.append(repr(exc))
        lookups += 2
    size = len(smap)
    sizes[size] = sizes.get(size, 0) + 1
    if last is not None and size != last:
        changes += 1
        with open(seen_file + ".tmp", "w") as fh:
            fh.write(str(changes))
        os.replace(seen_file + ".tmp", seen_file)
    last = size
    rounds += 1
    if rounds == 1:
        open(ready_file, "w").close()
with open(out_file, "w") as fh:
    json.dump({"rounds": rounds, "lookups": lookups, "changes": changes, "sizes": sizes,
               "misses": misses[:20], "n_misses": len(misses),
               "errors": errors[:20], "n_errors": len(errors)}, fh)
"""


def wait_for(path, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "reader exited early: %s" % proc.stderr.read()
        assert time.monotonic() < deadline, "reader not ready within %gs" % timeout
        time.sleep(0.02)


def changes_seen(path) -> int:
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return 0


def test_readers_never_see_a_partial_map(tmp_path):
    base = ["user%d@host%d.spam%d.example" % (i, i % 977, i % 13) if i % 3 else "host%d.bulk%d.example" % (i, i % 7)
            for i in range(ENTRIES)]
    lists = {"a": base, "b": base[:-5000] + ["other%d.example" % i for i in range(5001)]}
    sources = {}
    for name, entries in lists.items():
        sources[name] = tmp_path / ("spammers.%s" % name)
        sources[name].write_text("# list %s\n%s\n" % (name, "\n".join(entries)))
    db = tmp_path / "spammers.db"
    parsed = {name: read_source(str(src)) for name, src in sources.items()}
    sizes = {len(parsed["a"]), len(parsed["b"])}
    assert sizes == {ENTRIES, ENTRIES + 1}
    probes = base[:ENTRIES - 5000:475] + [base[0], base[ENTRIES - 5001]]    # in both lists
    (tmp_path / "probes").write_text("\n".join(probes))
    write_db(str(db), parsed["a"])

    stop, ready, out = tmp_path / "stop", tmp_path / "ready", tmp_path / "result.json"
    seen = tmp_path / "seen"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), str(tmp_path / "probes"),
                               str(stop), str(ready), str(out), str(seen)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        wait_for(ready, reader, 60)
        for i in range(REBUILDS):
            name = "b" if i % 2 == 0 else "a"
            if i == REBUILDS - 1:
                assert main(["-f", str(sources[name]), "-o", str(db)]) == 0
            else:
                write_db(str(db), parsed[name])
            # Each rebuild swaps the list; the next one starts only once the
            # reader has seen this swap, so it watches every one of them.
            deadline = time.monotonic() + 60
            while changes_seen(seen) < i + 1:
                assert reader.poll() is None, "reader exited early: %s" % reader.stderr.read()
                assert time.monotonic() < deadline, "reader did not see rebuild %d within 60s" % (i + 1)
                time.sleep(0.005)
        stop.touch()
        reader.wait(60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
    elapsed = time.monotonic() - started
    assert reader.returncode == 0, reader.stderr.read()
    result = json.loads(out.read_text())
    print("\n%d rebuilds in %.1fs; reader: %d rounds, %d lookups, %d list changes seen, sizes %s"
          % (REBUILDS, elapsed, result["rounds"], result["lookups"], result["changes"], result["sizes"]))
    assert (result["n_misses"], result["misses"]) == (0, [])
    assert (result["n_errors"], result["errors"]) == (0, [])
    assert {int(s) for s in result["sizes"]} <= sizes
    # The reader really watched the swaps, not one list all along.
    assert result["changes"] == REBUILDS and len(result["sizes"]) == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
