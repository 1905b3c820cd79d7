"""A mail farm on one Redis: two POP hosts write, two SMTP hosts (milters) read.

"POP hosts": two real Dovecot servers, each logging to its own file, each
followed by its own relaymilter-popwatch writing to the shared Redis.
"SMTP hosts": two relaymilter processes whose configuration says
``relayers: {url: redis://...}`` (the milter itself is unchanged: it opens
whatever store the configuration names). The milters are driven over the
milter protocol with the harness. A login on either POP host lets the
client relay through either milter; after the grace the key is gone (Redis
expires it, the watchers delete it) and relay is refused again.

Redis killed mid-run: relay attempts get 451 4.3.0, never continue, local
recipients still pass; Redis restarted on the same port: relaying works
again with nothing else restarted.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.harness import MilterSession
from relaymilter.store.relayers import open_relay_store

from dovecot import PASSWORD, USER, DovecotServer, imap_from, pop3_login
from milterproc import MilterProcess
from redisproc import RedisServer, ToolProcess, wait_for

pytestmark = pytest.mark.integration

DENIED = "550 5.7.1 Relaying denied"
TEMPFAIL = "451 4.3.0 Relay check temporarily unavailable, try again later"
GRACE = 3
KEY = "relaymilter:relay:"


def rcpts(m: MilterProcess, client: str, recipients: list[str]) -> list[str]:
    with MilterSession(m.socket, timeout=10) as s:
        s.connect(client_ip=client)
        s.helo("client.example")
        assert s.mail("<someone@example.net>").action == "continue"
        return [str(s.rcpt(r)) for r in recipients]


def relay(m: MilterProcess, client: str) -> str:
    return rcpts(m, client, ["<bob@remote.example>"])[0]


@pytest.fixture
def smtp_hosts(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[MilterProcess]]:
    milters: list[MilterProcess] = []
    try:
        for name in ("smtp1", "smtp2"):
            m = MilterProcess(tmp_path / name, {"relayers": {"url": redis_server.url()}})
            milters.append(m.start())
        yield milters
    finally:
        for m in milters:
            m.stop()


def popwatch_config(path: Path, url: str, logfile: str) -> Path:
    path.write_text(
        "add_host_names: false\n"
        "relayers: {url: '%s'}\n"
        "popwatch:\n"
        "  logfiles: [%s]\n"
        "  grace: %d\n"
        "  skip_networks: [127.0.0.1/32]\n" % (url, logfile, GRACE), encoding="utf-8")
    return path


@pytest.fixture
def pop_hosts(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[DovecotServer]]:
    servers: list[DovecotServer] = []
    watchers: list[ToolProcess] = []
    try:
        for name in ("pop1", "pop2"):
            dc = DovecotServer().start()
            servers.append(dc)
            cfg = popwatch_config(tmp_path / ("%s.yaml" % name), redis_server.url(), dc.log_path)
            pw = ToolProcess(["relaymilter-popwatch", "-c", str(cfg)])
            watchers.append(pw)
            wait_for(lambda: pw.said("following ") or not pw.running(), 10, "popwatch on %s to start" % name)
            assert pw.running(), pw.output()
            dc.watcher = pw  # type: ignore[attr-defined]
        yield servers
    finally:
        for pw in watchers:
            pw.stop()
        for dc in servers:
            dc.stop()


def imap_login(source: str, port: int) -> None:
    client = imap_from(source, port)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    client.logout()


def test_a_login_on_either_pop_host_relays_through_either_smtp_host(redis_server, smtp_hosts, pop_hosts):
    smtp1, smtp2 = smtp_hosts
    pop1, pop2 = pop_hosts
    shared = open_relay_store(redis_server.url())
    try:
        for m in smtp_hosts:
            assert relay(m, "127.0.0.7") == DENIED
            assert relay(m, "127.0.0.9") == DENIED

        t0 = time.time()
        pop3_login("127.0.0.7", pop1.pop3_port)     # POP host 1
        imap_login("127.0.0.9", pop2.imap_port)     # POP host 2
        wait_for(lambda: shared.lookup("127.0.0.7") is not None and shared.lookup("127.0.0.9") is not None,
                 10, "both logins to reach Redis")
        assert int(t0) - 1 <= shared.lookup("127.0.0.7") <= time.time() + 1
        assert pop1.watcher.said("login from 127.0.0.7") and not pop2.watcher.said("127.0.0.7")
        assert pop2.watcher.said("login from 127.0.0.9") and not pop1.watcher.said("127.0.0.9")
        # The watcher's grace is the key's TTL: Redis drops it even if no watcher is left.
        with redis_server.client() as c:
            for ip in ("127.0.0.7", "127.0.0.9"):
                assert 0 < c.ttl(KEY + ip) <= GRACE

        for m in smtp_hosts:
            assert relay(m, "127.0.0.7") == "continue"
            assert relay(m, "127.0.0.9") == "continue"
            assert relay(m, "127.0.0.8") == DENIED
        smtp1.wait_for_log("rule=relayers_db")      # decision lines are written in batches
        smtp2.wait_for_log("rule=relayers_db")

        wait_for(lambda: shared.entries() == [], GRACE + 8, "the grace to run out")
        with redis_server.client() as c:
            assert list(c.scan_iter(KEY + "*")) == []
        for m in smtp_hosts:
            assert relay(m, "127.0.0.7") == DENIED
            assert relay(m, "127.0.0.9") == DENIED
    finally:
        shared.close()


def test_redis_killed_then_restarted_while_milters_run(tmp_path, redis_server, smtp_hosts):
    url = redis_server.url()
    subprocess.run(["vsmtprelay", "-f", url, "add", "192.0.2.7"], check=True, timeout=60)
    pids = [m.pid for m in smtp_hosts]
    for m in smtp_hosts:
        assert relay(m, "192.0.2.7") == "continue"

    port = redis_server.port
    redis_server.kill()
    for m in smtp_hosts:
        start = time.monotonic()
        got = rcpts(m, "192.0.2.7", ["<bob@remote.example>", "<bob@local.test>", "<x@relayed.test>",
                                     "<carol@remote.example>"])
        assert got == [TEMPFAIL, "continue", "continue", TEMPFAIL]
        assert time.monotonic() - start < 3
        assert relay(m, "192.0.2.99") == TEMPFAIL          # never a 550 on a guess either
        assert relay(m, "127.0.0.1") == "continue"          # trusted: no lookup needed
        m.wait_for_log("tempfail: RCPT from [192.0.2.7]: 451 4.3.0")

    again = RedisServer(tmp_path / "redis-again", port=port).start()
    try:
        # Nothing was persisted (--save ''): the POP side writes again, the milters just reconnect.
        for m in smtp_hosts:
            assert relay(m, "192.0.2.7") == DENIED
        subprocess.run(["vsmtprelay", "-f", url, "add", "192.0.2.7"], check=True, timeout=60)
        for m in smtp_hosts:
            assert relay(m, "192.0.2.7") == "continue"
        assert [m.pid for m in smtp_hosts] == pids and all(m.proc.poll() is None for m in smtp_hosts)
    finally:
        again.stop()


def test_milter_starts_while_redis_is_down(tmp_path):
    """An SMTP host booting before Redis: it starts, tempfails relay attempts, then just works."""
    from redisproc import free_port

    port = free_port()
    url = "redis://127.0.0.1:%d/0" % port
    m = MilterProcess(tmp_path / "smtp", {"relayers": {"url": url}}).start()
    try:
        assert rcpts(m, "192.0.2.7", ["<bob@remote.example>", "<bob@local.test>"]) == [TEMPFAIL, "continue"]
        srv = RedisServer(tmp_path / "redis", port=port).start()
        try:
            assert relay(m, "192.0.2.7") == DENIED
            subprocess.run(["vsmtprelay", "-f", url, "add", "192.0.2.7"], check=True, timeout=60)
            assert relay(m, "192.0.2.7") == "continue"
        finally:
            srv.stop()
    finally:
        m.stop()
