"""NAME
    relaymilter.policy.session - the one decision path: every MAIL and RCPT verdict of a connection

DESCRIPTION
    The adapter keeps one Session per SMTP connection, tells it who connected
    and asks it for a verdict at each MAIL and RCPT; it only turns the value
    into a pymilter return.  The tests drive the adapter's registered
    callbacks, so what they judge is what production runs.

    The client's standing (policy.verdict.Standing: TRUSTED, AUTHENTICATED,
    LISTED, STRANGER, UNAVAILABLE) is worked out once per transaction, at
    the first RCPT that needs it: relayers.db is read at most once between
    two MAILs, so a vsmtprelay add or delete counts from the next MAIL on.
    What a session is handed (Sources) and what it answers (RcptVerdict)
    are in policy.verdict; this module holds the steps.

    RCPT TO, in this order; the first that answers wins (DESIGN section 3).
    The rule families marked [..] are optional steps, and each has one place:

      1. resolution     Sources.destination(rcpt): the resolved recipient
                        and its Place, or why it cannot be parsed.
      2. local domain   Place.LOCAL -> Continue(local_domain).
                        With local_recipients (Sources.local_recipients), the
                        user must be known to one of its sources first
                        (policy.recipients): an unknown user is refused 550
                        5.1.1 for every client, trusted ones included
                        (unknown_recipient); 451 4.3.0 when a source cannot
                        be read (recipients_unavailable); the verdict names
                        the source that knew a known user.
      3. relay domain   Place.RELAY -> Continue(relay_domain).
         [dnsbl] comes after 2 and 3, before the Continue is returned
                        (Sources.blocklists; None when no list is
                        configured): only for a STRANGER (or UNAVAILABLE)
                        client with an IP, whose recipient is not exempt
                        (postmaster).  The lists are asked once per
                        connection (Blocklists.check); a listing refuses
                        (554, or 451 4.3.0 relayers_unavailable when
                        relayers.db cannot say the client is no user), a
                        lookup that failed may tempfail (451 4.7.1).  Users
                        - trusted, AUTH, relayers.db - cause no DNS query.
      4. client rules   Place.ELSEWHERE or UNPARSED: standing() TRUSTED,
                        AUTHENTICATED or LISTED -> Continue(rule);
                        UNAVAILABLE -> 451 4.3.0 relayers_unavailable.
                        [limits] goes after a Continue here, the only place a
                        session relays: it receives the session (identity:
                        the AUTH user, else the POP user of client.key, else
                        client.key) and the resolved recipient. A store that
                        can (Redis) answers the relayers lookup of this step
                        and counts the limits in one call, counting only if
                        the client is LISTED (Guard.at_listed_rcpt).
      5. refusal        550 5.7.1 Relaying denied (553 5.1.3 for an address
                        that cannot be parsed).

    A rule family in warn-only mode answers as if it had passed and has its
    refusal logged as "would reject"; that is decided where the family's
    step returns, never further out (_warn): the refusal not made is left in
    Session.warned for the adapter's log line, with Session.note (the
    identity, ``user=``) beside it. The modes are read from the
    configuration in force at each MAIL (Sources.current_modes), so a SIGHUP
    applies from the next transaction, in open connections too.

    Limits (policy.limits): every recipient relayed because the client
    AUTHENTICATED or is LISTED goes through Sources.guard, which names the
    identity and counts it; a TRUSTED client's relaying is named (its AUTH
    user, else its address) and never limited. An AUTH user's suspension is
    answered at MAIL.

    MAIL FROM: the null sender passes unasked; otherwise the sender's keys
    (policy.mail.mail_plan) are matched against the whole spammers list.
    The sender is never an input of the RCPT decision: granting relay on MAIL
    FROM (FEATURE(relay_local_from)) is an open relay for anyone who forges
    a local sender.

DIAGNOSTICS
    StoreUnavailable from a map -> 451 4.3.0 (relayers_unavailable at RCPT
    for a relay attempt, spammers_unavailable at MAIL); local and relay-domain
    recipients are decided before any lookup, so an unreadable map never
    blocks them.  Any other exception propagates: the adapter tempfails it.

Stdlib only: part of the pure policy core.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Optional

from relaymilter.errors import StoreUnavailable
from relaymilter.policy.decision import Continue, Decision, TempFail
from relaymilter.policy.limits import Guard, Step, Txn
from relaymilter.policy.mail import SENDER_OK, SPAMMER, SPAMMERS_UNAVAILABLE, SenderKeys
from relaymilter.policy.modes import ENFORCE_ALL, Modes
from relaymilter.policy.rcpt import UNKNOWN_CLIENT, Client, Destination, Place
from relaymilter.policy.recipients import Lookup, check, query
from relaymilter.policy.verdict import (LOCAL_DOMAIN, RELAY_DOMAIN, RELAYERS_UNAVAILABLE, Blocklisted, Blocklists,
                                        RcptVerdict, Sources, Standing)

_GRANTED = {s: Continue(s.value) for s in (Standing.TRUSTED, Standing.AUTHENTICATED, Standing.LISTED)}


class Session:
    """One SMTP connection's decisions, in the order the MTA asks for them."""

    __slots__ = ("sources", "clock", "client", "auth", "sender", "_standing", "guard", "modes", "txn", "warned",
                 "note", "_cause", "_known", "_blocklisted", "_counted")

    def __init__(self, sources: Sources, clock: Callable[[], float] = time.time) -> None:
        self.sources = sources
        self.clock = clock                  # for the relayers window and the limits
        self.client = UNKNOWN_CLIENT        # until CONNECT says otherwise: never trusted
        self.auth: Optional[str] = None     # {auth_authen} of the current transaction
        self.sender = "<>"
        self._standing: Optional[Standing] = None
        self.guard: Optional[Guard] = getattr(sources, "guard", None)
        self.modes: Modes = ENFORCE_ALL     # as of the last MAIL
        self.txn = Txn()
        self.warned: Optional[Decision] = None   # the refusal the last verdict did not make (warn mode)
        self.note = ""                      # what the last verdict's log line adds (user=...)
        self._known: Optional[Lookup] = None     # local_recipients as of this transaction
        self._cause = ""                    # why relayers.db was unavailable, for the log line
        self._blocklisted: Optional[Blocklisted] = None     # the lists' answer, once per connection
        self._counted: Optional[Step] = None    # the limits' answer given with the relayers lookup

    def connect(self, client: Client) -> None:
        """A new SMTP session from *client* (RcptPolicy.client / local_client, or UNKNOWN_CLIENT)."""
        self.client = client
        self.auth = None
        self.sender = "<>"
        self._standing = None
        self._known = None
        self._blocklisted = None

    def mail(self, sender: str, auth: Optional[str]) -> Decision:
        """MAIL FROM: a new transaction; refuse a sender listed in the spammers map."""
        self.sender = sender
        self.auth = auth or None
        self._standing = None
        self._known = None
        self.close()                        # the transaction before this one has ended
        self.txn = Txn()
        self._counted = None
        self.warned, self.note = None, ""
        current = getattr(self.sources, "current_modes", None)
        self.modes = current() if current is not None else ENFORCE_ALL
        plan = self.sources.mail_plan(sender)
        if not isinstance(plan, SenderKeys):
            return self._warn(plan)
        try:
            listed = self.sources.spammers_listed()
        except StoreUnavailable as exc:
            return TempFail(SPAMMERS_UNAVAILABLE.reply, SPAMMERS_UNAVAILABLE.rule, str(exc))
        if not listed.isdisjoint(plan.keys):
            return self._warn(SPAMMER)
        guard = self.guard
        if self.auth and guard is not None and guard.active:
            step = guard.at_mail(self.auth, self.clock(), "limits" in self.modes.warn)
            self.note, self.warned = step.note, step.would
            if step.refusal is not None:
                return step.refusal
        return SENDER_OK

    def close(self) -> None:
        """The transaction has ended (a new MAIL, or the connection's end): give back what it counted ahead."""
        if self.guard is not None and self.txn.reserved:
            self.guard.release(self.txn)

    def _warn(self, decision: Decision) -> Decision:
        """*decision*, or - for a refusal of a family in warn mode - a pass, the refusal kept in warned."""
        if self.modes.warns(decision):
            self.warned = decision
            return Continue(decision.rule)
        return decision

    def rcpt(self, rcpt: str) -> RcptVerdict:
        """RCPT TO: the steps of the module notes, in order."""
        self.warned, self.note = None, ""
        dest = self.sources.destination(rcpt)
        place = dest.place
        if place is Place.LOCAL or place is Place.RELAY:
            verdict = self._local(dest) if place is Place.LOCAL else RcptVerdict(RELAY_DOMAIN, dest)
            lists = self.sources.blocklists
            if lists is None or type(verdict.decision) is not Continue or lists.exempt(dest.resolved):
                return verdict
            return self._blocklists(lists, verdict)
        standing = self.standing(relaying=True)
        granted = _GRANTED.get(standing)
        if granted is not None:
            return RcptVerdict(self._limits(standing, granted), dest)
        if standing is Standing.UNAVAILABLE:
            return RcptVerdict(TempFail(RELAYERS_UNAVAILABLE.reply, RELAYERS_UNAVAILABLE.rule, self._cause), dest)
        return RcptVerdict(self._warn(dest.refusal), dest)

    def _local(self, dest: Destination) -> RcptVerdict:
        """A local-domain recipient: known to a local_recipients source, when any is configured."""
        factory = self.sources.local_recipients
        if factory is None or dest.resolved is None:
            return RcptVerdict(LOCAL_DOMAIN, dest)
        lookup = self._known
        if lookup is None:          # the sources are checked for changes once per transaction
            lookup = self._known = factory()
        known = check(query(dest.resolved, self.sources.recipient_delimiter), lookup)
        return RcptVerdict(self._warn(known.decision), dest, known.source)

    def _limits(self, standing: Standing, granted: Decision) -> Decision:
        """A relayed recipient: named, and (AUTHENTICATED or LISTED) counted against the limits."""
        guard, key = self.guard, self.client.key
        if standing is Standing.TRUSTED or guard is None:
            identity = self.auth or key
            self.note = "user=%s " % identity if identity else ""
            return granted
        step = self._counted
        if step is not None:            # counted with the relayers lookup (_judge)
            self._counted = None
        else:
            step = guard.at_rcpt(self.txn, key, self.auth, self.clock(), "limits" in self.modes.warn)
        self.note, self.warned = step.note, step.would
        return step.refusal if step.refusal is not None else granted

    def _blocklists(self, lists: Blocklists, accepted: RcptVerdict) -> RcptVerdict:
        """The dnsbl step: strangers only, asked once per connection (see the module notes).

        A kept "not listed" answer (Blocklists.known, no DNS) settles it
        without asking relayers.db; otherwise the client rules go first, so
        a user never causes a DNS query.
        """
        client = self.client
        key = client.key
        if not key or client.trusted or (self.auth and self.sources.policy.permit_authenticated):
            return accepted
        found = self._blocklisted or lists.known(key)
        standing = Standing.STRANGER
        if found is None or found.decision is not None:
            standing = self.standing()
            if standing is not Standing.STRANGER and standing is not Standing.UNAVAILABLE:
                return accepted
            if found is None:
                found = lists.check(key)
        self._blocklisted = found
        dest = accepted.destination
        if found.decision is None:
            return RcptVerdict(accepted.decision, dest, accepted.source, found.note)
        decision = self._warn(found.decision)       # warn-only mode: a pass, the refusal kept in warned
        if standing is Standing.UNAVAILABLE and decision is found.decision:
            # listed, but it may be a user: relayers.db cannot say
            decision = TempFail(RELAYERS_UNAVAILABLE.reply, RELAYERS_UNAVAILABLE.rule, self._cause)
        return RcptVerdict(decision, dest, accepted.source, found.note)

    def standing(self, relaying: bool = False) -> Standing:
        """The client's standing in this transaction, worked out at most once per transaction.

        *relaying*: asked for a recipient that relays if the client may
        (Place.ELSEWHERE or UNPARSED), whose limits may then be counted
        with the relayers lookup.
        """
        standing = self._standing
        if standing is None:
            standing = self._standing = self._judge(relaying)
        return standing

    def _judge(self, relaying: bool) -> Standing:
        client, policy = self.client, self.sources.policy
        if client.trusted:
            return Standing.TRUSTED
        if self.auth and policy.permit_authenticated:
            return Standing.AUTHENTICATED
        if not client.key:
            return Standing.STRANGER
        window = policy.window
        # stamp + window < now, for a whole-second stamp: stamp < since
        since = 0 if window is None else math.ceil(self.clock() - window * 60)
        try:
            stamp = self._relayers_stamp(client.key, since, relaying)
        except StoreUnavailable as exc:
            self._cause = str(exc)
            return Standing.UNAVAILABLE
        if stamp is None or (window is not None and stamp < since):
            return Standing.STRANGER
        return Standing.LISTED

    def _relayers_stamp(self, key: str, since: int, relaying: bool) -> Optional[int]:
        """relayers.db's value for *key*; for a relay attempt, with its limits counted in the same call
        when the store can (policy.limits: Guard.at_listed_rcpt), the answer kept for _limits()."""
        guard = self.guard
        if relaying and guard is not None and guard.folds_relay_lookup:
            found = guard.at_listed_rcpt(self.txn, key, since, self.clock(), "limits" in self.modes.warn)
            if found is not None:
                stamp, self._counted = found
                return stamp
        return self.sources.relayers_stamp(key)
