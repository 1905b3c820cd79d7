"""The adapter's callbacks called as pymilter calls them, on real relayers.db/spammers.db files.

The libmilter context is the one stand-in: it records setreply() and
serves macros, as libmilter's context would for the MTA's packets.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import Milter
import pytest

from relaymilter import adapter, replies, runtime
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.relayers import BDBRelayStore
from relaymilter.store.spammers import write_db


class Context:
    """What RelayMilter uses of libmilter's context: macros in, replies out."""

    def __init__(self, macros: dict | None = None) -> None:
        self.macros = dict(macros or {})
        self.replies: list[tuple] = []

    def getsymval(self, name: str):
        return self.macros.get(name)

    def setreply(self, *reply) -> None:
        self.replies.append(reply)

    def setpriv(self, priv) -> None:
        pass


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


def open_conn(holder, ip="192.0.2.7", macros=None, hostname=None):
    m = adapter.RelayMilter(holder)
    ctx = Context(macros)
    m._setctx(ctx)
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    assert m.negotiate(opts) == Milter.CONTINUE
    assert m.connect(hostname or "[%s]" % ip, socket.AF_INET, (ip, 4321)) == Milter.NOREPLY
    return m, ctx


def test_negotiate_asks_for_no_connect_reply_and_the_callbacks_it_uses():
    m = adapter.RelayMilter.__new__(adapter.RelayMilter)
    m._setctx(None)
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    m.negotiate(opts)
    assert opts[1] & Milter.P_NR_CONN
    for step in (Milter.P_NOCONNECT, Milter.P_NOMAIL, Milter.P_NORCPT, Milter.P_NR_MAIL, Milter.P_NR_RCPT):
        assert not opts[1] & step
    assert opts[1] & Milter.P_NOHDRS and opts[1] & Milter.P_NOBODY
    # Same answer as pymilter's own negotiate, which this one only shortcuts.
    base = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    Milter.Base.negotiate(m, base)
    assert base == opts


def test_decision_lines(setup):
    holder, store, lines, _ = setup
    store.add({"192.0.2.8": int(time.time())})
    m, ctx = open_conn(holder, "192.0.2.7", hostname="client.example")
    assert m.envfrom_bytes(b"<alice@example.net>", b"SIZE=10") == Milter.CONTINUE
    assert m.envrcpt_bytes(b"<bob@local.test>") == Milter.CONTINUE
    assert m.envrcpt_bytes(b"bob@remote.example") == Milter.REJECT
    assert ctx.replies == [("550", "5.7.1", "Relaying denied")]
    m2, _ = open_conn(holder, "192.0.2.8", macros={"{auth_authen}": "carol"})
    assert m2.envfrom_bytes(b"<carol@spam.example>") == Milter.REJECT
    holder.decisions.flush()
    a, b = "%06X" % m.conn_id, "%06X" % m2.conn_id
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
    m, _ = open_conn(holder, "192.0.2.9")
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<bob@remote.example>") == Milter.REJECT
    store.add({"192.0.2.9": int(time.time())})
    assert m.envrcpt("<carol@remote.example>") == Milter.REJECT
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<bob@remote.example>") == Milter.CONTINUE
    store.delete(["192.0.2.9"])
    assert m.envrcpt("<carol@remote.example>") == Milter.CONTINUE
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<bob@remote.example>") == Milter.REJECT
    assert m.envrcpt("<bob@local.test>") == Milter.CONTINUE


def test_relayers_read_once_per_transaction(setup):
    holder, store, _, _ = setup
    store.add({"192.0.2.9": int(time.time())})
    asked = []
    real = holder.current.relayers.lookup

    def counting(ip):
        asked.append(ip)
        return real(ip)

    holder.current.relayers.lookup = counting
    m, _ = open_conn(holder, "192.0.2.9")
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    for rcpt in ("<bob@local.test>", "<b1@remote.example>", "<b2@remote.example>", "<b3@elsewhere.example>"):
        assert m.envrcpt(rcpt) == Milter.CONTINUE
    assert asked == ["192.0.2.9"]
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<b1@remote.example>") == Milter.CONTINUE
    assert asked == ["192.0.2.9"] * 2


def test_auth_seen_at_a_later_mail(setup):
    holder, _, _, _ = setup
    m, ctx = open_conn(holder, "192.0.2.10")
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<bob@remote.example>") == Milter.REJECT
    ctx.macros["{auth_authen}"] = "alice"
    assert m.envfrom("<a@example.net>") == Milter.CONTINUE
    assert m.envrcpt("<bob@remote.example>") == Milter.CONTINUE


