"""The dnsbl step through the adapter's registered callbacks, with a real DNS server on loopback.

IPv6 and IPv4-mapped clients (which sendmail's tests, on 127.0.0.x, cannot
be), the replies as set on the context, the decision lines, a reload.
"""

from __future__ import annotations

from pathlib import Path

import Milter
import pytest

from dnsserver import DnsServer, standard_zones
from milterpath import Conn
from relaymilter import adapter
from relaymilter.config import load_config
from relaymilter.decisionlog import DecisionLog
from relaymilter.store.relayers import BDBRelayStore


def write_config(tmp_path: Path, dns: DnsServer, extra: str = "") -> Path:
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text("add_host_names: false\nlocal_domains: [local.test]\nrelay_domains: [relayed.test]\n"
                   "trusted_networks: [127.0.0.1/32]\nrelayers: {path: %s}\nspammers: {path: %s}\n"
                   "dnsbl:\n  sites: [bl.test, err.test]\n  nameservers: ['%s']\n  timeout: 1.0\n%s"
                   % (tmp_path / "relayers.db", tmp_path / "spammers.db", dns.nameserver, extra))
    return cfg


@pytest.fixture
def rig(tmp_path: Path):
    with DnsServer(standard_zones()) as dns:
        cfg = write_config(tmp_path, dns)
        lines: list[str] = []
        decisions = DecisionLog(lines.extend, interval=3600)
        holder = adapter.RuntimeHolder(adapter.Runtime(load_config(str(cfg))), decisions)
        try:
            yield holder, dns, lines, decisions, tmp_path
        finally:
            decisions.close()


@pytest.mark.parametrize("ip,shown", [("2001:db8::30", "2001:db8::30"), ("::ffff:192.0.2.30", "192.0.2.30")])
def test_listed_ipv6_and_mapped_clients(rig, ip, shown):
    holder, dns, lines, decisions, _ = rig
    c = Conn(holder, ip)
    assert c.mail("<a@example.net>") == Milter.CONTINUE
    assert c.rcpt("<alice@local.test>") == Milter.REJECT
    assert c.rcpt("<postmaster@local.test>") == Milter.CONTINUE
    assert c.rcpt("<bob@remote.example>") == Milter.REJECT
    reason = "IPv6 listing" if ":" in shown else "Listed for testing"
    assert c.replies[0] == ("554", "5.7.1", "Service unavailable; Client host [%s] blocked using bl.test; %s"
                            % (shown, reason))
    assert c.replies[1] == ("550", "5.7.1", "Relaying denied")
    decisions.flush()
    answer = "127.0.0.2" if ":" in shown else "127.0.0.4"
    assert lines[1].endswith("to=<alice@local.test> resolved=alice@local.test rule=dnsbl site=bl.test answer=%s "
                             "weight=1/1" % answer), lines[1]
    assert lines[2].endswith("rule=local_domain"), lines[2]      # exempt: nothing asked, nothing noted
    assert [q for q in dns.queries() if "err.test" in q[0] and not q[0].startswith(("1.0.0.127", "2.0.0.127"))] == []


def test_users_never_asked(rig):
    holder, dns, lines, decisions, tmp_path = rig
    BDBRelayStore(str(tmp_path / "relayers.db")).add({"2001:db8::30": 2_000_000_000})
    dns.clear()
    c = Conn(holder, "2001:db8::30")
    c.mail("<a@example.net>")
    assert c.rcpt("<alice@local.test>") == Milter.CONTINUE
    c2 = Conn(holder, "192.0.2.30")
    c2.mail("<a@example.net>", auth="alice")
    assert c2.rcpt("<alice@local.test>") == Milter.CONTINUE
    assert dns.queries() == []


def test_reload_without_dnsbl_asks_nothing(rig):
    holder, dns, lines, decisions, tmp_path = rig
    cfg = tmp_path / "relaymilter.yaml"
    cfg.write_text(cfg.read_text().split("dnsbl:")[0])
    old = holder.current
    holder.swap(load_config(str(cfg)))
    assert holder.current.blocklists is None and old.blocklists.dnsbl._retired
    dns.clear()
    c = Conn(holder, "192.0.2.30")
    c.mail("<a@example.net>")
    assert c.rcpt("<alice@local.test>") == Milter.CONTINUE
    assert dns.queries() == []
