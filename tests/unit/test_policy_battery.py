"""The classic open-relay battery (tests/data/relay_battery.yaml) against check_rcpt."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaymilter import replies
from relaymilter.policy import Client, Continue, RcptPolicy, Reject, check_mail, evaluate_rcpt

BATTERY = Path(__file__).resolve().parent.parent / "data" / "relay_battery.yaml"
PLACES = {"local": "local.test", "remote": "remote.test", "local_ip": "192.0.2.10"}
NOW = 1_700_000_000.0

POLICY = RcptPolicy(
    local_domains=frozenset({"local.test", "[192.0.2.10]"}),
    relay_domains=frozenset({"relayed.test"}),
    trusted_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
    permit_authenticated=True,
    window=60,
)


def load() -> dict[str, Any]:
    with BATTERY.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


DATA = load()
ROWS = DATA["rows"]


def fill(template: str) -> str:
    return template.format(**PLACES)


def never_asked(ip: str) -> int | None:
    raise AssertionError("no lookup expected, asked for %s" % ip)


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
def test_refused_for_an_unknown_client(row: dict[str, Any]) -> None:
    asked: list[str] = []

    def lookup(ip: str) -> int | None:
        asked.append(ip)
        return None

    verdict = evaluate_rcpt(POLICY, Client("198.51.100.7"), fill(row["rcpt"]), lookup, NOW)
    assert isinstance(verdict.decision, Reject)
    if row["parse_refused"]:
        assert verdict.decision == Reject(replies.MALFORMED_ADDRESS, "malformed_address")
        assert verdict.resolved is None
    else:
        assert verdict.decision == Reject(replies.RELAYING_DENIED, "default_reject")
        assert str(verdict.resolved) == fill(row["resolves_to"])
    assert asked == ["198.51.100.7"]


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_relayed_for_a_pop_before_smtp_client(row: dict[str, Any]) -> None:
    fresh = {"203.0.113.5": int(NOW) - 120}
    verdict = evaluate_rcpt(POLICY, Client("203.0.113.5"), fill(row["rcpt"]), fresh.get, NOW)
    assert verdict.decision == Continue("relayers_db")
    if row["parse_refused"]:
        # sendmail answers 553 itself before the milter is asked; we only
        # mark it, and leave the syntax to the MTA for a client that may relay.
        assert verdict.resolved is None and verdict.error
    else:
        assert str(verdict.resolved) == fill(row["resolves_to"])


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_refused_for_a_stale_pop_before_smtp_client(row: dict[str, Any]) -> None:
    stale = {"203.0.113.5": int(NOW) - 61 * 60}
    verdict = evaluate_rcpt(POLICY, Client("203.0.113.5"), fill(row["rcpt"]), stale.get, NOW)
    assert isinstance(verdict.decision, Reject)


@pytest.mark.parametrize("row", ROWS, ids=[r["rcpt"] for r in ROWS])
def test_relayed_for_trusted_and_authenticated_clients_without_lookups(row: dict[str, Any]) -> None:
    for client, rule in ((Client(None), "trusted_network"), (Client("::1"), "trusted_network"),
                         (Client("198.51.100.7", "alice"), "authenticated")):
        verdict = evaluate_rcpt(POLICY, client, fill(row["rcpt"]), never_asked, NOW)
        assert verdict.decision == Continue(rule)


@pytest.mark.parametrize("sender", DATA["senders"])
def test_battery_senders_are_accepted_and_grant_nothing(sender: str) -> None:
    assert check_mail(fill(sender), lambda key: False) in (Continue("sender_ok"), Continue("null_sender"))
    # check_rcpt has no sender input at all: the plain relay attempt stays refused.
    verdict = evaluate_rcpt(POLICY, Client("198.51.100.7"), fill("<relaytest@{remote}>"), lambda ip: None, NOW)
    assert verdict.decision == Reject(replies.RELAYING_DENIED, "default_reject")
