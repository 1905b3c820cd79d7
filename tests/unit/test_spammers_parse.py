"""The spammers source: what a line means, what is refused, and how senders match the result."""

from __future__ import annotations

from pathlib import Path

import pytest
from milterpath import mail

from relaymilter.errors import ConfigError
from relaymilter.policy.decision import Continue, Reject
from relaymilter.address.keys import normalize_entry, sender_keys
from relaymilter.store.spammers import (
    SpammersMap,
    SpammersSourceError,
    SpammersSyntaxError,
    parse_line,
    parse_source,
    read_source,
    rebuild,
    split_words,
)

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "spammers_sample"

SAMPLE_KEYS = [
    "spam.example",
    "bulk.example",
    "user@mail.other.example",
    "quoted@quoted.example",
    "user#tag@hash.example",
    "[192.0.2.7]",
    "[ipv6:2001:db8::25]",
    "who@[198.51.100.9]",
    "tabbed.example",
]


def test_sample_file_entries_in_order_without_duplicates():
    assert read_source(str(SAMPLE)) == SAMPLE_KEYS


@pytest.mark.parametrize("line, key", [
    (b"spam.example", "spam.example"),
    (b"SPAM.Example", "spam.example"),
    (b"  spam.example  ", "spam.example"),
    (b"\tspam.example\r", "spam.example"),
    (b"spam.example.", "spam.example"),
    (b"spam.example # listed 2024-01-02", "spam.example"),
    (b"spam.example\t#no space needed after a tab", "spam.example"),
    (b"User@Host.Example", "user@host.example"),
    (b"user@host.example.", "user@host.example"),
    (b'"user"@host.example', "user@host.example"),
    (b'"John Doe"@host.example # a quoted blank is not two words', "john doe@host.example"),
    (b'"a # b"@host.example', "a # b@host.example"),
    (b"user#tag@host.example", "user#tag@host.example"),
    (b"192.0.2.1", "[192.0.2.1]"),
    (b"[192.0.2.1]", "[192.0.2.1]"),
    (b"[IPv6:2001:DB8:0:0::1]", "[ipv6:2001:db8::1]"),
    (b"user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("bücher.example".encode(), "bücher.example"),
])
def test_line_normalisation(line, key):
    assert parse_line(line) == key


@pytest.mark.parametrize("line", [b"", b"   ", b"\t\r", b"# comment", b"   # indented comment", b"#", b"##"])
def test_blank_and_comment_lines(line):
    assert parse_line(line) is None


@pytest.mark.parametrize("line, reason", [
    (b"spam\0.example", "binary data (NUL byte)"),
    (b"\xff\xfespam.example", "not valid UTF-8"),
    (b"caf\xe9.example", "not valid UTF-8"),
    (b"\x1b[31mred.example", "control character 0x1b"),
    (b"user @host.example", "more than one word"),
    (b"user@ host.example", "more than one word"),
    (b"spam.example other.example", "more than one word"),
    (b"spam.example REJECT", "more than one word"),
])
def test_invalid_lines_refused_by_the_parser(line, reason):
    with pytest.raises(ValueError) as info:
        parse_line(line)
    assert str(info.value).startswith(reason)


@pytest.mark.parametrize("entry", [
    "@host.example",
    "user@",
    "x..example",
    "x$y.example",
    "spam.example#not-a-comment",
    ".spam.example",
    "*.spam.example",
    "<>",
    '"unterminated@host.example',
    "[999.0.0.1]",
])
def test_invalid_entries_refused_by_the_normaliser(entry):
    # The reason is the sender check's own (normalize_entry), word for word,
    # so the file and the lookups cannot disagree about what an entry means.
    with pytest.raises(ValueError) as expected:
        normalize_entry(entry)
    with pytest.raises(ValueError) as info:
        parse_line(entry.encode())
    assert str(info.value) == str(expected.value) != ""


def test_error_names_file_and_line():
    text = b"# header\n\nspam.example\nbad entry here\nok.example\n"
    with pytest.raises(SpammersSyntaxError) as info:
        parse_source(text, "/home/u/etc/spammers")
    err = info.value
    assert isinstance(err, ConfigError)
    assert (err.source, err.lineno) == ("/home/u/etc/spammers", 4)
    assert str(err).startswith("/home/u/etc/spammers:4: more than one word")


def test_binary_file_is_refused_at_its_first_line():
    blob = bytes(range(256)) * 4
    with pytest.raises(SpammersSyntaxError) as info:
        parse_source(blob, "spammers")
    assert str(info.value) == "spammers:1: binary data (NUL byte)"


def test_crlf_bom_and_missing_final_newline():
    text = b"\xef\xbb\xbfSpam.Example\r\n# c\r\nuser@Host.Example"
    assert parse_source(text, "s") == ["spam.example", "user@host.example"]


def test_empty_source_is_an_empty_list():
    assert parse_source(b"", "s") == []
    assert parse_source(b"\n\n# nothing listed\n", "s") == []


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(SpammersSourceError) as info:
        read_source(str(tmp_path / "spammers"))
    assert str(info.value) == "%s: cannot read: No such file or directory" % (tmp_path / "spammers")


@pytest.mark.parametrize("text, words", [
    ("a b\tc", ["a", "b", "c"]),
    ('"a b"@c d', ['"a b"@c', "d"]),
    ('"a\\" #b"@c # x', ['"a\\" #b"@c']),
    ("a#b #c", ["a#b"]),
    ("#a b", []),
])
def test_split_words(text, words):
    assert split_words(text) == words


# ------------------------------------------------ lookups: sender_keys + SpammersMap


@pytest.fixture(scope="module")
def sample_map(tmp_path_factory):
    db = tmp_path_factory.mktemp("spammers") / "spammers.db"
    assert rebuild(str(SAMPLE), str(db)) == len(SAMPLE_KEYS)
    smap = SpammersMap(str(db))
    yield smap
    smap.close()


@pytest.mark.parametrize("sender, listed", [
    # a domain entry: the host, every subdomain, any case, a trailing dot
    ("<someone@spam.example>", True),
    ("someone@SPAM.EXAMPLE", True),
    ("<x@deep.sub.spam.example>", True),
    ("<x@spam.example.>", True),
    ("<x@notspam.example>", False),
    ("<x@spam.example.org>", False),
    ("<x@example>", False),
    ("<x@bulk.example>", True),
    ("<x@tabbed.example>", True),
    # a user@host entry: that address only, any case, +detail stripped
    ("<User@MAIL.other.example>", True),
    ("<user+promo@mail.other.example>", True),
    ("<other@mail.other.example>", False),
    ("<user@other.example>", False),
    ("<user@sub.mail.other.example>", False),
    # quoted local parts and source routes resolve to the same key
    ('<"quoted"@quoted.example>', True),
    ("<QUOTED@quoted.example>", True),
    ("<@relay.example:quoted@quoted.example>", True),
    ("<user#tag@hash.example>", True),
    ("<user@hash.example>", False),
    # address literals
    ("<x@[192.0.2.7]>", True),
    ("<x@[192.0.2.8]>", False),
    ("<x@[IPv6:2001:db8:0:0:0:0:0:25]>", True),
    ("<who@[198.51.100.9]>", True),
    ("<other@[198.51.100.9]>", False),
    # the null sender is never blocked, an unqualified one has no host to list
    ("<>", False),
    ("", False),
    ("<postmaster>", False),
])
def test_sender_lookups(sample_map, sender, listed):
    assert sample_map.lookup(sender_keys(sender)) is listed
    assert any(sample_map.contains(k) for k in sender_keys(sender)) is listed
    decision = mail(sender, listed=sample_map.members)
    assert isinstance(decision, Reject if listed else Continue)


def test_contains_folds_ascii_case_only(sample_map):
    assert sample_map.contains("SPAM.example")
    assert sample_map.contains("[IPV6:2001:DB8::25]")
    assert not sample_map.contains("spam.example\0")
    assert len(sample_map) == len(SAMPLE_KEYS)
