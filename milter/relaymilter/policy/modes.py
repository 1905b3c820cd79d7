"""NAME
    relaymilter.policy.modes - warn-only mode per rule family

DESCRIPTION
    ``modes:`` in the configuration sets each rule family to ``enforce``
    (the default) or ``warn``. In warn mode the family's refusals are not
    made: the milter answers as if the rule had passed and logs the refusal
    it would have made (``would reject: ... rule=...``), so an admin can
    switch a new rule on safely and read what it would do first.

    The families and the rules (the ``rule=`` of the decision log) in each:

        relay      default_reject, malformed_address (a relay attempt refused)
        spammers   spammers (a listed sender refused at MAIL)
        limits     recipients_per_hour, messages_per_hour, addresses_per_hour,
                   suspended
        local_recipients
                   unknown_recipient (a local user no source knows)
        dnsbl      dnsbl (a listed stranger), dnsbl_unavailable (a list could
                   not be asked and on_error is tempfail: it only guards a
                   refusal that warn mode would not make)

    A temporary failure because a map cannot be read (relayers_unavailable,
    spammers_unavailable, internal_error) is not a rule's refusal and is
    made in every mode: a decision that cannot be made safely is never
    turned into a pass.

    The mode is read at every MAIL from the configuration in force, so a
    SIGHUP switching a family back to enforce applies from the next
    transaction, in open connections too.

Stdlib only: part of the policy core.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaymilter.policy.decision import Continue, Decision
from relaymilter.policy.limits import LIMIT_RULES

FAMILY_OF_RULE = {
    "default_reject": "relay",
    "malformed_address": "relay",
    "spammers": "spammers",
    **{rule: "limits" for rule in LIMIT_RULES},
    "unknown_recipient": "local_recipients",
    "dnsbl": "dnsbl",
    "dnsbl_unavailable": "dnsbl",
}
FAMILIES = ("relay", "spammers", "limits", "local_recipients", "dnsbl")
MODES = ("enforce", "warn")


@dataclass(frozen=True)
class Modes:
    """The families in warn-only mode (every other family enforces)."""

    warn: frozenset[str] = frozenset()

    def warns(self, decision: Decision) -> bool:
        """Whether *decision* is a refusal of a family in warn mode (and so not to be made)."""
        return type(decision) is not Continue and FAMILY_OF_RULE.get(decision.rule) in self.warn


ENFORCE_ALL = Modes()
