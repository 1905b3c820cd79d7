"""The classic open-relay battery (tests/data/relay_battery.yaml), every row through the milter's one
decision path: the callbacks the adapter registers with pymilter, a Runtime built from a config file,
real relayers.db and spammers.db files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import Milter
import pytest
import yaml
from milterpath import Conn

from relaymilter import adapter, replies
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.relayers import BDBRelayStore
from relaymilter.store.spammers import write_db

BATTERY = Path(__file__).resolve().parent.parent / "data" / "relay_battery.yaml"
PLACES = {"local": "local.test", "remote": "remote.test", "local_ip": "192.0.2.10"}
UNKNOWN, RELAYER, STALE = "198.51.100.7", "203.0.113.5", "203.0.113.6"


def load() -> dict[str, Any]:
    with BATTERY.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


DATA = load()
ROWS = DATA["rows"]


def fill(template: str) -> str:
    return template.format(**PLACES)


@pytest.fixture(scope="module")
def milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[adapter.RuntimeHolder, list[str]]]:
    tmp = tmp_path_factory.mktemp("battery")
    cfg = tmp / "relaymilter.yaml"
    cfg.write_text("add_host_names: false\nlocal_domains: [local.test, '[192.0.2.10]']\nrelay_domains: [relayed.test]\n"
                   "trusted_networks: [127.0.0.0/8, '::1/128']\nrelayers: {path: %s, window: 60}\n"
                   "spammers: {path: %s}\n" % (tmp / "relayers.db", tmp / "spammers.db"))
    write_db(str(tmp / "spammers.db"), ["spam.example"])
    now = int(time.time())
    BDBRelayStore(str(tmp / "relayers.db")).add({RELAYER: now - 120, STALE: now - 61 * 60})
    lines: list[str] = []
    decisions = DecisionLog(lines.extend, interval=3600)
    holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(cfg))), decisions)
    yield holder, lines
    decisions.close()


def last_line(holder: adapter.RuntimeHolder, lines: list[str]) -> str:
    holder.decisions.flush()
    return lines[-1]


def test_battery_file_is_well_formed() -> None:
    assert len(ROWS) >= 30
    seen = set()
    for row in ROWS:
        assert set(row) == {"rcpt", "parse_refused", "resolves_to", "source"}, row
        assert isinstance(row["parse_refused"], bool)
        assert (row["resolves_to"] is None) == row["parse_refused"], row
        assert row["rcpt"] not in seen, row["rcpt"]
        seen.add(row["rcpt"])
        fill(row["rcpt"])  # every placeholder is a known one
    assert any(row["parse_refused"] for row in ROWS)
    assert DATA["senders"]


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_refused_for_an_unknown_client(milter: Any, row: dict[str, Any]) -> None:
    holder, lines = milter
    conn = Conn(holder, UNKNOWN)
    assert conn.mail("<relaytest@remote.test>") == Milter.CONTINUE
    assert conn.rcpt(fill(row["rcpt"])) == Milter.REJECT
    line = last_line(holder, lines)
    if row["parse_refused"]:
        assert conn.replies == [(replies.MALFORMED_ADDRESS.code, replies.MALFORMED_ADDRESS.xcode,
                                 replies.MALFORMED_ADDRESS.text)]
        assert " error=" in line and line.endswith("rule=malformed_address")
    else:
        assert conn.replies == [("550", "5.7.1", "Relaying denied")]
        assert " resolved=%s rule=default_reject" % fill(row["resolves_to"]) in line


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_relayed_for_a_pop_before_smtp_client(milter: Any, row: dict[str, Any]) -> None:
    holder, lines = milter
    conn = Conn(holder, RELAYER)
    assert conn.mail("<relaytest@remote.test>") == Milter.CONTINUE
    assert conn.rcpt(fill(row["rcpt"])) == Milter.CONTINUE
    line = last_line(holder, lines)
    assert line.endswith("rule=relayers_db")
    if row["parse_refused"]:
        # sendmail answers 553 itself before the milter is asked; we only
        # mark it, and leave the syntax to the MTA for a client that may relay.
        assert " error=" in line
    else:
        # The relaying session is named: no AUTH, no POP user recorded, so its address.
        assert " resolved=%s user=%s rule=" % (fill(row["resolves_to"]), RELAYER) in line


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_refused_for_a_stale_pop_before_smtp_client(milter: Any, row: dict[str, Any]) -> None:
    holder, _ = milter
    conn = Conn(holder, STALE)
    conn.mail("<relaytest@remote.test>")
    assert conn.rcpt(fill(row["rcpt"])) == Milter.REJECT


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_relayed_for_trusted_and_authenticated_clients(milter: Any, row: dict[str, Any]) -> None:
    holder, lines = milter
    for ip, auth, rule in (("127.0.0.1", None, "trusted_network"), ("::1", None, "trusted_network"),
                           (UNKNOWN, "alice", "authenticated")):
        conn = Conn(holder, ip)
        assert conn.mail("<relaytest@remote.test>", auth=auth) == Milter.CONTINUE
        assert conn.rcpt(fill(row["rcpt"])) == Milter.CONTINUE
        assert last_line(holder, lines).endswith("rule=" + rule)


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_refused_for_sessions_the_milter_cannot_place(milter: Any, row: dict[str, Any]) -> None:
    holder, _ = milter
    no_connect = Conn(holder, None)
    assert no_connect.mail("<relaytest@remote.test>") == Milter.CONTINUE
    assert no_connect.rcpt(fill(row["rcpt"])) == Milter.REJECT
    unknown_family = Conn(holder, None)
    unknown_family.funcs["connect"](unknown_family.ctx, "localhost", 0, None)
    unknown_family.mail("<relaytest@remote.test>")
    assert unknown_family.rcpt(fill(row["rcpt"])) == Milter.REJECT


@pytest.mark.parametrize("sender", DATA["senders"])
def test_battery_senders_are_accepted_and_grant_nothing(milter: Any, sender: str) -> None:
    holder, lines = milter
    conn = Conn(holder, UNKNOWN)
    assert conn.mail(fill(sender)) == Milter.CONTINUE
    assert last_line(holder, lines).endswith(("rule=sender_ok", "rule=null_sender"))
    # The RCPT decision has no sender input at all: the plain relay attempt stays refused.
    assert conn.rcpt(fill("<relaytest@{remote}>")) == Milter.REJECT
