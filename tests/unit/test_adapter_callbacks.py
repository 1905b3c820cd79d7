"""The adapter's registered callbacks run as pymilter runs them, on real relayers.db/spammers.db files.

The libmilter context is the one stand-in (milterpath.Context): it records
setreply() and serves macros, as libmilter's context would for the MTA's packets.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import Milter
import pytest
from milterpath import Conn, Context

from relaymilter import adapter, replies, runtime
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.relayers import BDBRelayStore
from relaymilter.store.spammers import write_db


@pytest.fixture
def setup(tmp_path: Path):
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("add_host_names: false\nlocal_domains: [local.test]\nrelay_domains: [relayed.test]\n"
                   "trusted_networks: [127.0.0.1/32]\nrelayers: {path: %s}\nspammers: {path: %s}\n"
                   % (tmp_path / "relayers.db", tmp_path / "spammers.db"))
    write_db(str(tmp_path / "spammers.db"), ["spam.example"])
    lines: list[str] = []
    decisions = DecisionLog(lines.extend, interval=3600)
    holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(cfg))), decisions)
    try:
        yield holder, BDBRelayStore(str(tmp_path / "relayers.db")), lines, cfg
    finally:
        decisions.close()


def test_registered_steps():
    funcs = adapter.callbacks(adapter.RuntimeHolder.__new__(adapter.RuntimeHolder))
    assert set(funcs) == {"negotiate", "connect", "envfrom", "envrcpt", "close"}     # no abort, helo, eom...


def test_negotiate_asks_for_connect_mail_rcpt_and_data(setup):
    holder, _, _, _ = setup
    conn = Conn(holder, None)
    protocol = conn.opts[1]
    assert protocol & Milter.P_NR_CONN                 # connect needs no reply
    for step in (Milter.P_NOCONNECT, Milter.P_NOMAIL, Milter.P_NORCPT, Milter.P_NR_MAIL, Milter.P_NR_RCPT):
        assert not protocol & step
    # DATA is asked for and answered (in C, by pymilter): a declined DATA step
    # still gets its macro packet from Postfix, and Nagle holds the next one.
    assert not protocol & Milter.P_NODATA and not protocol & Milter.P_NR_DATA
    assert protocol & Milter.P_NOHDRS and protocol & Milter.P_NOBODY and protocol & Milter.P_NOEOH
    assert protocol & Milter.P_NOHELO and protocol & Milter.P_NOUNKNOWN
    assert conn.opts[2:] == [0, 0]


def test_decision_lines(setup):
    holder, store, lines, _ = setup
    store.add({"192.0.2.8": int(time.time())})
    c = Conn(holder, "192.0.2.7", hostname="client.example")
    assert c.mail(b"<alice@example.net>") == Milter.CONTINUE
    assert c.rcpt(b"<bob@local.test>") == Milter.CONTINUE
    assert c.rcpt(b"bob@remote.example") == Milter.REJECT
    assert c.replies == [("550", "5.7.1", "Relaying denied")]
    c2 = Conn(holder, "192.0.2.8", macros={"{auth_authen}": "carol"})
    assert c2.mail(b"<carol@spam.example>") == Milter.REJECT
    holder.decisions.flush()
    a, b = c.connection.tag, c2.connection.tag
    assert lines == [
        "%s: pass: MAIL from client.example[192.0.2.7]: from=<alice@example.net> rule=sender_ok" % a,
        "%s: pass: RCPT from client.example[192.0.2.7]: from=<alice@example.net> to=<bob@local.test> "
        "resolved=bob@local.test rule=local_domain" % a,
        "%s: reject: RCPT from client.example[192.0.2.7]: 550 5.7.1 <bob@remote.example>: Relaying denied; "
        "from=<alice@example.net> to=<bob@remote.example> resolved=bob@remote.example rule=default_reject" % a,
        "%s: reject: MAIL from [192.0.2.8]: 550 5.7.1 <carol@spam.example>: Access denied; "
        "from=<carol@spam.example> sasl_username=carol rule=spammers" % b,
    ]


def test_relayers_changes_count_from_the_next_mail(setup):
    # relayers.db is read once per transaction: a change counts from the next MAIL
    # of the same connection on, never half-way through an envelope.
    holder, store, _, _ = setup
    c = Conn(holder, "192.0.2.9")
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.REJECT
    store.add({"192.0.2.9": int(time.time())})
    assert c.rcpt("<carol@remote.example>") == Milter.REJECT
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE
    store.delete(["192.0.2.9"])
    assert c.rcpt("<carol@remote.example>") == Milter.CONTINUE
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.REJECT
    assert c.rcpt("<bob@local.test>") == Milter.CONTINUE


def test_relayers_read_once_per_transaction(setup):
    holder, store, _, _ = setup
    store.add({"192.0.2.9": int(time.time())})
    asked = []
    real = holder.current.relayers.lookup

    def counting(ip):
        asked.append(ip)
        return real(ip)

    holder.current.relayers.lookup = counting
    c = Conn(holder, "192.0.2.9")
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    for rcpt in ("<bob@local.test>", "<b1@remote.example>", "<b2@remote.example>", "<b3@elsewhere.example>"):
        assert c.rcpt(rcpt) == Milter.CONTINUE
    assert asked == ["192.0.2.9"]
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<b1@remote.example>") == Milter.CONTINUE
    assert asked == ["192.0.2.9"] * 2


def test_auth_seen_at_a_later_mail(setup):
    holder, _, _, _ = setup
    c = Conn(holder, "192.0.2.10")
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.REJECT
    assert c.mail("<a@example.net>", auth="alice") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE


def test_an_8bit_auth_name_is_decoded_leniently_and_logged_escaped(setup):
    holder, _, lines, _ = setup
    c = Conn(holder, "192.0.2.10")
    assert c.mail("<a@example.net>", auth=b"j\xf6rg\x01") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE
    holder.decisions.flush()
    assert "sasl_username=j\\xf6rg\\x01 rule=sender_ok" in lines[0]
    assert lines[1].endswith("rule=authenticated")


def test_a_long_recipient_is_logged_truncated(setup):
    holder, _, lines, _ = setup
    c = Conn(holder, "192.0.2.10")
    c.mail("<a@example.net>")
    rcpt = "<%s@remote.example>" % ("x" * 65536)
    assert c.rcpt(rcpt) == Milter.REJECT
    holder.decisions.flush()
    assert len(lines[-1]) < 2000 and "...(%d chars)" % len(rcpt) in lines[-1]


def test_memo_is_exact_and_bounded(setup, monkeypatch):
    holder, _, _, _ = setup
    rt = holder.current
    c = Conn(holder, "192.0.2.11")
    c.mail("<a@example.net>")
    for _ in range(2):
        assert c.rcpt("<bob%remote.example@local.test>") == Milter.REJECT
        assert c.rcpt("<bob@sub.relayed.test>") == Milter.CONTINUE
    assert set(rt.rcpt_memo) == {"<bob%remote.example@local.test>", "<bob@sub.relayed.test>"}
    monkeypatch.setattr(runtime, "MEMO_MAX", 3)
    for k in range(5):
        c.rcpt("<u%d@remote.example>" % k)
    assert len(rt.rcpt_memo) <= 3
    long_rcpt = "<%s@remote.example>" % ("x" * runtime.MEMO_KEY_MAX)
    assert c.rcpt(long_rcpt) == Milter.REJECT
    assert long_rcpt not in rt.rcpt_memo


def test_reload_starts_a_new_memo(setup):
    holder, _, _, cfg = setup
    c = Conn(holder, "192.0.2.12")
    c.mail("<a@example.net>")
    assert c.rcpt("<bob@other.test>") == Milter.REJECT
    cfg.write_text(cfg.read_text().replace("[local.test]", "[local.test, other.test]"))
    holder.swap(load_config(str(cfg)))
    assert c.rcpt("<bob@other.test>") == Milter.REJECT     # the open connection keeps its rules
    c2 = Conn(holder, "192.0.2.12")
    c2.mail("<a@example.net>")
    assert c2.rcpt("<bob@other.test>") == Milter.CONTINUE


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("bug")


def test_connect_failure_is_answered_at_mail_and_rcpt(setup):
    holder, _, lines, _ = setup
    c = Conn(holder, None)
    # connect sends no reply, so it must not fail there; it must not pass either.
    assert c.connect("x", hostaddr=(Unprintable(), 1)) == Milter.NOREPLY
    assert c.mail("<a@example.net>") == Milter.TEMPFAIL
    assert c.rcpt("<bob@local.test>") == Milter.TEMPFAIL
    assert c.replies == [("451", "4.3.0", "Internal error, try again later")] * 2
    holder.decisions.flush()
    assert lines[0].endswith("451 4.3.0 <a@example.net>: Internal error, try again later; "
                             "from=<a@example.net> rule=internal_error")


def test_exception_in_rcpt_tempfails(setup, caplog):
    holder, _, _, _ = setup

    class Broken:
        location = holder.current.relayers.location

        def lookup(self, ip: str):
            raise RuntimeError("bug")

    holder.current.relayers = Broken()
    c = Conn(holder, "192.0.2.13")
    c.mail("<a@example.net>")
    assert c.rcpt("<bob@remote.example>") == Milter.TEMPFAIL
    assert c.replies[-1] == ("451", "4.3.0", "Internal error, try again later")
    assert "internal error in envrcpt from [192.0.2.13]" in caplog.text
    assert c.rcpt("<bob@local.test>") == Milter.CONTINUE   # decided before any lookup


def test_replies_need_no_percent_escaping():
    # The adapter calls the context's setreply directly: every reply must be free of '%'.
    table = [v for v in vars(replies).values() if isinstance(v, replies.Reply)]
    assert table and all("%" not in r.text for r in table)


def test_a_session_runs_through_the_registered_callbacks(setup):
    holder, store, lines, _ = setup
    c = Conn(holder, None)
    m = c.connection
    assert isinstance(m, adapter.Connection) and m.ctx is c.ctx
    assert c.connect("192.0.2.20", hostname="client.example") == Milter.NOREPLY
    assert c.mail(b"<a@example.net>") == Milter.CONTINUE
    assert c.rcpt(b"<bob@local.test>") == Milter.CONTINUE
    assert c.rcpt(b"<bob@remote.example>") == Milter.REJECT
    store.add({"192.0.2.20": int(time.time())})
    assert c.mail(b"<a@example.net>") == Milter.CONTINUE        # the next transaction
    assert c.rcpt(b"<bob@remote.example>") == Milter.CONTINUE
    assert c.rcpt(b"<j\xf6rg@remote.example>") == Milter.CONTINUE     # not UTF-8: decoded, decided
    assert c.replies == [("550", "5.7.1", "Relaying denied")]
    assert c.close() == Milter.CONTINUE
    assert m.ctx is None           # the context/object cycle is broken, so refcounting frees both
    holder.decisions.flush()
    assert [line.split(": ", 2)[1] for line in lines] == ["pass", "pass", "reject", "pass", "pass", "pass"]
    assert "from client.example[192.0.2.20]" in lines[0]


def test_connect_without_negotiation_gets_a_reply(setup):
    holder, _, _, _ = setup
    c = Conn(holder, None, negotiate=False)
    # An MTA that skipped option negotiation expects a reply to connect.
    assert c.connect("192.0.2.21") == Milter.CONTINUE
    assert c.mail(b"<a@example.net>") == Milter.CONTINUE
    assert c.rcpt(b"<bob@remote.example>") == Milter.REJECT
    assert adapter.callbacks(holder)["close"](Context()) == Milter.CONTINUE    # close before anything: nothing to do


@pytest.mark.parametrize("family, hostaddr", [(socket.AF_UNIX, "/run/sendmail.sock"), (0, None)])
def test_local_and_unknown_families_are_not_trusted(setup, family, hostaddr):
    holder, _, lines, _ = setup
    c = Conn(holder, None)
    c.funcs["connect"](c.ctx, "localhost", family, hostaddr)
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.REJECT
    assert c.rcpt("<bob@local.test>") == Milter.CONTINUE
    holder.decisions.flush()
    assert "rule=default_reject" in lines[-2]


def test_trust_local_socket_trusts_a_unix_socket_client_only(setup):
    holder, _, _, cfg = setup
    cfg.write_text(cfg.read_text() + "trust_local_socket: true\n")
    holder.swap(load_config(str(cfg)))
    c = Conn(holder, None)
    c.funcs["connect"](c.ctx, "localhost", socket.AF_UNIX, "/run/sendmail.sock")
    c.mail("<a@example.net>")
    assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE
    unknown = Conn(holder, None)
    unknown.funcs["connect"](unknown.ctx, "localhost", 0, None)
    unknown.mail("<a@example.net>")
    assert unknown.rcpt("<bob@remote.example>") == Milter.REJECT


def test_clients_are_placed_at_each_connect(setup):
    holder, _, _, _ = setup
    c1 = Conn(holder, "192.0.2.30")
    c2 = Conn(holder, "192.0.2.30", hostname="named.example")
    assert c1.connection.session.client == c2.connection.session.client
    assert (c1.connection.client_text, c2.connection.client_text) == ("[192.0.2.30]", "named.example[192.0.2.30]")
    c3 = Conn(holder, "::ffff:192.0.2.30", hostname="[x]")
    assert c3.connection.session.client.key == "192.0.2.30" and c3.connection.client_text == "[192.0.2.30]"
    for _ in range(2):
        c = Conn(holder, "127.0.0.1")
        c.mail("<a@example.net>")
        assert c.rcpt("<bob@remote.example>") == Milter.CONTINUE


def test_unreadable_spammers_map_tempfails_senders_but_not_the_null_sender(setup, tmp_path):
    holder, _, lines, _ = setup
    (tmp_path / "spammers.db").write_bytes(b"not a hash database\n" * 64)
    c = Conn(holder, "192.0.2.50")
    assert c.mail("<a@example.net>") == Milter.TEMPFAIL
    assert c.replies[-1][:2] == ("451", "4.3.0")
    assert c.mail("<>") == Milter.CONTINUE                # never looked up
    holder.decisions.flush()
    assert lines[-2].endswith('rule=spammers_unavailable cause="%s: is not a hash database"' % (tmp_path / "spammers.db"))
    assert lines[-1].endswith("rule=null_sender")
