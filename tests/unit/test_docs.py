"""The operator's documents agree with the code: man pages, the annotated sample, the crontab, README.

Every console script has a man page that renders without a groff warning and
names every option its parser accepts; relaymilter.yaml(5), the annotated
sample and the config schema name the same keys; the shipped crontab is valid
/etc/cron.d syntax holding the three classic expiry policies; the packaged
configuration made from the sample loads; README.rst keeps its two
quick-start commands and points only at files that exist.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from relaymilter import config as rconfig
from relaymilter.cli import entry
from relaymilter.guardconfig import LIMITS_KEYS
from relaymilter.mapsconfig import RELAYERS_KEYS, SPAMMERS_KEYS
from relaymilter.metricsconfig import METRICS_KEYS
from relaymilter.policy.modes import FAMILIES
from relaymilter.popwatchconfig import POPWATCH_KEYS
from relaymilter.recipientsconfig import LOCAL_RECIPIENTS_KEYS
from relaymilter.dnsbl.settings import DNSBL_KEYS

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "packaging" / "man"
SAMPLE = ROOT / "rules" / "relaymilter.sample.yaml"
CRONTAB = ROOT / "packaging" / "cron" / "relaymilter"
README = ROOT / "README.rst"


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def man_page(name: str) -> Path:
    pages = sorted(MAN.glob(name + ".[1-8]"))
    assert len(pages) == 1, "want one man page for %s in %s, found %s" % (name, MAN, pages)
    return pages[0]


def roff_text(path: Path) -> str:
    """The page's source with the escapes that matter here undone (\\- -> -, font changes dropped)."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\(dq", '"').replace("\\e", "\\")
    return text.replace("\\&", "").replace("\\c", "")


# --- man pages -----------------------------------------------------------------

def test_every_console_script_has_a_man_page():
    for name in console_scripts():
        page = man_page(name)
        th = re.search(r"^\.TH (\S+) (\d)", page.read_text(encoding="utf-8"), re.M)
        assert th, "%s has no .TH line" % page
        assert th.group(1).replace("\\-", "-") == name.upper()
        assert th.group(2) == page.suffix[1:]
    # Daemons and admin commands in section 8, the test client in 1, the file format in 5.
    assert man_page("relaymilter").suffix == ".8"
    assert man_page("relaymilter-test").suffix == ".1"
    assert (MAN / "relaymilter.yaml.5").is_file()


ALL_PAGES = sorted(p.name for p in MAN.glob("*.[1-8]"))


@pytest.mark.parametrize("page", ALL_PAGES)
def test_man_page_renders_without_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is missing: apt-get install groff-base (packaging/scripts/deps.sh --test)")
    run = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    rendered = subprocess.run([groff, "-man", "-Tutf8", "-ww", str(MAN / page)],
                              capture_output=True, timeout=60, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    text = rendered.stdout.decode("utf-8")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert re.search(r"^%s$" % section, re.sub(r".\x08", "", text), re.M), "%s lacks %s" % (page, section)
    man = shutil.which("man")
    if man is not None:  # man-db runs the same page through its own pipeline (preconv, tbl)
        run = subprocess.run([man, "--warnings", "-l", str(MAN / page)], capture_output=True, text=True,
                             timeout=60, env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin",
                                              "MANPAGER": "cat", "PAGER": "cat"})
        assert run.returncode == 0 and run.stderr == "", run.stderr


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_man_page_names_every_option(name):
    module = importlib.import_module(entry.COMMANDS[name])
    parser = module.build_parser()
    text = roff_text(man_page(name))
    missing = [opt for action in parser._actions for opt in action.option_strings
               if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(opt), text)]
    assert not missing, "%s(8) does not document %s" % (name, ", ".join(missing))


# --- configuration keys: sample == relaymilter.yaml(5) == schema ---------------------------

NESTED = ("relayers", "spammers", "popwatch", "limits", "modes", "local_recipients", "metrics", "dnsbl")


def sample_keys() -> set[str]:
    data = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    keys = set()
    for key, value in data.items():
        keys.add(key)
        if isinstance(value, dict):
            keys.update("%s.%s" % (key, sub) for sub in value)
    return keys


