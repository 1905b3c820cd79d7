"""Small pymilter milters the harness integration tests run as subprocesses.

Usage: python3 pymilter_milters.py KIND SOCKET
  relaydeny  overrides only connect, envrcpt and eom, so pymilter declines
             HELO, MAIL, DATA, headers, EOH and body in option negotiation;
             rejects recipients with "remote" in them with a full reply
             (setreply 550 5.7.1 Relaying denied), tempfails "busy" ones
             (451 4.3.0), plain-rejects "plain" ones (no reply text).
  echo       overrides every callback and continues; at end of message it
             reports what it received as added headers (X-Seen-*), and
             sends every kind of modification so the harness decodes real
             libmilter packets.
  fromreply  sets its reply at MAIL: "spammer" senders get 550 5.7.1 Access
             denied, "busy" ones 451 4.3.0, "multi" ones a two-line 550.
"""

from __future__ import annotations

import sys

import Milter


class RelayDeny(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        if "remote" in to:
            self.setreply("550", "5.7.1", "Relaying denied")
            return Milter.REJECT
        if "busy" in to:
            self.setreply("451", "4.3.0", "Try again later")
            return Milter.TEMPFAIL
        if "plain" in to:
            return Milter.REJECT
        return Milter.CONTINUE

    def eom(self):
        return Milter.CONTINUE


class Echo(Milter.Base):
    def __init__(self):
        self.seen = []
        self.rcpts = []
        self.headers = 0
        self.body_len = 0

    def connect(self, hostname, family, hostaddr):
        self.seen.append(("X-Seen-Connect", "%s %s %s" % (hostname, family, hostaddr)))
        self.seen.append(("X-Seen-Connect-Macros", "j=%s daemon_name=%s client_addr=%s client_name=%s" % (
            self.getsymval("j"), self.getsymval("{daemon_name}"), self.getsymval("{client_addr}"),
            self.getsymval("{client_name}"))))
        return Milter.CONTINUE

    def hello(self, hostname):
        self.seen.append(("X-Seen-Helo", hostname))
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.seen.append(("X-Seen-From", " ".join((mailfrom,) + params)))
        self.seen.append(("X-Seen-From-Macros", "auth_authen=%s auth_type=%s mail_addr=%s i=%s" % (
            self.getsymval("{auth_authen}"), self.getsymval("{auth_type}"), self.getsymval("{mail_addr}"),
            bool(self.getsymval("i")))))
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        self.rcpts.append("%s rcpt_addr=%s rcpt_host=%s rcpt_mailer=%s" % (
            to, self.getsymval("{rcpt_addr}"), self.getsymval("{rcpt_host}"), self.getsymval("{rcpt_mailer}")))
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def header(self, name, value):
        self.headers += 1
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        self.body_len += len(chunk)
        return Milter.CONTINUE

    def eom(self):
        for name, value in self.seen:
            self.addheader(name, value)
        self.addheader("X-Seen-Rcpts", " | ".join(self.rcpts))
        self.addheader("X-Seen-Content", "headers=%d body=%d" % (self.headers, self.body_len))
        self.progress()
        self.addheader("X-Inserted", "first", 0)
        self.chgheader("Subject", 1, "changed")
        self.addrcpt("<added@example.com>")
        self.delrcpt("<dropped@example.com>")
        self.chgfrom("<new-sender@example.com>")
        self.replacebody(b"replaced body\r\n")
        self.quarantine("held for review")
        return Milter.CONTINUE

    def abort(self):
        return Milter.CONTINUE


class FromReply(Milter.Base):
    def envfrom(self, mailfrom, *params):
        if "spammer" in mailfrom:
            self.setreply("550", "5.7.1", "Access denied")
            return Milter.REJECT
        if "busy" in mailfrom:
            self.setreply("451", "4.3.0", "Sender check temporarily unavailable, try again later")
            return Milter.TEMPFAIL
        if "multi" in mailfrom:
            self.setreply("550", "5.7.1", "first line", "second line")
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        return Milter.CONTINUE


KINDS = {"relaydeny": RelayDeny, "echo": Echo, "fromreply": FromReply}


def main(argv):
    kind, socketspec = argv[1], argv[2]
    Milter.factory = KINDS[kind]
    Milter.runmilter("harness-" + kind, socketspec, timeout=30)


if __name__ == "__main__":
    main(sys.argv)
