"""relaymilter-test --lookup: "is x@dom known, and by which source?" from the configuration and the real sources."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from relaymilter.cli.harness import main
from relaymilter.config import load_config
from relaymilter.recipientlookup import explain, open_sources
from relaymilter.store import recipients as rmod


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(rmod, "RACY_NS", 0)
    (tmp_path / "aliases").write_text('staff: alice, bob\n"John Doe": jdoe\n')
    (tmp_path / "users").write_text("alice\ncarol@local.test\n")
    subprocess.run(["makemap", "hash", str(tmp_path / "virt")], input="dave@local.test d\n@catch.test any\n",
                   text=True, check=True, timeout=60)
    path = tmp_path / "c.yaml"
    path.write_text(f"""\
add_host_names: false
local_domains: [local.test, catch.test]
relay_domains: [relayed.test]
local_recipients:
  passwd: true
  aliases: [{tmp_path}/aliases]
  lists: [{tmp_path}/users]
  maps: [{tmp_path}/virt.db]
  recipient_delimiter: "+"
""")
    return tmp_path


ROOT = pwd.getpwuid(0).pw_name
LOOKUPS = [
    (ROOT + "@local.test", 0, "known (passwd); rule=local_domain source=passwd"),
    ("Staff@LOCAL.test", 0, "known (aliases {d}/aliases); rule=local_domain source=aliases"),
    ('"john doe"@local.test', 0, "resolves to john doe@local.test: known (aliases"),
    ("alice+news@local.test", 0, "known (list {d}/users); rule=local_domain source=list"),
    ("carol@local.test", 0, "source=list"),
    ("carol@catch.test", 0, "known (map {d}/virt.db); rule=local_domain source=map"),
    ("dave@local.test", 0, "source=map"),
    ("Postmaster@local.test", 0, "known (always accepted); rule=local_domain source=postmaster"),
    ("nobody-here@local.test", 1, "550 5.1.1 User unknown; rule=unknown_recipient"),
    ("bob@remote.example", 0, "not a local or relay domain, local_recipients does not apply"),
    ("bob@relayed.test", 0, "a relay domain, local_recipients does not apply"),
    ("nobody%remote.example@local.test", 0, "resolves to nobody@remote.example: not a local or relay domain"),
]


@pytest.mark.parametrize("address,code,text", LOOKUPS, ids=[a for a, _, _ in LOOKUPS])
def test_lookup_answers(cfg, capsys, address, code, text):
    assert main(["-c", str(cfg / "c.yaml"), "--lookup", address]) == code
    out = capsys.readouterr().out
    assert out.startswith("<%s>: resolves to " % address) and text.format(d=cfg) in out, out


def test_source_broken_after_start_says_451_and_why(cfg):
    config = load_config(str(cfg / "c.yaml"))
    sources = open_sources(config)
    assert explain(config, sources, "alice@local.test").ok
    os.unlink(cfg / "users")
    os.mkdir(cfg / "users")
    answer = explain(config, sources, "alice@local.test")
    assert not answer.ok and answer.text.endswith(
        "451 4.3.0 Temporary lookup failure (%s/users: cannot read: Is a directory); "
        "rule=recipients_unavailable" % cfg), answer.text
    assert "source=aliases" in explain(config, sources, "staff@local.test").text   # known elsewhere: accepted


def test_lookup_config_errors_and_usage(cfg, capsys):
    (cfg / "users").unlink()
    assert main(["-c", str(cfg / "c.yaml"), "--lookup", "a@local.test"]) == 2
    assert "%s:7: local_recipients.lists: %s/users: No such file" % (cfg / "c.yaml", cfg) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--lookup", "a@local.test", "--socket", "unix:/tmp/x.sock"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["-c", str(cfg / "c.yaml"), "--socket", "unix:/tmp/x.sock", "--client", "127.0.0.1",
              "--from", "a@b", "--rcpt", "c@d"])
    assert exc.value.code == 2 and "-c/--config is for --lookup" in capsys.readouterr().err


def test_installed_script(cfg):
    run = subprocess.run(["relaymilter-test", "-c", str(cfg / "c.yaml"), "--lookup", "staff@local.test"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "source=aliases" in run.stdout, run.stderr
    assert Path(cfg / "aliases").exists()
