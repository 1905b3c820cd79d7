"""The plain-address fast path of resolve() agrees with the full sendmail-style resolver."""

from __future__ import annotations

import random

import pytest

from relaymilter.address import resolve as addr
from relaymilter.address.tokens import clean_text

ATOM = "abcxyzABCXYZ0189_+=-"


def slow(text: str, is_local) -> addr.Resolved:
    return addr._Resolver(is_local, True, True).run(clean_text(text))


def plain_addresses(n: int, seed: int = 5):
    rnd = random.Random(seed)
    for _ in range(n):
        local = ".".join("".join(rnd.choice(ATOM) for _ in range(rnd.randint(1, 8))) for _ in range(rnd.randint(1, 3)))
        domain = ".".join("".join(rnd.choice("abcXYZ019-") for _ in range(rnd.randint(1, 10))).strip("-") or "a"
                          for _ in range(rnd.randint(1, 4)))
        text = "%s@%s%s" % (local, domain, rnd.choice(["", "", "."]))
        yield "<%s>" % text if rnd.random() < 0.8 else text


@pytest.mark.parametrize("is_local", [lambda d: False, lambda d: True])
def test_fast_path_equals_full_resolver(is_local):
    checked = 0
    for text in plain_addresses(3000):
        fast = addr._plain(text)
        try:
            full = slow(text, is_local)
        except addr.BadAddress:
            assert fast is None, text       # the fast path never accepts what the resolver refuses
            continue
        if fast is not None:
            assert fast == full, text
            assert addr.resolve(text, is_local) == full
            checked += 1
    assert checked > 2500


@pytest.mark.parametrize("text", [
    "<a%b@c>", "<b!a@c>", '<"a"@c>', "<@a:b@c>", "<a@[192.0.2.1]>", "<a b@c>", "<a@b@c>", "<a(x)@c>",
    "<a@c", "a@c>", "<>", "", "<.a@c>", "<a.@c>", "<a..b@c>", "<a@c..d>", "<a@-c.>x", "<jörg@c>", "<a@c\n>",
    "<" + "a" * 600 + "@c>",
])
def test_non_plain_forms_take_the_full_resolver(text):
    assert addr._plain(text) is None
