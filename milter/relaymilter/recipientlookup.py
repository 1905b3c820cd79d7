"""NAME
    relaymilter.recipientlookup - "is this address known, and by which source?" for an admin

DESCRIPTION
    explain() runs one recipient through the same steps the milter takes
    for it: address resolution and the local/relay classification
    (relaymilter.policy.rcpt), then, for a local domain with
    local_recipients configured, the sources (relaymilter.store.recipients)
    and the policy's decision (relaymilter.policy.recipients). The answer
    names the source kind and file that knew the address, or the reply the
    milter would give. relaymilter-test --lookup prints it.

DIAGNOSTICS
    Nothing is raised for an address: a malformed one, a source that
    cannot be read, an unknown user are all answers (Answer.ok False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from relaymilter.config import Config
from relaymilter.errors import StoreUnavailable
from relaymilter.policy import recipients as rpolicy
from relaymilter.policy.decision import Continue
from relaymilter.policy.rcpt import Place, RcptPolicy, destination
from relaymilter.runtime import rcpt_policy
from relaymilter.store.recipients import LocalRecipients


@dataclass(frozen=True)
class Answer:
    address: str
    text: str
    ok: bool        # known, or not a question for local_recipients; False: refused or tempfailed


def open_sources(config: Config) -> LocalRecipients:
    lr = config.local_recipients
    return LocalRecipients(lr.passwd, lr.aliases, lr.lists, lr.maps)


def explain(config: Config, sources: LocalRecipients, address: str, policy: Optional[RcptPolicy] = None) -> Answer:
    """What the milter decides for *address* at a local domain, and why (see the module header)."""
    rcpt = address if address.startswith("<") else "<%s>" % address
    dest = destination(policy or rcpt_policy(config), rcpt)
    if dest.resolved is None:
        return Answer(rcpt, "malformed address (%s): 553 5.1.3 Malformed address" % dest.error, False)
    resolved = dest.resolved
    if dest.place is not Place.LOCAL:
        kind = "a relay domain" if dest.place is Place.RELAY else "not a local or relay domain"
        return Answer(rcpt, "resolves to %s: %s, local_recipients does not apply" % (resolved, kind), True)
    if not config.local_recipients.enabled:
        return Answer(rcpt, "resolves to %s, a local domain: known (local_recipients has no source: "
                      "every user is accepted); rule=local_domain" % resolved, True)
    q = rpolicy.query(resolved, config.local_recipients.recipient_delimiter)
    found: list = []
    failures: list = []

    def lookup(locals_: tuple[str, ...], domain: Optional[str]) -> Optional[str]:
        try:
            source = sources.find(locals_, domain)
        except StoreUnavailable as exc:
            failures.append(str(exc))
            raise
        if source is None:
            return None
        found.append(source)
        return source.kind

    got = rpolicy.check(q, lookup)
    decision = got.decision
    if type(decision) is Continue:
        where = ("%s %s" % (found[0].kind, found[0].path) if found[0].kind != "passwd" else "passwd") if found \
            else "always accepted"
        return Answer(rcpt, "resolves to %s: known (%s); rule=%s source=%s"
                      % (resolved, where, decision.rule, got.source), True)
    assert not isinstance(decision, Continue)
    why = " (%s)" % failures[0] if failures else ""
    return Answer(rcpt, "resolves to %s: %s%s; rule=%s" % (resolved, decision.reply, why, decision.rule), False)
