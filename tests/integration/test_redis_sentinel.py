"""High availability: a real primary, a replica and three redis-sentinel processes on loopback.

The milter and the writers reach Redis through
``redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/relaymaster/0``.
The primary is killed (SIGKILL): while the sentinels vote, relay checks are
answered from the replica, so relaying never stops; once the replica is
promoted, writes land on it and every entry it had is still there. Then the
old primary comes back as a replica and a manual failover moves the primary
back: the store's connections to the demoted server are replaced at once
(the demoted server refuses writes with READONLY, or the sentinels
disconnect its clients), again without a failed write.

Sentinel timeouts are short (down-after-milliseconds 1000, failover-timeout
3000) and every wait is bounded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter.harness import MilterSession
from relaymilter.store.redis import RedisRelayStore
from relaymilter.store.relayers import open_relay_store

from milterproc import MilterProcess
from redisproc import RedisServer, SentinelProcess, wait_for

pytestmark = pytest.mark.integration

SERVICE = "relaymaster"
DENIED = "550 5.7.1 Relaying denied"


def relay(m: MilterProcess, client: str) -> str:
    with MilterSession(m.socket, timeout=10) as s:
        s.connect(client_ip=client)
        s.helo("client.example")
        s.mail("<someone@example.net>")
        return str(s.rcpt("<bob@remote.example>"))


class Topology:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary = RedisServer(workdir / "primary").start()
        self.replica = RedisServer(workdir / "replica", replica_of=self.primary.port).start()
        self.sentinels = [SentinelProcess(workdir / ("sentinel%d" % i), self.primary.port, SERVICE).start()
                          for i in range(3)]
        self.extra: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://%s/%s/0" % (",".join("127.0.0.1:%d" % s.port for s in self.sentinels), SERVICE)

    def link_up(self, replica: RedisServer) -> bool:
        with replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    def settled(self, replicas: int) -> bool:
        """Every sentinel sees the other two and *replicas* healthy replicas."""
        for s in self.sentinels:
            state = s.master_state()
            if int(state.get("num-other-sentinels", 0)) != 2 or int(state.get("num-slaves", 0)) < replicas:
                return False
            with s.client() as c:
                healthy = [r for r in c.sentinel_slaves(SERVICE) if not (r["is_sdown"] or r["is_odown"])]
            if len(healthy) < replicas:
                return False
        return True

    def master_port(self) -> set:
        return {s.master_port() for s in self.sentinels if s.running()}

    def stop(self) -> None:
        for p in [*self.sentinels, self.primary, self.replica, *self.extra]:
            p.stop()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    topo = Topology(tmp_path)
    try:
        wait_for(lambda: topo.link_up(topo.replica), 15, "the replica to sync")
        wait_for(lambda: topo.settled(1), 30, "the sentinels to find each other and the replica")
        yield topo
    finally:
        topo.stop()


def test_failover_keeps_relaying_and_loses_nothing(tmp_path, topology):
    topo = topology
    store = open_relay_store(topo.url)
    assert isinstance(store, RedisRelayStore)
    milter = MilterProcess(tmp_path / "smtp", {"relayers": {"url": topo.url}}).start()
    try:
        now = int(time.time())
        entries = {"10.1.%d.%d" % (i // 250, i % 250 + 1): now - i for i in range(600)}
        entries["192.0.2.7"] = now
        store.add(entries)
        store.add({"192.0.2.70": now}, ttl=3600)
        with topo.primary.client() as c:
            assert c.wait(1, 5000) == 1          # the replica has acknowledged every write
        with topo.replica.client() as c:
            assert c.dbsize() == len(entries) + 1
        assert relay(milter, "192.0.2.7") == "continue"
        assert "replica" not in milter.log()            # answered by the primary, through the sentinels

        old_port = topo.primary.port
        topo.primary.kill()
        # Relay checks all through the failover: the replica answers while the sentinels vote.
        replies: list[str] = []
        started = time.monotonic()

        def promoted() -> bool:
            replies.append(relay(milter, "192.0.2.7"))
            assert store.lookup("192.0.2.70") == now
            return topo.master_port() == {topo.replica.port}

        took = wait_for(promoted, 30, "the sentinels to promote the replica")
        assert set(replies) == {"continue"}, replies
        assert took >= 0.9                      # down-after-milliseconds: a real failover happened
        milter.wait_for_log("answering lookups from a replica", timeout=5)

        # Writes go to the new primary as soon as the sentinels name it.
        wait_for(lambda: _try_add(store, {"192.0.2.8": now}), 2, "the first write after the switch")
        store.add({"192.0.2.9": now}, ttl=600)
        got = dict(store.entries())
        assert {ip: got.get(ip) for ip in entries} == entries          # nothing the replica had is lost
        assert got["192.0.2.8"] == got["192.0.2.9"] == got["192.0.2.70"] == now
        with topo.replica.client() as c:
            assert c.info("replication")["role"] == "master"
            assert c.get("relaymilter:relay:192.0.2.8") == b"%d" % now
        assert relay(milter, "192.0.2.8") == "continue"     # written after failover, read by the milter
        milter.wait_for_log("primary reachable again", timeout=5)   # not stuck on the replica path
        assert relay(milter, "192.0.2.99") == DENIED
        assert time.monotonic() - started < 30

        # The old primary returns as a replica; a manual failover makes it primary again.
        back = RedisServer(tmp_path / "primary-again", port=old_port, replica_of=topo.replica.port).start()
        topo.extra.append(back)
        wait_for(lambda: topo.link_up(back), 15, "the old primary to sync as a replica")
        wait_for(lambda: topo.settled(1), 30, "the sentinels to see the returned server healthy")
        assert store.lookup("192.0.2.8") == now          # a pooled connection to the current primary
        with topo.sentinels[0].client() as c:
            c.sentinel_failover(SERVICE)
        wait_for(lambda: topo.master_port() == {old_port}, 30, "the manual failover")
        # The sentinels demote the other server only after naming the new primary; a write it took
        # in between would be lost in its resync (a Sentinel property), so wait for the demotion.
        wait_for(lambda: _role(topo.replica) == "slave", 15, "the previous primary to be demoted")
        store.add({"192.0.2.10": now})                     # the old connection's server is a replica now
        with back.client() as c:
            assert c.get("relaymilter:relay:192.0.2.10") == b"%d" % now
        assert relay(milter, "192.0.2.10") == "continue"
        assert len(store.entries()) == len(entries) + 4      # .70, .8, .9, .10
    finally:
        milter.stop()
        store.close()


def _role(server: RedisServer) -> str:
    with server.client() as c:
        return c.info("replication")["role"]


def _try_add(store: RedisRelayStore, entries: dict) -> bool:
    from relaymilter.errors import StoreUnavailable

    try:
        store.add(entries)
        return True
    except StoreUnavailable:
        return False
