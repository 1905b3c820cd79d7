"""End to end: a real Postfix wired with the shipped snippets, a real relaymilter, Dovecot SASL.

Four rigs, one Postfix each, shared by the module: variant (A)
(packaging/postfix/main.cf.snippet: relaymilter decides) and variant (B)
(main.cf.snippet-b: Postfix checks relayers.db itself, relaymilter adds its
refusals), each with relaymilter on an inet and on a unix socket. The snippet
is used verbatim but for the socket and the map path. Postfix delivers nothing:
its transports are discard with a tag, so the log tells LOCAL from RELAY and
REMOTE (a relayed message). SMTP clients bind to 127.0.0.x to act as different
clients; only 127.0.0.1 is in mynetworks and relaymilter's trusted_networks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import mta
import postfix
import saslauth
from milterproc import MilterProcess
from relaymilter.cli.vsmtprelay import main as vsmtprelay_main

BATTERY = yaml.safe_load((Path(__file__).parents[1] / "data" / "relay_battery.yaml").read_text())
RIGS = ("a-inet", "a-unix", "b-inet", "b-unix")
# POP clients in relayers.db before Postfix first opens it
SEEDED_RELAYERS = ("127.0.0.12", "127.0.0.50", "127.0.0.60", "127.0.0.62", "127.0.0.64")
SASL_USERS = {"alice": "wonderland"}
REMOTE = "<bob@remote.example>"
LOCAL = "<alice@local.test>"


@pytest.fixture(scope="module")
def base() -> Path:
    path = postfix.short_rundir("rm-pf-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False, timeout=60)


@pytest.fixture(scope="module")
def sasl(base: Path):
    auth = saslauth.DovecotAuth([base / name / "queue" for name in RIGS], SASL_USERS).start()
    yield auth
    auth.stop()


class Rig:
    """A Postfix with one variant and socket, its relaymilter, and helpers."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.variant, self.kind = name.split("-")
        self.dir = base / name
        self.dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        queue = self.dir / "queue"
        if self.kind == "unix":
            sockdir = queue / "relaymilter"
            sockdir.mkdir(parents=True, exist_ok=True)
            os.chown(sockdir, 0, postfix.ensure_accounts()[1])
            os.chmod(sockdir, 0o2750)
            spec, postfix_spec = "unix:%s/relaymilter.sock" % sockdir, "unix:relaymilter/relaymilter.sock"
        else:
            port = mta.free_port()
            spec, postfix_spec = "inet:%d@127.0.0.1" % port, "inet:127.0.0.1:%d" % port
        self.milter = MilterProcess(self.dir / "milter", {
            "mta": "postfix", "local_domains": ["local.test", "localhost"], "relay_domains": ["relayed.test"],
            "trusted_networks": ["127.0.0.1/32"]}, socket_spec=spec, umask=0o007)
        self.db = self.milter.relayers_db
        self.wiring = postfix.snippet(self.variant, milter=postfix_spec,
                                      relayers_map=self.db[:-3] if self.variant == "b" else None)
        self.pf = postfix.Postfix(self.dir, mta.free_port(), wiring=self.wiring, sasl=True)

    @property
    def port(self) -> int:
        return self.pf.port

    def denied(self, rcpt: str) -> tuple[int, str]:
        """What a client that may not relay gets for *rcpt* in this variant."""
        if self.variant == "a":
            return (550, "5.7.1 Relaying denied")
        return (454, "4.7.1 %s: Relay access denied" % rcpt.strip())

    def vsmtprelay(self, *args: str) -> None:
        subprocess.run(["vsmtprelay", "-f", self.db, *args], check=True, timeout=60, capture_output=True)

    def relay_codes(self, client: str, rcpts=(REMOTE,)) -> list[int]:
        return [r[0] for r in mta.rcpt_replies(self.port, client, "<a@example.net>", list(rcpts))]


@pytest.fixture(scope="module", params=RIGS)
def rig(request, base: Path, sasl):
    r = Rig(request.param, base)
    for client in SEEDED_RELAYERS:
        r.vsmtprelay("add", client)
    r.milter.start()
    try:
        r.pf.start()
        try:
            yield r
        finally:
            r.pf.stop()
    finally:
        r.milter.stop()


def fill(form: str) -> str:
    return form.format(local="local.test", remote="remote.example", local_ip="127.0.0.1")


