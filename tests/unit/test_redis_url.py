"""Redis store URLs (relaymilter.store.redisurl): the forms, the options, masking, and the configuration's FILE:LINE errors.

Parsing only: nothing here connects to a server (the integration tests in
tests/integration/test_redis_*.py do).
"""

from __future__ import annotations

import pytest

from relaymilter.config import load_config
from relaymilter.errors import ConfigError
from relaymilter.store.redis import RedisRelayStore
from relaymilter.store.redisurl import DEFAULT_PREFIX, DEFAULT_TIMEOUT, mask_url, parse_store_url
from relaymilter.store.relayers import open_relay_store


def test_plain_url_defaults():
    spec = parse_store_url("redis://10.0.0.5:6380/2")
    assert spec.prefix == DEFAULT_PREFIX == "relaymilter:relay:"
    assert spec.sentinels == () and spec.service is None
    assert spec.db == 2
    assert spec.connection == {"host": "10.0.0.5", "port": 6380, "db": 2,
                               "socket_timeout": DEFAULT_TIMEOUT, "socket_connect_timeout": DEFAULT_TIMEOUT}


def test_options_password_and_prefix():
    spec = parse_store_url("redis://:p%40ss@db.example:6379/0?prefix=farm1:relay:&socket_timeout=0.5&client_name=mx1")
    assert spec.prefix == "farm1:relay:"
    assert spec.connection["password"] == "p@ss"
    assert spec.connection["socket_timeout"] == 0.5
    assert spec.connection["socket_connect_timeout"] == 0.5     # follows socket_timeout unless given
    assert spec.connection["client_name"] == "mx1"
    assert "prefix" not in spec.connection


def test_tls_and_unix():
    tls = parse_store_url("rediss://relay:pw@db.example:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem")
    assert tls.connection["connection_class"].__name__ == "SSLConnection"
    assert tls.connection["username"] == "relay" and tls.connection["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    unix = parse_store_url("unix:///run/redis/redis-server.sock?db=4&socket_connect_timeout=1")
    assert unix.connection["path"] == "/run/redis/redis-server.sock" and unix.db == 4
    assert unix.connection["socket_connect_timeout"] == 1.0 and unix.connection["socket_timeout"] == DEFAULT_TIMEOUT


def test_sentinel_url():
    spec = parse_store_url("redis+sentinel://:datapw@s1.example,s2.example:26380,[2001:db8::3]/relays/3"
                           "?sentinel_password=sentpw&prefix=r:")
    assert spec.sentinels == (("s1.example", 26379), ("s2.example", 26380), ("2001:db8::3", 26379))
    assert spec.service == "relays" and spec.db == 3 and spec.prefix == "r:"
    assert spec.connection["password"] == "datapw" and "host" not in spec.connection
    assert spec.sentinel_auth == {"password": "sentpw"}
    assert parse_store_url("redis+sentinel://127.0.0.1:26379/mymaster").db == 0


@pytest.mark.parametrize("url, message", [
    ("http://h/0", "want a redis://"),
    ("redis://h/zero", "must be a number"),
    ("redis://h/0?bogus=1", "unknown option 'bogus'"),
    ("redis://h/0?timeout=1", "unknown option 'timeout'"),             # redis-py's pool wait, not ours
    ("redis://h/0?retry_on_timeout=yes", "unknown option"),
    ("redis://h/0?ssl_ca_certs=/x", "unknown option 'ssl_ca_certs'"),  # TLS options need rediss://
    ("redis://h/0?socket_timeout=0", "positive"),
    ("redis://h/0?socket_timeout=soon", "Invalid value"),
    ("redis://h/0?prefix=", "prefix must be non-empty"),
    ("redis://h/0?prefix=a%20b", "prefix must be non-empty"),
    ("redis://h/0?db=1&db=2", "given twice"),
    ("redis:///0", "names no host"),
    ("unix://", "needs the socket path"),
    ("redis+sentinel://h1,h2", "needs /SERVICE"),
    ("redis+sentinel://h1/svc/1/extra", "needs /SERVICE"),
    ("redis+sentinel://h1:99999/svc", "bad sentinel"),
    ("redis+sentinel:///svc", "at least one sentinel"),
    ("redis+sentinel://h1/svc/first", "must be a number"),
])
def test_malformed_urls_are_refused(url, message):
    with pytest.raises(ValueError) as info:
        parse_store_url(url)
    assert message in str(info.value)


def test_masking_hides_every_password():
    assert mask_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("redis://user:secret@h:1/0?prefix=x:") == "redis://user:***@h:1/0?prefix=x:"
    assert mask_url("redis+sentinel://:a@s1,s2/svc?sentinel_password=b") == "redis+sentinel://:***@s1,s2/svc?sentinel_password=***"
    assert mask_url("rediss://h/0?ssl_password=c") == "rediss://h/0?ssl_password=***"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"


def test_open_relay_store_routes_urls_without_connecting():
    # Nothing listens on port 1: opening must not connect (the milter starts even when Redis is down).
    store = open_relay_store("redis://127.0.0.1:1/0")
    assert isinstance(store, RedisRelayStore)
    assert store.location == "redis://127.0.0.1:1/0"    # the milter compares it with the config on reload
    store.close()
    assert isinstance(open_relay_store("redis+sentinel://127.0.0.1:1/svc"), RedisRelayStore)


def test_config_reports_a_bad_url_with_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("add_host_names: false\nrelayers:\n  path: /tmp/x.db\n  url: redis://:pw@h/0?sockettimeout=1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert str(info.value).startswith("%s:4:" % cfg)
    assert "unknown option 'sockettimeout'" in str(info.value) and "pw" not in str(info.value)


def test_config_accepts_farm_urls(tmp_path):
    cfg = tmp_path / "c.yaml"
    url = "redis+sentinel://10.0.0.1,10.0.0.2,10.0.0.3/relays/0?prefix=mx:&socket_timeout=0.3"
    cfg.write_text("add_host_names: false\nrelayers: {url: '%s', window: 30}\n" % url)
    config = load_config(str(cfg))
    assert config.relayers.location == url and config.relayers.window == 30


@pytest.mark.parametrize("text, url", [
    ("redis://127.0.0.1:6379/0", True), ("rediss://h/1", True), ("unix:///run/redis.sock", True),
    ("redis+sentinel://h:26379/mymaster", True), ("/var/lib/relayers.db", False), ("~/etc/relayers.db", False),
    ("redis:/no-slashes", False), ("http://h/", False), ("relayers.db", False), ("", False),
])
def test_one_check_tells_a_store_url_from_a_path(text, url):
    from relaymilter.store import is_store_url
    from relaymilter.store.relayers import BDBRelayStore, open_relay_store

    assert is_store_url(text) is url
    if not url and text.startswith("/"):
        assert isinstance(open_relay_store(text), BDBRelayStore)