def man_keys() -> set[str]:
    """Keys documented as `.TP` + `.B key` items in the key sections of relaymilter.yaml(5)."""
    lines = (MAN / "relaymilter.yaml.5").read_text(encoding="utf-8").splitlines()
    keys, section = set(), ""
    for prev, line in zip(lines, lines[1:]):
        if prev.startswith(".SH "):
            section = prev[4:]
        if prev == ".TP" and line.startswith(".B ") and section.endswith(("KEYS",) + tuple(n.upper() for n in NESTED)):
            keys.add(line[3:].strip().replace("\\-", "-"))
    return keys


def schema_keys() -> set[str]:
    keys = set(rconfig.TOP_KEYS)
    for parent, subs in (("relayers", RELAYERS_KEYS), ("spammers", SPAMMERS_KEYS),
                         ("popwatch", POPWATCH_KEYS), ("limits", LIMITS_KEYS), ("modes", FAMILIES),
                         ("local_recipients", LOCAL_RECIPIENTS_KEYS), ("metrics", METRICS_KEYS),
                         ("dnsbl", DNSBL_KEYS)):
        keys.update("%s.%s" % (parent, s) for s in subs)
    return keys


def test_sample_documents_every_schema_key():
    assert sample_keys() == schema_keys()


def test_man_page_documents_every_sample_key():
    documented, sample = man_keys(), sample_keys()
    assert not sample - documented, "relaymilter.yaml(5) lacks %s" % sorted(sample - documented)
    assert not documented - sample, "relaymilter.yaml(5) documents keys the sample lacks: %s" % sorted(documented - sample)
    assert not documented - schema_keys(), "relaymilter.yaml(5) documents unknown keys: %s" % sorted(documented - schema_keys())


def test_man_page_defaults_match_the_sample():
    """Each key's `Default X` in the page is the sample's value (scalars and flat lists)."""
    data = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    lines = roff_text(MAN / "relaymilter.yaml.5").splitlines()
    checked = 0
    for i, line in enumerate(lines[:-2]):
        if line != ".TP" or not lines[i + 1].startswith(".B "):
            continue
        key = lines[i + 1][3:].strip()
        if lines[i + 2] != "Default" or key in NESTED:
            continue
        shown = re.sub(r"^\.(?:BR?|IR?) ", "", lines[i + 3]).strip()
        shown = re.sub(r"\s+[.,]$", "", shown)        # the punctuation .BR appends
        if len(shown) > 1 and shown[0] == shown[-1] == '"':
            shown = shown[1:-1]
        parent, _, sub = key.partition(".")
        value = data[parent][sub] if sub else data[parent]
        if isinstance(value, list):
            assert yaml.safe_load(shown) == value, (key, shown)
        else:
            # (not a dict lookup: 1 == True would show a 1 as "true")
            expected = "null" if value is None else "true" if value is True else "false" if value is False else str(value)
            assert shown == expected, (key, shown, value)
        checked += 1
    assert checked >= 20


def test_man_page_example_configuration_loads(tmp_path):
    text = roff_text(MAN / "relaymilter.yaml.5")
    example = re.search(r"^\.SH EXAMPLE\n.*?^\.nf\n(.*?)^\.fi$", text, re.M | re.S).group(1)
    hosts = tmp_path / "local-host-names"
    hosts.write_text("mail.example.com\n")
    example = example.replace("/etc/mail/local-host-names", str(hosts))
    path = tmp_path / "example.yaml"
    path.write_text(example)
    cfg = rconfig.load_config(str(path))
    assert {"example.com", "example.org", "mail.example.com"} <= cfg.local_domains
    assert cfg.relayers.window == 60 and cfg.popwatch.patterns == ("dovecot",)


# --- the packaged configuration -------------------------------------------------------------

