"""NAME
    relaymilter.address - envelope addresses and map keys, shared by the policy core and the stores

DESCRIPTION
    Tokenizing (tokens), sendmail-style resolution and domain
    normalisation (resolve), and the spammers-map keys of a sender or of a
    line of the spammers file (keys).  relaymilter.policy decides with these
    and relaymilter.store builds its keys with them; this package imports
    neither, so the store never depends on the policy core.

    Stdlib only (and relaymilter.ipaddr): tests/unit/test_policy_imports.py
    guards that.
"""