def test_memo_is_exact_and_bounded(setup, monkeypatch):
    holder, _, _, _ = setup
    rt = holder.current
    m, _ = open_conn(holder, "192.0.2.11")
    m.envfrom("<a@example.net>")
    for _ in range(2):
        assert m.envrcpt("<bob%remote.example@local.test>") == Milter.REJECT
        assert m.envrcpt("<bob@sub.relayed.test>") == Milter.CONTINUE
    assert set(rt.rcpt_memo) == {"<bob%remote.example@local.test>", "<bob@sub.relayed.test>"}
    assert set(rt.sender_memo) == {"<a@example.net>"}
    monkeypatch.setattr(runtime, "MEMO_MAX", 3)
    for k in range(5):
        m.envrcpt("<u%d@remote.example>" % k)
    assert len(rt.rcpt_memo) <= 3
    long_rcpt = "<%s@remote.example>" % ("x" * runtime.MEMO_KEY_MAX)
    assert m.envrcpt(long_rcpt) == Milter.REJECT
    assert long_rcpt not in rt.rcpt_memo


def test_reload_starts_a_new_memo(setup):
    holder, _, _, cfg = setup
    m, _ = open_conn(holder, "192.0.2.12")
    m.envfrom("<a@example.net>")
    assert m.envrcpt("<bob@other.test>") == Milter.REJECT
    cfg.write_text(cfg.read_text().replace("[local.test]", "[local.test, other.test]"))
    holder.swap(load_config(str(cfg)))
    assert m.envrcpt("<bob@other.test>") == Milter.REJECT     # the open connection keeps its rules
    m2, _ = open_conn(holder, "192.0.2.12")
    m2.envfrom("<a@example.net>")
    assert m2.envrcpt("<bob@other.test>") == Milter.CONTINUE


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("bug")


def test_connect_failure_is_answered_at_mail_and_rcpt(setup):
    holder, _, lines, _ = setup
    m = adapter.RelayMilter(holder)
    ctx = Context()
    m._setctx(ctx)
    m.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    # connect sends no reply, so it must not fail there; it must not pass either.
    assert m.connect("host", socket.AF_INET, (Unprintable(), 1)) == Milter.NOREPLY
    assert m.envfrom("<a@example.net>") == Milter.TEMPFAIL
    assert m.envrcpt("<bob@local.test>") == Milter.TEMPFAIL
    assert ctx.replies == [("451", "4.3.0", "Internal error, try again later")] * 2
    holder.decisions.flush()
    assert lines[0].endswith("451 4.3.0 <a@example.net>: Internal error, try again later; "
                             "from=<a@example.net> rule=internal_error")


def test_exception_in_rcpt_tempfails(setup, caplog):
    holder, _, _, _ = setup
    m, ctx = open_conn(holder, "192.0.2.13")
    m.envfrom("<a@example.net>")

    class Broken:
        def lookup(self, ip: str):
            raise RuntimeError("bug")

    m.rt = adapter.Runtime(holder.current.config, holder.current)
    m.rt.relayers = Broken()
    assert m.envrcpt("<bob@remote.example>") == Milter.TEMPFAIL
    assert ctx.replies[-1] == ("451", "4.3.0", "Internal error, try again later")
    assert "internal error in envrcpt from [192.0.2.13]" in caplog.text
    assert m.envrcpt("<bob@local.test>") == Milter.CONTINUE   # decided before any lookup


def test_replies_need_no_percent_escaping():
    # _set_reply bypasses Base.setreply's '%' check: every reply must be free of '%'.
    table = [v for v in vars(replies).values() if isinstance(v, replies.Reply)]
    assert table and all("%" not in r.text for r in table)


class PrivContext(Context):
    """As libmilter's context through pymilter's C module: it also holds the connection's object."""

    def __init__(self, macros: dict | None = None) -> None:
        super().__init__(macros)
        self.priv = None

    def getpriv(self):
        return self.priv

    def setpriv(self, priv) -> None:
        self.priv = priv


