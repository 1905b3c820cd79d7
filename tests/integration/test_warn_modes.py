"""Warn-only mode for every rule family, through the real milter, and SIGHUP back to enforce.

One relaymilter (the installed command, two worker processes) per rule
family of ``modes:`` - relay, spammers, local_recipients, dnsbl, limits -
with that family in warn mode; a milter-protocol session (relaymilter.harness,
what an MTA sends) makes the family refuse: the milter answers continue
and logs ``would reject: ... rule=...`` with the reply it did not send.
The configuration is then switched back to enforce and the milter sent
SIGHUP; the next transaction of the same session is refused. The dnsbl
family asks a DNS server on loopback (tests/dnsserver.py) that lists the
client; the limits family counts in the relayers-counters file beside a
relayers.db that lists the client as alice's.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.harness import MilterSession
from relaymilter.store.guard import HostGuardStore
from relaymilter.store.relayers import open_relay_store
from relaymilter.store.spammers import write_db

from milterproc import MilterProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dnsserver import DnsServer, standard_zones  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "<someone@example.net>"


@dataclass(frozen=True)
class Family:
    name: str
    client: str
    refused: str                # the reply the family makes when it enforces
    rule: str
    sender: str = SENDER
    rcpts: tuple[str, ...] = ("<bob@remote.example>",)     # the last one is refused
    settings: dict = field(default_factory=dict)

    @property
    def at_mail(self) -> bool:
        return not self.rcpts


FAMILIES = [
    Family("relay", "203.0.113.9", "550 5.7.1 Relaying denied", "default_reject"),
    Family("spammers", "203.0.113.9", "550 5.7.1 Access denied", "spammers", sender="<x@spam.example>", rcpts=()),
    Family("local_recipients", "203.0.113.9", "550 5.1.1 User unknown", "unknown_recipient",
           rcpts=("<nobody@local.test>",)),
    Family("dnsbl", "192.0.2.30", "554 5.7.1 Service unavailable; Client host [192.0.2.30] blocked using bl.test; "
           "Listed for testing", "dnsbl", rcpts=("<bob@local.test>",)),
    Family("limits", "192.0.2.10", "451 4.7.1 Relaying limit exceeded, try again later", "recipients_per_hour",
           rcpts=("<r1@remote.example>", "<r2@remote.example>"), settings={"limits": {"recipients_per_hour": 1}}),
]


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(standard_zones()).start()
    try:
        yield server
    finally:
        server.stop()


def settings_for(family: Family, tmp: Path, dns: DnsServer, mode: str) -> dict:
    users = tmp / "users"
    if not users.exists():          # written once, and settled: a list changed just now is not trusted to refuse
        users.write_text("bob\n")
        os.utime(users, (time.time() - 60, time.time() - 60))
    return {
        "workers": 2,
        "local_recipients": {"lists": [str(users)]},
        "dnsbl": {"sites": ["bl.test"], "nameservers": [dns.nameserver], "timeout": 2.0},
        "modes": {family.name: mode},
        **family.settings,
    }


def reload(milter: MilterProcess, settings: dict) -> None:
    """Write the configuration, SIGHUP, and wait (bounded) until both workers have reloaded."""
    before = milter.log().count("reloaded ")
    milter.write_config(settings)
    milter.hup()
    deadline = time.monotonic() + 15
    while milter.log().count("reloaded ") < before + 2:
        assert time.monotonic() < deadline, milter.log()[-2000:]
        time.sleep(0.02)


def transaction(s: MilterSession, family: Family) -> list[str]:
    """MAIL and the family's recipients: every answer, as text."""
    answers = [str(s.mail(family.sender))]
    answers += [str(s.rcpt(r)) for r in family.rcpts]
    s.abort()
    return answers


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_warn_mode_passes_logs_and_sighup_enforces_from_the_next_transaction(tmp_path: Path, dns: DnsServer,
                                                                             family: Family) -> None:
    milter = MilterProcess(tmp_path / "m", settings_for(family, tmp_path, dns, "warn"))
    write_db(str(tmp_path / "m" / "spammers.db"), ["spam.example"])
    open_relay_store(milter.relayers_db).add({"192.0.2.10": int(time.time())})
    HostGuardStore(milter.relayers_db).record_users({"192.0.2.10": "alice"}, 3600)
    milter.start()
    try:
        with MilterSession(milter.socket, timeout=20) as s:
            s.connect(client_ip=family.client)
            s.helo("client.example")
            # Warn: every answer is continue, and the refusal not made is logged.
            assert transaction(s, family) == ["continue"] * (1 + len(family.rcpts))
            stage, shown = ("MAIL", family.sender) if family.at_mail else ("RCPT", family.rcpts[-1])
            code, xcode, text = family.refused.split(" ", 2)
            line = "would reject: %s from [%s]: %s %s %s: %s; from=%s" % (stage, family.client, code, xcode, shown,
                                                                        text, family.sender)
            log = milter.wait_for_log(line)
            found = [x for x in log.splitlines() if line in x]
            assert len(found) == 1 and re.search(r" rule=%s( |$)" % family.rule, found[0]), found
            made = re.compile(r": (reject|tempfail): .* rule=%s( |$)" % family.rule, re.M)
            assert not made.search(log), log            # no refusal was made

            # Back to enforce by SIGHUP: the next transaction of the same session is refused.
            reload(milter, settings_for(family, tmp_path, dns, "enforce"))
            answers = transaction(s, family)
            assert answers[-1] == family.refused, answers
            if not family.at_mail:
                assert answers[0] == "continue", answers
        verb = "tempfail" if code.startswith("4") else "reject"
        enforced = ": %s: %s from [%s]: %s %s %s: %s; from=%s" % (verb, stage, family.client, code, xcode, shown, text,
                                                              family.sender)
        assert made.search(milter.wait_for_log(enforced))
    finally:
        milter.stop()


def test_every_family_of_modes_has_its_test() -> None:
    from relaymilter.policy.modes import FAMILIES as MODES

    assert sorted(f.name for f in FAMILIES) == sorted(MODES)
