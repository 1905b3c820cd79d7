"""Client address normalisation: one canonical relayers.db key per address."""

from __future__ import annotations

import pytest

from relaymilter.ipaddr import normalize_ip, sort_key


@pytest.mark.parametrize("given,key", [
    ("10.11.12.13", "10.11.12.13"),
    (" 10.11.12.13\n", "10.11.12.13"),
    ("[192.0.2.1]", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("::FFFF:C000:0201", "192.0.2.1"),
    ("IPv6:2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("IPv6:0:0:0:0:0:0:0:1", "::1"),            # sendmail's IPV6_FULL {client_addr}
    ("2001:0db8:0000:0000:0001:0000:0000:0001", "2001:db8::1:0:0:1"),
    ("[IPv6:fe80::1]", "fe80::1"),
])
def test_canonical(given, key):
    assert normalize_ip(given) == key


@pytest.mark.parametrize("bad", ["", "1.2.3", "256.1.1.1", "01.2.3.4", "1.2.3.04", "::g", "fe80::1%eth0",
                                 "1.2.3.4/32", "a" * 10_000, "1.2.3.4.5", "localhost", "\x00", "١.٢.٣.٤"])
def test_refused(bad):
    with pytest.raises(ValueError, match="invalid IP address"):
        normalize_ip(bad)


def test_error_message_is_short():
    with pytest.raises(ValueError) as exc:
        normalize_ip("9" * 10_000)
    assert len(str(exc.value)) < 100


def test_sort_key_orders_v4_numerically_then_v6_then_text():
    keys = ["zzz", "2001:db8::10", "10.0.0.10", "2001:db8::9", "9.0.0.1", "10.0.0.9"]
    assert sorted(keys, key=sort_key) == ["9.0.0.1", "10.0.0.9", "10.0.0.10", "2001:db8::9", "2001:db8::10", "zzz"]