def load_system_config_script():
    spec = importlib.util.spec_from_file_location("system_config", ROOT / "packaging" / "debian" / "system-config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packaged_configuration_is_the_sample_with_system_paths(tmp_path):
    script = load_system_config_script()
    out = tmp_path / "relaymilter.yaml"
    assert script.main([str(SAMPLE), str(out)]) == 0
    cfg = rconfig.load_config(str(out))
    assert cfg.relayers.path == "/var/lib/relaymilter/relayers.db" and cfg.relayers.url is None
    assert (cfg.spammers.source, cfg.spammers.path) == ("/etc/relaymilter/spammers", "/var/lib/relaymilter/spammers.db")
    assert cfg.log == "syslog" and cfg.socket == rconfig.DEFAULT_SOCKET
    # Everything else keeps the sample's defaults, comments included.
    sample_lines = SAMPLE.read_text().splitlines()
    packaged = out.read_text()
    changed = {old for old, _ in script.CHANGES}
    for line in sample_lines[2:]:
        if line not in changed:
            assert line in packaged.splitlines(), line
    assert yaml.safe_load(packaged).keys() == yaml.safe_load(SAMPLE.read_text()).keys()


def test_packaged_configuration_refuses_a_changed_sample(tmp_path):
    script = load_system_config_script()
    sample = tmp_path / "sample.yaml"
    sample.write_text(SAMPLE.read_text().replace("  path: ~/etc/relayers.db", "  path: ~/relayers.db"))
    out = tmp_path / "out.yaml"
    assert script.main([str(sample), str(out)]) == 1
    assert not out.exists()


# --- the crontab ----------------------------------------------------------------------------

FIELD_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CLASSIC = {"15 3 * * *": "vsmtprelay expire 1440", "*/15 * * * *": "vsmtprelay expire 60",
           "0 0 * * *": "vsmtprelay expire"}


def valid_field(text: str, low: int, high: int) -> bool:
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if base == "*":
            continue
        lo, _, hi = base.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return False
        if not low <= int(lo) <= high or (hi and not int(lo) <= int(hi) <= high):
            return False
    return True


def cron_jobs() -> list[tuple[bool, list[str], str, str]]:
    """(enabled, 5 time fields, user, command) for each job line, commented out or not."""
    jobs = []
    for line in CRONTAB.read_text().splitlines():
        enabled = not line.startswith("#")
        fields = line.lstrip("#").split(None, 6)
        if len(fields) == 7 and all(valid_field(f, *r) for f, r in zip(fields[:5], FIELD_RANGES)):
            jobs.append((enabled, fields[:5], fields[5], fields[6]))
    return jobs


def test_crontab_is_cron_d_syntax():
    text = CRONTAB.read_text()
    assert text.endswith("\n")  # cron ignores a last line without a newline
    assert re.fullmatch(r"[A-Za-z0-9_-]+", CRONTAB.name)  # run-parts naming, or cron skips the file
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z_]+=\S.*", stripped), "neither a variable nor a comment: %r" % line
    assert "PATH=" in text and "/usr/bin" in text


def test_crontab_offers_the_three_classic_policies_one_to_choose():
    jobs = cron_jobs()
    assert {" ".join(f): cmd for _, f, _, cmd in jobs} == CLASSIC
    assert all(user == "relaymilter" for _, _, user, _ in jobs)
    # Shipped as a conffile: nothing runs until the administrator picks one.
    assert not any(enabled for enabled, _, _, _ in jobs)


def test_crontab_field_checker_refuses_bad_fields():
    assert valid_field("*/15", 0, 59) and valid_field("1-5,7", 0, 7)
    assert not valid_field("60", 0, 59) and not valid_field("*/0", 0, 59) and not valid_field("x", 0, 23)


# --- README ---------------------------------------------------------------------------------

def test_readme_keeps_the_quick_start_commands():
    text = README.read_text()
    assert "    bash packaging/quickstart.sh\n" in text
    assert "    bash tests/run.sh\n" in text


def test_readme_has_the_operations_sections():
    headings = set(re.findall(r"^(.+)\n[=-]{3,}$", README.read_text(), re.M))
    for heading in ("Installing", "Wiring it into sendmail", "Wiring it into Postfix", "Scheduled expiry",
                    "Migrating", "Troubleshooting"):
        assert heading in headings, heading


def test_readme_names_only_files_that_exist():
    text = README.read_text()
    named = set(re.findall(r"``((?:packaging|rules|tests|benchmarks)/[\w./-]+)``", text))
    assert named, "README names no repository files"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
    for page in re.findall(r"\b(relaymilter(?:-[a-z]+)?|vsmtprelay|vnewspammers|relaymilter\.yaml)\((\d)\)", text):
        assert (MAN / ("%s.%s" % page)).is_file(), page