def test_postfix_runs_the_shipped_relay_restriction(rig):
    shipped = [line for line in postfix.active_lines(postfix.SNIPPETS[rig.variant].read_text())
               if line.startswith("smtpd_relay_restrictions")]
    got = rig.pf.postfix("postconf", "-h", "smtpd_relay_restrictions").stdout.strip()
    assert len(shipped) == 1 and got.split() == shipped[0].split("=", 1)[1].replace(
        postfix.SHIPPED_MAP, rig.db[:-3]).split()
    assert "fatal" not in rig.pf.log()


def test_unknown_client_refused_local_and_relay_domains_accepted(rig):
    sent = postfix.send(rig.port, "127.0.0.5", "<someone@example.net>",
                        [REMOTE, LOCAL, "<postmaster>", "<POSTMASTER@Local.Test>", "<x@relayed.test>",
                         "<x@sub.relayed.test>"])
    assert sent.mail == (250, "2.1.0 Ok")
    assert sent.rcpts[0] == rig.denied(REMOTE)
    assert [r[0] for r in sent.rcpts[1:]] == [250] * 5, sent.rcpts
    assert sent.queue_id, sent.data
    assert rig.pf.wait_delivered(sent.queue_id) == {
        "alice@local.test": "LOCAL", "postmaster@local.test": "LOCAL", "POSTMASTER@Local.Test": "LOCAL",
        "x@relayed.test": "RELAY", "x@sub.relayed.test": "RELAY"}


def test_open_relay_battery_unknown_client(rig):
    forms = [fill(row["rcpt"]) for row in BATTERY["rows"]]
    for sender in BATTERY["senders"]:
        sent = postfix.send(rig.port, "127.0.0.11", fill(sender), forms)
        for form, reply in zip(forms, sent.rcpts):
            # refused by relaymilter or by Postfix's relay check, or as bad syntax: never accepted
            assert reply[0] in (454, 501, 550, 553), (sender, form, reply)
            assert reply[0] != 454 or rig.variant == "b", (form, reply)
        assert sent.queue_id is None


def test_open_relay_battery_known_trusted_and_authenticated_clients(rig):
    forms = [fill(row["rcpt"]) for row in BATTERY["rows"]]
    known = postfix.send(rig.port, "127.0.0.12", "<a@example.net>", forms)
    trusted = postfix.send(rig.port, "127.0.0.1", "<a@example.net>", forms)
    authed = postfix.send(rig.port, "127.0.0.13", "<alice@local.test>", forms, auth=("alice", "wonderland"))
    assert authed.transcript.auth[0] == 235
    for sent in (known, trusted, authed):
        accepted = [form for form, reply in zip(forms, sent.rcpts) if reply[0] == 250]
        for form, reply in zip(forms, sent.rcpts):
            # Nothing is a relay refusal; what Postfix refuses is its own syntax check.
            assert reply[0] in (250, 501), (form, reply)
            assert "Relay" not in reply[1], (form, reply)
        assert len(accepted) >= len(forms) - 4, sent.rcpts
        # Postfix resolves every trick form to a remote address: each one is a relay
        # attempt, which is why an unknown client must get every one refused.
        assert rig.pf.wait_delivered(sent.queue_id) == {
            "relaytest@remote.example": "REMOTE", "relaytest@[192.0.2.1]": "REMOTE",
            "relaytest@[IPv6:2001:db8::1]": "REMOTE"}


def test_wrong_password_is_no_authentication(rig):
    sent = postfix.send(rig.port, "127.0.0.14", "<alice@local.test>", [REMOTE], auth=("alice", "guess"))
    assert sent.transcript.auth[0] == 535
    assert sent.rcpts == [rig.denied(REMOTE)]


def test_hostname_postfix_does_not_treat_as_local_is_no_relay_hole(rig):
    # mta: postfix: the host's own names are not local to relaymilter unless
    # listed (Postfix's mydestination here is local.test, localhost).
    hostname = socket.gethostname()
    rcpt = "<bob@%s>" % hostname
    codes = rig.relay_codes("127.0.0.15", [rcpt, "<bob%%remote.example@%s>" % hostname])
    assert codes == [rig.denied(rcpt)[0]] * 2


def test_vsmtprelay_add_delete_seen_by_next_session(rig):
    assert rig.relay_codes("127.0.0.20") == [rig.denied(REMOTE)[0]]
    rig.vsmtprelay("add", "127.0.0.20")
    sent = postfix.send(rig.port, "127.0.0.20", "<a@example.net>", [REMOTE])
    assert sent.rcpts[0][0] == 250
    assert rig.pf.wait_delivered(sent.queue_id) == {"bob@remote.example": "REMOTE"}
    assert rig.relay_codes("127.0.0.21") == [rig.denied(REMOTE)[0]]
    rig.vsmtprelay("delete", "127.0.0.20")
    assert rig.relay_codes("127.0.0.20") == [rig.denied(REMOTE)[0]]