def test_registered_callbacks_run_a_session(setup):
    holder, store, lines, _ = setup
    funcs = adapter.callbacks(holder)
    assert set(funcs) == {"negotiate", "connect", "envfrom", "envrcpt", "close"}     # no abort, helo, eom...
    ctx = PrivContext()
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    assert funcs["negotiate"](ctx, opts) == Milter.CONTINUE and opts[1] & Milter.P_NR_CONN
    m = ctx.priv
    assert isinstance(m, adapter.RelayMilter) and m._ctx is ctx
    assert funcs["connect"](ctx, "client.example", socket.AF_INET, ("192.0.2.20", 4000)) == Milter.NOREPLY
    assert funcs["envfrom"](ctx, b"<a@example.net>", b"SIZE=10") == Milter.CONTINUE
    assert funcs["envrcpt"](ctx, b"<bob@local.test>") == Milter.CONTINUE
    assert funcs["envrcpt"](ctx, b"<bob@remote.example>") == Milter.REJECT
    store.add({"192.0.2.20": int(time.time())})
    assert funcs["envfrom"](ctx, b"<a@example.net>") == Milter.CONTINUE        # the next transaction
    assert funcs["envrcpt"](ctx, b"<bob@remote.example>") == Milter.CONTINUE
    assert funcs["envrcpt"](ctx, b"<j\xf6rg@remote.example>") == Milter.CONTINUE     # not UTF-8: decoded, decided
    assert ctx.replies == [("550", "5.7.1", "Relaying denied")]
    assert funcs["close"](ctx) == Milter.CONTINUE
    assert m._ctx is None           # the context/object cycle is broken, so refcounting frees both
    holder.decisions.flush()
    assert [line.split(": ", 2)[1] for line in lines] == ["pass", "pass", "reject", "pass", "pass", "pass"]
    assert "from client.example[192.0.2.20]" in lines[0]


def test_connect_without_negotiation_gets_a_reply(setup):
    holder, _, _, _ = setup
    funcs = adapter.callbacks(holder)
    ctx = PrivContext()
    # An MTA that skipped option negotiation expects a reply to connect.
    assert funcs["connect"](ctx, "[192.0.2.21]", socket.AF_INET, ("192.0.2.21", 4000)) == Milter.CONTINUE
    assert funcs["envfrom"](ctx, b"<a@example.net>") == Milter.CONTINUE
    assert funcs["envrcpt"](ctx, b"<bob@remote.example>") == Milter.REJECT
    assert funcs["close"](PrivContext()) == Milter.CONTINUE      # close before anything else: nothing to do


def test_clients_are_memoised_per_address_and_bounded(setup, monkeypatch):
    holder, _, _, _ = setup
    rt = holder.current
    m1, _ = open_conn(holder, "192.0.2.30")
    m2, _ = open_conn(holder, "192.0.2.30", hostname="named.example")
    assert m1.client is m2.client and m1.rules is m2.rules
    assert (m1.client_text, m2.client_text) == ("[192.0.2.30]", "named.example[192.0.2.30]")
    m3 = adapter.RelayMilter(holder)
    m3._setctx(Context())
    m3.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    m3.connect("[x]", socket.AF_INET6, ("::ffff:192.0.2.30", 1, 0, 0))
    assert m3.client.key == "192.0.2.30" and m3.client_text == "[192.0.2.30]"
    monkeypatch.setattr(runtime, "MEMO_MAX", 3)
    for k in range(5):
        open_conn(holder, "192.0.2.%d" % (40 + k))
    assert 0 < len(rt.client_memo) <= 3
    # A trusted client found through the memo is still trusted.
    m4, _ = open_conn(holder, "127.0.0.1")
    m5, _ = open_conn(holder, "127.0.0.1")
    for m in (m4, m5):
        m.envfrom("<a@example.net>")
        assert m.envrcpt("<bob@remote.example>") == Milter.CONTINUE


def test_unreadable_spammers_map_tempfails_senders_but_not_the_null_sender(setup, tmp_path):
    holder, _, lines, _ = setup
    (tmp_path / "spammers.db").write_bytes(b"not a hash database\n" * 64)
    m, ctx = open_conn(holder, "192.0.2.50")
    assert m.envfrom("<a@example.net>") == Milter.TEMPFAIL
    assert ctx.replies[-1][:2] == ("451", "4.3.0")
    assert m.envfrom("<>") == Milter.CONTINUE                # never looked up
    holder.decisions.flush()
    assert lines[-2].endswith("rule=spammers_unavailable") and lines[-1].endswith("rule=null_sender")
