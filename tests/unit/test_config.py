"""The YAML configuration: strict schema, FILE:LINE errors, defaults, the annotated sample."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

import pytest

from relaymilter import config as cfgmod
from relaymilter.cli.milter import main as milter_main
from relaymilter.config import load_config, rules_dir
from relaymilter.dnsbl.settings import DNSBL_KEYS
from relaymilter.domainsconfig import host_names
from relaymilter.errors import ConfigError
from relaymilter.guardconfig import LIMITS_KEYS
from relaymilter.mapsconfig import RELAYERS_KEYS, SPAMMERS_KEYS
from relaymilter.metricsconfig import METRICS_KEYS
from relaymilter.policy.modes import FAMILIES
from relaymilter.popwatchconfig import POPWATCH_KEYS
from relaymilter.recipientsconfig import LOCAL_RECIPIENTS_KEYS

SAMPLE = rules_dir() / "relaymilter.sample.yaml"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bundled_default_loads():
    c = load_config(str(rules_dir() / "default.yaml"))
    assert c.socket == "inet:8894@127.0.0.1"
    assert c.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert c.relayers.window is None and c.relayers.path == "~/etc/relayers.db"
    assert {"localhost", "[127.0.0.1]"} <= c.local_domains


def test_sample_loads_and_matches_defaults():
    sample = load_config(str(SAMPLE))
    default = load_config(str(rules_dir() / "default.yaml"))
    for field in ("socket", "log", "log_level", "local_domains", "relay_domains", "relay_subdomains",
                  "percent_hack", "bang_paths", "trusted_networks", "permit_authenticated", "relayers", "spammers"):
        assert getattr(sample, field) == getattr(default, field), field


def sample_keys() -> set[str]:
    """Every key the sample shows, as section.key."""
    keys, section = set(), None
    for line in SAMPLE.read_text().splitlines():
        m = re.match(r"^(\s*)([a-z_]+):", line)
        if not m:
            continue
        indent, key = m.group(1), m.group(2)
        if not indent:
            section = key
            keys.add(key)
        else:
            keys.add("%s.%s" % (section, key))
    return keys


def test_sample_documents_every_key_and_only_real_keys():
    schema = set(cfgmod.TOP_KEYS)
    schema |= {"relayers.%s" % k for k in RELAYERS_KEYS}
    schema |= {"spammers.%s" % k for k in SPAMMERS_KEYS}
    schema |= {"popwatch.%s" % k for k in POPWATCH_KEYS}
    schema |= {"limits.%s" % k for k in LIMITS_KEYS} | {"modes.%s" % k for k in FAMILIES}
    schema |= {"local_recipients.%s" % k for k in LOCAL_RECIPIENTS_KEYS}
    schema |= {"metrics.%s" % k for k in METRICS_KEYS}
    schema |= {"dnsbl.%s" % k for k in DNSBL_KEYS}
    assert sample_keys() == schema


def test_sample_has_a_comment_before_every_key():
    lines = SAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[a-z_]+:\s*\S", line) and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), "no comment above: %s" % line


@pytest.mark.parametrize("text,line,message", [
    ("socket: inet:1@127.0.0.1\nbogus: 1\n", 2, "unknown key 'bogus'"),
    ("trusted_networks: [10.0.0.0/8, 10.0.0.1/33]\n", 1, "bad network"),
    ("trusted_networks:\n  - 10.0.0.0/8\n  - 192.168.1.5/24\n", 3, "host bits set (did you mean 192.168.1.0/24?)"),
    ("relayers:\n  path: /x.db\n  window: -5\n", 3, "window"),
    ("relayers:\n  window: soon\n", 2, "window"),
    ("relayers:\n  windw: 5\n", 2, "unknown relayers key 'windw'"),
    ("permit_authenticated: maybe\n", 1, "true or false"),
    ("socket: tcp:8894\n", 1, "socket"),
    ("local_domains: [good.example, 'bad domain']\n", 1, "bad domain name"),
    ("local_domains: ['[300.1.1.1]']\n", 1, "bad address literal"),
    ("spammers: [a, b]\n", 1, "must be a mapping"),
    ("popwatch:\n  grace: 0\n", 2, "grace"),
    ("log: journald\n", 1, "must be one of"),
    ("a: [1\n", 2, "YAML syntax error"),
    ("socket: inet:1@h\nsocket: inet:2@h\n", 2, "duplicate key"),
])
def test_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith("%s:%d: " % (path, line)), str(exc.value)
    assert message in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(str(tmp_path / "nope.yaml"))


def test_domain_files_and_prefixes(tmp_path):
    (tmp_path / "lhn").write_text("# local names\nMail.Example.COM.\n\nexample.com  # trailing comment\n[192.0.2.55]\n")
    (tmp_path / "rd").write_text("partner.example\n192.168.1\n10\n")
    c = load_config(write(tmp_path, "add_host_names: false\nlocal_domains_file: %s\nrelay_domains_file: %s\n"
                          "trusted_networks: [127.0.0.0/8]\n" % (tmp_path / "lhn", tmp_path / "rd")))
    assert c.local_domains == {"mail.example.com", "example.com", "[192.0.2.55]"}
    assert c.relay_domains == {"partner.example"}
    assert c.trusted_networks == tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "192.168.1.0/24", "10.0.0.0/8"))


def test_bad_line_in_domains_file_names_that_file(tmp_path):
    (tmp_path / "lhn").write_text("good.example\nbad name here\n")
    with pytest.raises(ConfigError, match=r"lhn:2: bad domain name"):
        load_config(write(tmp_path, "local_domains_file: %s\n" % (tmp_path / "lhn")))


def test_missing_domains_file_names_the_config_line(tmp_path):
    path = write(tmp_path, "socket: inet:1@127.0.0.1\nlocal_domains_file: /nonexistent/lhn\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: cannot read /nonexistent/lhn"):
        load_config(path)


def test_trusted_networks_replace_the_default(tmp_path):
    c = load_config(write(tmp_path, "trusted_networks: [192.0.2.0/24]\n"))
    assert c.trusted_networks == (ipaddress.ip_network("192.0.2.0/24"),)


def test_literals_normalised(tmp_path):
    c = load_config(write(tmp_path, "add_host_names: false\nlocal_domains: ['[IPv6:2001:DB8:0::1]', '[192.0.2.1]']\n"))
    # kept as spelled (letter case aside): sendmail's class w compares the spelling
    assert c.local_domains == {"[ipv6:2001:db8:0::1]", "[192.0.2.1]"}


def test_find_config_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RELAYMILTER_CONFIG", raising=False)
    assert cfgmod.find_config("x.yaml") == "x.yaml"
    monkeypatch.setenv("RELAYMILTER_CONFIG", "/from/env.yaml")
    assert cfgmod.find_config(None) == "/from/env.yaml"


def test_check_config_cli(tmp_path, capsys):
    good = write(tmp_path, "local_domains: [example.com]\nrelayers: {window: 30}\n")
    assert milter_main(["-c", good, "--check-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("relaymilter: configuration OK: %s:" % good) and "window 30 min" in out
    bad = write(tmp_path, "local_domains: [example.com]\nwindow: 30\n", "bad.yaml")
    assert milter_main(["-c", bad, "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err == "relaymilter: error: %s:2: unknown key 'window' (known: %s)\n" % (bad, ", ".join(sorted(cfgmod.TOP_KEYS)))


def test_check_config_installed_script_on_bundled_rules():
    proc = subprocess.run(["relaymilter", "--check-config"], capture_output=True, text=True, timeout=60,
                          env={"PATH": __import__("os").environ["PATH"], "HOME": "/tmp"})
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout


def test_bad_socket_option(capsys):
    assert milter_main(["--socket", "tcp:25", "--check-config"]) == 2
    assert "--socket" in capsys.readouterr().err


@pytest.mark.parametrize("text, workers", [("", None), ("workers: auto\n", None), ("workers: 3\n", 3)])
def test_workers(tmp_path, text, workers):
    assert load_config(write(tmp_path, text)).workers == workers


@pytest.mark.parametrize("value", ["0", "-1", "many", "true", "1.5", "300"])
def test_bad_workers_names_the_line(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "log: stderr\nworkers: %s\n" % value))
    assert re.search(r"c\.yaml:2: workers: must be auto or a whole number", str(info.value))


def test_bad_workers_option(tmp_path, capsys):
    cfg = write(tmp_path, "log: stderr\n")
    assert milter_main(["-c", cfg, "--workers", "none", "--check-config"]) == 2
    assert "--workers must be auto or a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["inet:8894", "inet6:8894"])
def test_a_socket_without_a_host_is_refused(tmp_path, capsys, spec):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "socket: %s\n" % spec))
    assert "names no host, and libmilter would listen on every interface" in str(info.value)
    cfg = write(tmp_path, "log: stderr\n", name="ok.yaml")
    assert milter_main(["-c", cfg, "--socket", spec, "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relaymilter: error: --socket: %s names no host" % spec)
    assert milter_main(["-c", cfg, "--socket", spec + "@0.0.0.0", "--check-config"]) == 0


def test_mta_postfix_adds_no_host_names(tmp_path):
    sendmail = load_config(write(tmp_path, "local_domains: [local.test]\n"))
    postfix = load_config(write(tmp_path, "mta: postfix\nlocal_domains: [local.test, localhost]\n"))
    assert sendmail.mta == "sendmail" and postfix.mta == "postfix"
    assert host_names() <= sendmail.local_domains
    # exactly what the file lists, never the host's names or interface literals
    assert postfix.local_domains == {"local.test", "localhost"}


def test_mta_postfix_refuses_add_host_names_and_unknown_mta(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:2: add_host_names: true counts names Postfix relays as local"):
        load_config(write(tmp_path, "mta: postfix\nadd_host_names: true\n"))
    with pytest.raises(ConfigError, match=r"c.yaml:1: mta: must be one of sendmail, postfix"):
        load_config(write(tmp_path, "mta: exim\n"))


def test_a_config_travels_to_the_workers_intact():
    # The supervisor sends each reload to its workers pickled (relaymilter.worker.frame): every
    # section must survive the trip unchanged.
    import pickle

    from relaymilter.worker import frame

    for name in ("relaymilter.sample.yaml", "default.yaml"):
        config = load_config(str(rules_dir() / name))
        assert pickle.loads(pickle.dumps(config)) == config
        assert len(frame(config)) > 4