def _same_second(steps) -> bool:
    """Run the steps (callables) starting at the top of a second; whether all ran within that second."""
    postfix.wait_seconds_boundary()
    start = int(time.time())
    for step in steps:
        step()
    return int(time.time()) == start


def _write(rig: Rig, *args: str):
    return lambda: vsmtprelay_main(["-f", rig.db, *args]) == 0 or pytest.fail("vsmtprelay %s failed" % (args,))


def _two_writes_in_one_second(rig: Rig, first: tuple, session_client: str, second: tuple) -> None:
    """write, a session (an smtpd reopens the map), write again: all in one second (retried if the
    machine was too slow for that)."""
    for _ in range(5):
        if _same_second([_write(rig, *first), lambda: rig.relay_codes(session_client), _write(rig, *second)]):
            return
    pytest.fail("could not fit two writes and a session into one second")


def test_two_writes_within_one_second_both_seen(rig):
    _two_writes_in_one_second(rig, ("add", "127.0.0.30"), "127.0.0.30", ("add", "127.0.0.31"))
    try:
        assert rig.relay_codes("127.0.0.30") == [250]
        assert rig.relay_codes("127.0.0.31") == [250]
        _two_writes_in_one_second(rig, ("delete", "127.0.0.30"), "127.0.0.32", ("delete", "127.0.0.31"))
        assert rig.relay_codes("127.0.0.30") == [rig.denied(REMOTE)[0]]
        assert rig.relay_codes("127.0.0.31") == [rig.denied(REMOTE)[0]]
    finally:
        vsmtprelay_main(["-f", rig.db, "delete", "127.0.0.30", "127.0.0.31"])


def test_spammers_refused_at_mail_with_the_documented_text(rig):
    source = rig.milter.rundir / "spammers"
    db = str(rig.milter.rundir / "spammers.db")
    source.write_text("bulk@spam.example\nspam.example\n")
    subprocess.run(["vnewspammers", "-f", str(source), "-o", db], check=True, timeout=60, capture_output=True)
    try:
        for client in ("127.0.0.1", "127.0.0.40"):
            t = mta.smtp_session(rig.port, client, "<anyone@mail.spam.example>", [LOCAL])
            assert t.mail == (550, "5.7.1 Access denied"), t
            assert t.rcpts == [(503, "5.5.1 Error: need MAIL command")]
        assert mta.mail_reply(rig.port, "127.0.0.40", "<>")[0] == 250
        assert mta.mail_reply(rig.port, "127.0.0.40", "<friend@example.net>")[0] == 250
    finally:
        source.write_text("")
        subprocess.run(["vnewspammers", "-f", str(source), "-o", db], check=True, timeout=60, capture_output=True)


def test_corrupt_relayers_db_defers_relaying_local_mail_flows(rig):
    db = Path(rig.db)
    good = db.read_bytes()
    tmp = db.with_name("relayers.tmp")
    tmp.write_bytes(os.urandom(8192))
    os.replace(tmp, db)          # a new file: every reader notices it
    try:
        for client in ("127.0.0.50", "127.0.0.51"):
            sent = postfix.send(rig.port, client, "<a@example.net>", [REMOTE, LOCAL, "<x@relayed.test>"])
            if rig.variant == "a":
                assert sent.rcpts[0] == (451, "4.3.0 Relay check temporarily unavailable, try again later")
            else:
                assert sent.rcpts[0] == (
                    451, "4.3.5 <unknown[%s]>: Client host rejected: Server configuration error" % client)
            assert [r[0] for r in sent.rcpts[1:]] == [250, 250], sent.rcpts
            assert rig.pf.wait_delivered(sent.queue_id) == {"alice@local.test": "LOCAL", "x@relayed.test": "RELAY"}
    finally:
        tmp.write_bytes(good)
        os.replace(tmp, db)
    if rig.variant == "b":
        rig.pf.reload()          # README.postfix: an smtpd that found the map unreadable needs a reload
    assert rig.relay_codes("127.0.0.50") == [250]


# --- fail closed: these stop and restart the rig's relaymilter ---------------------------------

