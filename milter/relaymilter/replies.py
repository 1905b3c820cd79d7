"""NAME
    relaymilter.replies - every SMTP reply relaymilter emits

DESCRIPTION
    One table, shared by the adapter, the harness scenarios and the tests, so
    that reply texts cannot drift between code and documentation.

    sendmail prefixes a milter's reply text with ``<addr>... `` itself; the
    texts here therefore never contain the address (it would appear twice).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: str
    xcode: str
    text: str

    def __str__(self) -> str:
        return "%s %s %s" % (self.code, self.xcode, self.text)


# RCPT TO: not local, not a relay domain, client not authorised (sendmail confRELAY_MSG).
RELAYING_DENIED = Reply("550", "5.7.1", "Relaying denied")
# RCPT TO: a relay attempt while relayers.db cannot be read. Temporary: never relay, never lose mail.
RELAY_CHECK_UNAVAILABLE = Reply("451", "4.3.0", "Relay check temporarily unavailable, try again later")
# RCPT TO: an address that cannot be parsed at all (sendmail's own 553 5.1.3 family).
MALFORMED_ADDRESS = Reply("553", "5.1.3", "Malformed address")
# RCPT TO: a local domain's user that no local_recipients source knows (sendmail's own text).
USER_UNKNOWN = Reply("550", "5.1.1", "User unknown")
# RCPT TO: a local user no readable source knows while another source cannot be read now.
RECIPIENT_LOOKUP_FAILED = Reply("451", "4.3.0", "Temporary lookup failure")
# MAIL FROM: sender listed in spammers.db (sendmail access-db REJECT text).
ACCESS_DENIED = Reply("550", "5.7.1", "Access denied")
# MAIL FROM: spammers.db could not be read and no earlier good copy exists.
SENDER_CHECK_UNAVAILABLE = Reply("451", "4.3.0", "Sender check temporarily unavailable, try again later")
# Any callback that failed unexpectedly: fail closed.
INTERNAL_ERROR = Reply("451", "4.3.0", "Internal error, try again later")
# RCPT TO: a relaying identity over one of its hourly limits (limits:). Temporary: a burst is delayed, never lost.
RELAY_LIMIT_EXCEEDED = Reply("451", "4.7.1", "Relaying limit exceeded, try again later")
# MAIL FROM (AUTH) and RCPT TO: an identity suspended after going over a limit, until it runs out or is lifted.
RELAY_SUSPENDED = Reply("451", "4.7.1", "Relaying suspended, try again later")
# RCPT TO from a stranger that the configured DNS blocklists list (dnsbl.reply; Postfix's default_rbl_reply).
# A template: {client} the IP, {site} the list, {reason} "; " + the list's TXT text, or nothing.
DNSBL_LISTED = "554 5.7.1 Service unavailable; Client host [{client}] blocked using {site}{reason}"
# RCPT TO from a stranger when a DNS blocklist could not be asked and dnsbl.on_error is tempfail.
DNSBL_UNAVAILABLE = Reply("451", "4.7.1", "Client host blocklist check temporarily unavailable, try again later")
