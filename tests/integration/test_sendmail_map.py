"""relayers.db is one file that relaymilter, makemap and a real sendmail all read and write.

The store writes makemap-format Berkeley DB hash maps so that sendmail can consult the
same relayers.db natively (`K... hash`, FEATURE(`drac')): these tests check that with
sendmail's own map code (`sendmail -bt`, `/map`), with the real `makemap`, the installed
`vsmtprelay` script, and a running sendmail making its own relay decision from the map.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from berkeleydb import db

import mta
from relaymilter.store.relayers import BDBRelayStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SAMPLE = mta.REPO / "packaging" / "sendmail" / "sendmail.mc.sample"


def raw_keys(path: Path) -> list[bytes]:
    handle = db.DB()
    handle.open(str(path), dbtype=db.DB_HASH, flags=db.DB_RDONLY)
    try:
        return sorted(handle.keys())
    finally:
        handle.close()


def makemap(args: list[str], base: Path, text: str) -> None:
    proc = subprocess.run(["makemap", *args, str(base)], input=text, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


def vsmtprelay(db_path: Path, *args: str) -> str:
    proc = subprocess.run(["vsmtprelay", "-f", str(db_path), *args], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_store_written_map_is_found_by_sendmail(tmp_path, mta_tools):
    path = tmp_path / "relayers.db"
    store = BDBRelayStore(str(path))
    store.add({"10.11.12.13": 906502527, "192.0.2.7": 1700000000, "2001:DB8::1": 4102444800})
    assert raw_keys(path) == [b"10.11.12.13", b"192.0.2.7", b"2001:db8::1"]  # makemap style
    keys = ["10.11.12.13", "192.0.2.7", "2001:db8::1", "2001:DB8::1", "10.11.12.14"]
    assert mta.sendmail_bt_lookups(path, keys) == {
        "10.11.12.13": "906502527<OK>", "192.0.2.7": "1700000000<OK>",
        # sendmail lowercases the key it looks up, as the store writes it
        "2001:db8::1": "4102444800<OK>", "2001:DB8::1": "4102444800<OK>", "10.11.12.14": None}
    assert mta.sendmail_bt_lookup(path, "10.11.12.13", flags="") == "906502527"

    # Rewritten in place by the store and by the installed vsmtprelay: sendmail sees
    # every change (it reopens a map whose file changed).
    store.add({"10.11.12.13": 906600000, "198.51.100.9": 1600000000})
    assert store.delete(["192.0.2.7"]) == []
    vsmtprelay(path, "add", "203.0.113.5", "1234567890")
    vsmtprelay(path, "delete", "2001:db8::1")
    assert mta.sendmail_bt_lookups(path, ["10.11.12.13", "198.51.100.9", "203.0.113.5", "192.0.2.7",
                                          "2001:db8::1"]) == {
        "10.11.12.13": "906600000<OK>", "198.51.100.9": "1600000000<OK>", "203.0.113.5": "1234567890<OK>",
        "192.0.2.7": None, "2001:db8::1": None}
    assert raw_keys(path) == [b"10.11.12.13", b"198.51.100.9", b"203.0.113.5"]


def test_nul_terminated_map_keeps_its_style_for_sendmail(tmp_path, mta_tools):
    """A map built by `makemap -N` (postmap style) is extended in that style, never mixed."""
    base = tmp_path / "relayers"
    makemap(["-N", "hash"], base, "10.1.1.1 100\n")
    store = BDBRelayStore(str(base) + ".db")
    store.add({"10.2.2.2": 200})
    assert raw_keys(Path(str(base) + ".db")) == [b"10.1.1.1\0", b"10.2.2.2\0"]
    # A K line without -N/-O locks in the style of its first hit: both must be found.
    assert mta.sendmail_bt_lookups(base, ["10.1.1.1", "10.2.2.2"], flags="") == {
        "10.1.1.1": "100", "10.2.2.2": "200"}
    assert [store.lookup("10.1.1.1"), store.lookup("10.2.2.2")] == [100, 200]


def test_makemap_built_map_reads_through_the_store(tmp_path, mta_tools):
    base = tmp_path / "relayers"
    makemap(["hash"], base, "# edited by hand\n\n10.11.12.13 906502527\n"
                            "2001:DB8::7\t1700000000\n192.0.2.1   4102444800\n")
    store = BDBRelayStore(str(base) + ".db")
    assert store.entries() == [("10.11.12.13", 906502527), ("192.0.2.1", 4102444800),
                               ("2001:db8::7", 1700000000)]
    assert store.lookup("10.11.12.13") == 906502527
    assert store.lookup("::ffff:10.11.12.13") == 906502527
    assert store.lookup("2001:db8:0:0:0:0:0:7") == 1700000000
    assert store.lookup("10.11.12.14") is None


def test_vsmtprelay_dump_through_makemap_rebuilds_an_equal_map(tmp_path, mta_tools):
    path = tmp_path / "relayers.db"
    store = BDBRelayStore(str(path))
    future = int(time.time()) + 86400
    store.add({"10.11.12.13": 906502527, "192.0.2.1": future, "2001:db8::5": 1700000000,
               "10.9.0.1": 1600000000})
    dump = vsmtprelay(path, "dump")
    expected = "".join("# timestamp (UTC): %s\n%s %d\n" % (time.asctime(time.gmtime(ts)), ip, ts)
                       for ip, ts in store.entries())
    assert dump == expected

    rebuilt = tmp_path / "rebuilt"
    makemap(["hash"], rebuilt, dump)
    again = BDBRelayStore(str(rebuilt) + ".db")
    assert again.entries() == store.entries()
    assert raw_keys(Path(str(rebuilt) + ".db")) == raw_keys(path)
    keys = [ip for ip, _ in store.entries()]
    assert mta.sendmail_bt_lookups(rebuilt, keys) == mta.sendmail_bt_lookups(path, keys)


def _sample_drac_line(base: Path) -> str:
    """The sample .mc's FEATURE(`drac') line (choice B), pointed at *base*."""
    found = re.search(r"FEATURE\(`drac', `hash -o /etc/mail/relayers'\)", SAMPLE.read_text())
    assert found, "sendmail.mc.sample no longer declares the relayers map with FEATURE(`drac')"
    return found.group(0).replace("/etc/mail/relayers", str(base)) + "dnl"


def test_sendmail_own_relay_check_reads_relayers_db(sendmail_factory, tmp_path):
    """Choice B of the sample: sendmail decides relaying itself from relayers.db."""
    path = tmp_path / "relayers.db"
    store = BDBRelayStore(str(path))
    store.add({"127.0.0.7": int(time.time())})
    mx = sendmail_factory(promiscuous=False, extra_mc_lines=[_sample_drac_line(tmp_path / "relayers")],
                          hosts={"127.0.0.5": "pc5.client.test", "127.0.0.7": "pc7.client.test"})
    relayed = (250, "2.1.5 <bob@remote.example>... Recipient ok")
    denied = (550, "5.7.1 <bob@remote.example>... Relaying denied")

    def replies() -> list:
        return [mta.rcpt_replies(mx.port, ip, "carol@client.test", ["bob@remote.example"])[0]
                for ip in ("127.0.0.7", "127.0.0.5")]

    assert replies() == [relayed, denied]
    assert mta.rcpt_replies(mx.port, "127.0.0.5", "carol@client.test", ["alice@example.test"]) == [
        (250, "2.1.5 <alice@example.test>... Recipient ok")]
    # sendmail's own wording for a client without a PTR name (the milter's never varies).
    assert mta.rcpt_replies(mx.port, "127.0.0.6", "carol@client.test", ["bob@remote.example"]) == [
        (550, "5.7.1 <bob@remote.example>... Relaying denied. IP name lookup failed [127.0.0.6]")]
    # A POP login elsewhere and an expiry: the running sendmail follows the file.
    vsmtprelay(path, "delete", "127.0.0.7")
    store.add({"127.0.0.5": int(time.time())})
    assert replies() == [denied, relayed]