def _never_accepted(rig: Rig, client: str) -> mta.Transcript:
    t = mta.smtp_session(rig.port, client, "<a@example.net>", [REMOTE, LOCAL])
    assert t.mail[0] != 250 or all(r[0] != 250 for r in t.rcpts), t
    return t


def test_milter_stopped_every_mail_tempfails_then_recovers(rig):
    rig.milter.stop()
    try:
        for client in ("127.0.0.1", "127.0.0.60", "127.0.0.61"):
            t = _never_accepted(rig, client)
            assert t.ehlo[0] == 250
            assert t.mail == (451, "4.7.1 Service unavailable - try again later"), t
            assert t.rcpts == [(503, "5.5.1 Error: need MAIL command")] * 2, t
    finally:
        rig.milter.start()
    assert rig.relay_codes("127.0.0.60") == [250]
    assert rig.relay_codes("127.0.0.61") == [rig.denied(REMOTE)[0]]


def test_milter_killed_mid_session_tempfails_the_rest(rig):
    try:
        with mta_smtp("127.0.0.62", rig.port) as smtp:
            assert smtp.docmd("MAIL FROM:", "<a@example.net>")[0] == 250
            for pid in [*postfix_children(rig.milter.pid), rig.milter.pid]:
                os.kill(pid, signal.SIGKILL)
            rig.milter.proc.wait(20)
            assert smtp.docmd("RCPT TO:", REMOTE) == (451, b"4.7.1 Service unavailable - try again later")
            assert smtp.docmd("RCPT TO:", LOCAL)[0] == 451
        _never_accepted(rig, "127.0.0.63")
    finally:
        rig.milter.stop()
        rig.milter.start()
    assert rig.relay_codes("127.0.0.62") == [250]


def test_worker_killed_mid_session_that_session_tempfails_the_next_is_served(rig):
    from milterproc import children

    workers = children(rig.milter.pid)
    assert workers, "relaymilter runs no worker process"
    with mta_smtp("127.0.0.62", rig.port) as smtp:
        assert smtp.docmd("MAIL FROM:", "<a@example.net>")[0] == 250
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert smtp.docmd("RCPT TO:", REMOTE) == (451, b"4.7.1 Service unavailable - try again later")
    # the supervisor replaces its workers; Postfix uses them with no restart or reload
    mta.wait_until(lambda: len(set(children(rig.milter.pid)) - set(workers)) == len(workers), 20,
                   "replacement workers")
    assert rig.relay_codes("127.0.0.62") == [250]
    assert rig.relay_codes("127.0.0.63") == [rig.denied(REMOTE)[0]]


@pytest.mark.parametrize("where", ["from the start", "mid-session"])
def test_milter_hung_tempfails_after_the_command_timeout(rig, where):
    if (rig.name, where) not in (("a-unix", "from the start"), ("b-inet", "mid-session")):
        pytest.skip("a hung milter costs the snippet's 10 s timeouts: each case on one rig")
    frozen = [*postfix_children(rig.milter.pid), rig.milter.pid]
    try:
        if where == "from the start":
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
        with mta_smtp("127.0.0.64", rig.port, timeout=60) as smtp:
            if where == "mid-session":
                assert smtp.docmd("MAIL FROM:", "<a@example.net>")[0] == 250
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                assert smtp.docmd("RCPT TO:", REMOTE) == (451, b"4.7.1 Service unavailable - try again later")
            else:
                assert smtp.docmd("MAIL FROM:", "<a@example.net>") == (
                    451, b"4.7.1 Service unavailable - try again later")
            assert smtp.docmd("RCPT TO:", LOCAL)[0] in (451, 503)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert rig.relay_codes("127.0.0.64") == [250]


def postfix_children(pid: int) -> list[int]:
    """relaymilter's worker processes (and theirs), by PID."""
    from milterproc import children
    found, todo = [], children(pid)
    while todo:
        kid = todo.pop()
        found.append(kid)
        todo.extend(children(kid))
    return found


class mta_smtp:
    """An SMTP connection from *client* that has said EHLO (context manager, QUIT at the end)."""

    def __init__(self, client: str, port: int, timeout: float = 30.0) -> None:
        import smtplib

        self.smtp = smtplib.SMTP(timeout=timeout, source_address=(client, 0))
        self.smtp.connect("127.0.0.1", port)

    def __enter__(self):
        self.smtp.ehlo("client.example.test")
        return self.smtp

    def __exit__(self, *exc: object) -> None:
        import smtplib

        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()
