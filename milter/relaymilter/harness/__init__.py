"""NAME
    relaymilter.harness - a milter-protocol client (the MTA side) for tests and admins

DESCRIPTION
    Ask a running milter "what would you answer for this session?" without
    an MTA, and get the full reply texts (``550 5.7.1 Relaying denied``):

        from relaymilter.harness import MilterSession, run_session, SessionSpec

        with MilterSession("inet:8894@127.0.0.1", timeout=5.0) as s:
            s.connect(client_ip="127.0.0.5")
            s.mail("<alice@example.com>")
            r = s.rcpt("<bob@remote.example>")   # r.action, r.code, r.xcode, r.text

        result = run_session("unix:/run/m.sock", SessionSpec(
            client="192.0.2.10", helo="client.example",
            mail_from="<alice@example.net>", rcpts=["<bob@remote.example>"]))

    Layers: ``protocol`` (constants), ``codec`` (packets <-> values, pure),
    ``client`` (one socket conversation), ``runner`` (a scripted session
    with sendmail's follow-up rules), ``scenario`` (YAML files of sessions
    with expected answers). It never imports pymilter's ``Milter``: it is the
    other side of the protocol and must work against any milter.
"""

from __future__ import annotations

from relaymilter.harness.client import MilterSession
from relaymilter.harness.errors import (
    HarnessError,
    MilterUnreachable,
    ProtocolError,
    ScenarioError,
    SocketSpecError,
)
from relaymilter.harness.reply import Reply
from relaymilter.harness.runner import SessionResult, SessionSpec, StepResult, run_session
from relaymilter.harness.scenario import load_scenarios, run_file, run_scenario
from relaymilter.harness.sockspec import parse_socket_spec

__all__ = [
    "HarnessError",
    "MilterSession",
    "MilterUnreachable",
    "ProtocolError",
    "Reply",
    "ScenarioError",
    "SessionResult",
    "SessionSpec",
    "SocketSpecError",
    "StepResult",
    "load_scenarios",
    "parse_socket_spec",
    "run_file",
    "run_scenario",
    "run_session",
]
