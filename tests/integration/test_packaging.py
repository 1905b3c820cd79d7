"""The Debian package, end to end: build, install, run what it installed, verify its units, purge.

One module-scoped build (packaging/debian/build-deb.sh; pip's wheel cache
keeps a rebuild to seconds) and one install with dpkg -i. Then the installed
commands run from /usr/bin with nothing of the checkout on their path; the
installed milter runs as the package's user with the unit's umask on a unix
socket and answers relay questions, reloads on SIGHUP and stops on SIGTERM;
the expire unit's own command expires a real map; systemd-analyze verifies
every installed unit (it needs the binaries and man pages the units name,
which is why this runs on the installed package). The last test purges the
package and checks nothing is left. The shipped Postfix snippet is checked
by Postfix's own postconf, from the Debian postfix package unpacked in a
temporary folder (postfix conflicts with sendmail-bin, so it is never
installed).

Needs root and dpkg; a machine that already has a relaymilter package
installed is left alone (the module is skipped).
"""

from __future__ import annotations

import calendar
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from relaymilter import __version__

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted(p.name for p in (ROOT / "packaging" / "systemd").iterdir() if p.suffix in (".service", ".timer"))
SYSTEM_CONFIG = "/etc/relaymilter/relaymilter.yaml"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}


def run(cmd: list[str], timeout: float = 120, check: bool = True, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or CLEAN_ENV, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s" % (cmd, proc.returncode, proc.stdout, proc.stderr))
    return proc


def package_installed() -> bool:
    proc = run(["dpkg-query", "-W", "-f=${Status}", "relaymilter"], check=False)
    return proc.returncode == 0 and "installed" in proc.stdout


def dpkg(*args: str) -> subprocess.CompletedProcess:
    """dpkg, waiting (bounded) while another dpkg or apt holds the lock."""
    deadline = time.monotonic() + 300
    while True:
        proc = run(["dpkg", *args], timeout=300, check=False)
        if proc.returncode == 0 or "lock" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def unit_setting(unit: str, key: str) -> list[str]:
    text = (ROOT / "packaging" / "systemd" / unit).read_text()
    return [m.group(1).strip() for m in re.finditer(r"^%s=(.*)$" % re.escape(key), text, re.M)]


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("installing a .deb needs root")
    for tool in ("dpkg", "dpkg-deb", "systemd-analyze", "setpriv", "runuser"):
        if shutil.which(tool) is None:
            pytest.fail("%s is missing: run packaging/scripts/deps.sh --test" % tool)
    if package_installed():
        pytest.skip("a relaymilter package is installed on this machine; not touching it")
    out = tmp_path_factory.mktemp("deb")
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    started = time.monotonic()
    proc = run(["bash", str(ROOT / "packaging" / "debian" / "build-deb.sh"), str(out)], timeout=900, env=env)
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out, proc.stdout
    assert path.name == "relaymilter_%s-1_%s.deb" % (__version__, run(["dpkg", "--print-architecture"]).stdout.strip())
    print("build-deb.sh took %.1f s" % (time.monotonic() - started))
    return path


@pytest.fixture(scope="module")
def installed(deb) -> Iterator[Path]:
    proc = dpkg("-i", str(deb))
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield deb
    finally:
        if package_installed() or run(["dpkg-query", "-W", "relaymilter"], check=False).returncode == 0:
            dpkg("-P", "relaymilter")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the relaymilter user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="rm-pkg-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the package file -------------------------------------------------------------

def test_package_metadata(deb):
    fields = {name: run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()
              for name in ("Package", "Version", "Depends", "Architecture")}
    assert fields["Package"] == "relaymilter" and fields["Version"] == __version__ + "-1"
    depends = {d.strip().split(" ")[0] for d in fields["Depends"].split(",")}
    # The interpreter is Debian's (never a private build), the libraries those the modules link.
    assert {"libmilter1.0.1", "libdb5.3", "adduser", "init-system-helpers"} <= depends
    assert any(re.fullmatch(r"python3\.\d+", d) for d in depends), depends
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == [SYSTEM_CONFIG, "/etc/relaymilter/spammers", "/etc/cron.d/relaymilter"]
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ["./usr/bin/%s" % c for c in ("relaymilter", "vsmtprelay", "vnewspammers", "relaymilter-popwatch",
                                                "relaymilter-test")] + \
                ["./lib/systemd/system/%s" % u for u in UNITS] + \
                ["./etc/relaymilter/relaymilter.yaml", "./etc/cron.d/relaymilter",
                 "./usr/share/man/man8/relaymilter.8.gz", "./usr/share/man/man5/relaymilter.yaml.5.gz",
                 "./usr/share/relaymilter/sendmail/relaymilter.m4", "./usr/share/relaymilter/postfix/main.cf.snippet"]:
        assert re.search(r" %s( |$)" % re.escape(path), listing, re.M), path
    assert "/tmp/" not in listing and "pyenv" not in listing
    assert "/bin/pip" not in listing      # the venv ships without pip and setuptools


# --- installed ----------------------------------------------------------------------

def test_installed_commands_run_from_the_package(installed, shared_dir):
    for cmd in ("relaymilter", "vsmtprelay", "vnewspammers", "relaymilter-popwatch", "relaymilter-test"):
        target = os.path.realpath("/usr/bin/" + cmd)
        assert target == "/usr/lib/relaymilter/bin/" + cmd
        first = Path(target).read_text().splitlines()[0]
        assert first == "#!/usr/lib/relaymilter/bin/python", first
        proc = run(["/usr/bin/" + cmd, "--version"])
        assert __version__ in proc.stdout + proc.stderr
    python = os.path.realpath("/usr/lib/relaymilter/bin/python")
    assert re.fullmatch(r"/usr/bin/python3\.\d+", python), python
    assert run(["dpkg", "-S", python]).returncode == 0
    where = run(["/usr/lib/relaymilter/bin/python", "-c", "import relaymilter, milter, berkeleydb;"
                 "print(relaymilter.__file__, milter.__file__, berkeleydb.__file__)"]).stdout.split()
    assert all(w.startswith("/usr/lib/relaymilter/lib/") for w in where), where

    check = run(["/usr/bin/relaymilter", "--check-config"])
    assert SYSTEM_CONFIG in check.stdout and "relayers /var/lib/relaymilter/relayers.db" in check.stdout

    db = shared_dir / "relayers.db"
    run(["/usr/bin/vsmtprelay", "-f", str(db), "add", "10.11.12.13", "906502527"])
    run(["/usr/bin/vsmtprelay", "-f", str(db), "add", "2001:DB8::7", "906502600"])
    dump = run(["/usr/bin/vsmtprelay", "-f", str(db), "dump"]).stdout
    assert dump == ("# timestamp (UTC): Tue Sep 22 22:15:27 1998\n10.11.12.13 906502527\n"
                    "# timestamp (UTC): Tue Sep 22 22:16:40 1998\n2001:db8::7 906502600\n")
    # Without -f the packaged configuration's map is used: the one postinst created, empty.
    assert run(["/usr/bin/vsmtprelay", "dump"]).stdout == ""


def test_postinst_made_the_user_state_and_enablement(installed):
    user = pwd.getpwnam("relaymilter")
    assert user.pw_dir == "/var/lib/relaymilter" and user.pw_uid < 1000
    assert grp.getgrgid(user.pw_gid).gr_name == "relaymilter"
    state = os.stat("/var/lib/relaymilter")
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (user.pw_uid, 0o755)
    db = os.stat("/var/lib/relaymilter/relayers.db")
    assert (db.st_uid, stat.S_IMODE(db.st_mode)) == (user.pw_uid, 0o644)
    # relaymilter.service is enabled (Debian starts daemons); popwatch and the timers are a choice.
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    assert os.path.realpath(wants / "relaymilter.service") == os.path.realpath("/lib/systemd/system/relaymilter.service")
    assert not (wants / "relaymilter-popwatch.service").exists()
    assert not Path("/etc/systemd/system/timers.target.wants/relaymilter-expire.timer").exists()
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "relaymilter"]).stdout
    for path in (SYSTEM_CONFIG, "/etc/relaymilter/spammers", "/etc/cron.d/relaymilter"):
        assert path in conffiles


def test_installed_units_verify(installed):
    paths = ["/lib/systemd/system/" + u for u in UNITS]
    for unit in UNITS:
        assert Path("/lib/systemd/system", unit).read_text() == (ROOT / "packaging" / "systemd" / unit).read_text()
    proc = run(["systemd-analyze", "verify", *paths], check=False)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    for unit in UNITS:
        if unit.endswith(".service"):
            exposure = run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                            "/lib/systemd/system/" + unit]).stdout
            level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", exposure).group(1))
            assert level <= 2.5, (unit, level)


def test_timer_schedules_are_the_classic_policies():
    strict = unit_setting("relaymilter-expire.timer", "OnCalendar")
    lenient = unit_setting("relaymilter-expire-daily.timer", "OnCalendar")
    for spec, step in ((strict, 15 * 60), (lenient, 24 * 3600)):
        proc = run(["systemd-analyze", "calendar", "--iterations=4", spec[0]], env={**CLEAN_ENV, "TZ": "UTC"})
        stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", proc.stdout)
        times = [calendar.timegm(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s in stamps]
        assert len(times) == 4 and {b - a for a, b in zip(times, times[1:])} == {step}, proc.stdout
    assert unit_setting("relaymilter-expire.service", "ExecStart")[0].endswith(" expire 60")
    assert unit_setting("relaymilter-expire-daily.service", "ExecStart")[0].endswith(" expire")


def test_expire_unit_command_expires_the_packaged_map(installed):
    """The strict expire unit's ExecStart, run as its User=, on the map the configuration names."""
    now = int(time.time())
    db = "/var/lib/relaymilter/relayers.db"
    run(["/usr/bin/vsmtprelay", "add", "192.0.2.1", str(now - 2 * 3600)])     # older than 60 minutes
    run(["/usr/bin/vsmtprelay", "add", "192.0.2.2", str(now - 10 * 60)])      # recent
    run(["/usr/bin/vsmtprelay", "add", "192.0.2.3", str(now + 3600)])         # future-dated
    assert os.stat(db).st_uid == pwd.getpwnam("relaymilter").pw_uid      # root's writes kept the owner
    user, = unit_setting("relaymilter-expire.service", "User")
    command = unit_setting("relaymilter-expire.service", "ExecStart")[0].split()
    umask = int(unit_setting("relaymilter-expire.service", "UMask")[0], 8)
    run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--inh-caps=-all",
         "sh", "-c", 'umask %04o && exec "$@"' % umask, "sh", *command])
    left = run(["/usr/bin/vsmtprelay", "dump"]).stdout
    assert "192.0.2.1 " not in left and "192.0.2.2 " in left and "192.0.2.3 " in left
    run(["/usr/bin/vsmtprelay", "delete", "192.0.2.2", "192.0.2.3"])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def ask(socket_spec: str, client: str, rcpt: str, as_user: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["/usr/bin/relaymilter-test", "--socket", socket_spec, "--client", client, "--from", "someone@example.net",
           "--rcpt", rcpt, "--timeout", "10"]
    if as_user:
        cmd = ["setpriv", "--reuid", as_user, "--regid", "nogroup", "--clear-groups"] + cmd
    return run(cmd, check=False, timeout=60)


def test_installed_milter_runs_as_its_user_on_a_unix_socket(installed, shared_dir):
    """The relaymilter.service recipe without systemd: User=, UMask=, RuntimeDirectory mode, SIGHUP, SIGTERM."""
    user, = unit_setting("relaymilter.service", "User")
    umask = int(unit_setting("relaymilter.service", "UMask")[0], 8)
    rundir_mode = int(unit_setting("relaymilter.service", "RuntimeDirectoryMode")[0], 8)
    pw = pwd.getpwnam(user)
    rundir = shared_dir / "run"
    rundir.mkdir(mode=rundir_mode)
    os.chown(rundir, pw.pw_uid, pw.pw_gid)
    rundir.chmod(rundir_mode)
    sock = rundir / "relaymilter.sock"
    spec = "unix:%s" % sock
    db = shared_dir / "relayers.db"
    run(["/usr/bin/vsmtprelay", "-f", str(db), "add", "198.51.100.4"])
    config = shared_dir / "relaymilter.yaml"
    body = ("socket: %s\nlog: stderr\nlocal_domains: [example.com]\nrelay_domains: []\n"
            "relayers: {path: %s}\nspammers: {source: %s/spammers, path: %s/spammers.db}\n"
            % (spec, db, shared_dir, shared_dir))
    config.write_text(body)
    config.chmod(0o644)
    log = (shared_dir / "milter.log").open("w")
    exec_start = unit_setting("relaymilter.service", "ExecStart")[0].split()
    assert exec_start == ["/usr/bin/relaymilter", "-c", SYSTEM_CONFIG]
    proc = subprocess.Popen(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--inh-caps=-all",
                             "sh", "-c", 'umask %04o && exec "$@"' % umask, "sh",
                             exec_start[0], "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV)
    try:
        wait_for(lambda: ask(spec, "192.0.2.7", "a@example.com").returncode == 0, 20, "the milter to answer")
        mode = os.stat(sock)
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o777 & ~umask
        assert (mode.st_uid, mode.st_gid) == (pw.pw_uid, pw.pw_gid)

        refused = ask(spec, "192.0.2.7", "bob@remote.example")
        assert "RCPT <bob@remote.example>: 550 5.7.1 Relaying denied" in refused.stdout, refused.stdout
        granted = ask(spec, "198.51.100.4", "bob@remote.example")
        assert "RCPT <bob@remote.example>: continue" in granted.stdout, granted.stdout
        # Other users (not root, not in the group) cannot reach the socket at all.
        outsider = ask(spec, "198.51.100.4", "bob@remote.example", as_user="nobody")
        assert outsider.returncode == 1 and "Permission denied" in outsider.stderr, outsider.stderr

        # SIGHUP to the supervisor: the new rules apply to new connections.
        config.write_text(body.replace("relay_domains: []", "relay_domains: [remote.example]"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "RCPT <bob@remote.example>: continue" in ask(spec, "192.0.2.7", "bob@remote.example").stdout,
                 20, "the reload")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    text = (shared_dir / "milter.log").read_text()
    assert "rule=default_reject" in text and "rule=relayers_db" in text and "reloaded" in text, text


def test_installed_man_pages(installed):
    for page, section in (("relaymilter", "8"), ("vsmtprelay", "8"), ("relaymilter.yaml", "5"),
                          ("relaymilter-test", "1")):
        where = run(["man", "-w", section, page]).stdout.strip()
        assert where == "/usr/share/man/man%s/%s.%s.gz" % (section, page, section)
        text = run(["man", section, page], env={**CLEAN_ENV, "MANPAGER": "cat", "MANWIDTH": "80"}).stdout
        assert "SYNOPSIS" in text


def test_purge_leaves_nothing_behind(installed):
    files = run(["dpkg-query", "-L", "relaymilter"]).stdout.split()
    owned = [f for f in files if "relaymilter" in f]
    proc = dpkg("-P", "relaymilter")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not package_installed()
    left = [f for f in owned if os.path.lexists(f)]
    assert not left, left
    for path in ("/usr/lib/relaymilter", "/var/lib/relaymilter", "/etc/relaymilter", "/usr/share/relaymilter",
                 "/etc/cron.d/relaymilter"):
        assert not os.path.lexists(path), path
    leftovers = [str(p) for p in Path("/etc/systemd/system").rglob("relaymilter*")]
    assert not leftovers, leftovers
    assert shutil.which("vsmtprelay", path="/usr/bin") is None


# --- Postfix's own tools on the shipped snippet ---------------------------------------------

@pytest.fixture(scope="module")
def postfix_tools(tmp_path_factory) -> Path:
    """postconf and postmap from Debian's postfix package, unpacked (never installed)."""
    base = tmp_path_factory.mktemp("postfix")
    proc = run(["apt-get", "download", "postfix"], check=False, timeout=300, cwd=base)
    debs = list(base.glob("postfix_*.deb"))
    if proc.returncode != 0 or not debs:
        pytest.skip("cannot download Debian's postfix package: %s" % proc.stderr.strip()[-200:])
    run(["dpkg-deb", "-x", str(debs[0]), str(base / "root")])
    conf = base / "conf"
    conf.mkdir()
    (conf / "master.cf").write_text((base / "root/usr/share/postfix/master.cf.dist").read_text())
    (conf / "main.cf.base").write_text(
        "mail_owner = mail\nsetgid_group = daemon\ncompatibility_level = 3.6\n"
        "shlib_directory = {r}/usr/lib/postfix\ndaemon_directory = {r}/usr/lib/postfix/sbin\n"
        "meta_directory = {r}/etc/postfix\n".format(r=base / "root"))
    return base


def postfix(base: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**CLEAN_ENV, "LD_LIBRARY_PATH": str(base / "root/usr/lib/postfix")}
    return run([str(base / "root/usr/sbin" / tool), "-c", str(base / "conf"), *args], env=env, check=False)


def test_postfix_accepts_every_line_of_the_snippet(postfix_tools):
    conf = postfix_tools / "conf"
    snippet = (ROOT / "packaging" / "postfix" / "main.cf.snippet").read_text()
    (conf / "main.cf").write_text((conf / "main.cf.base").read_text() + snippet)
    proc = postfix(postfix_tools, "postconf", "-n")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    settings = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in proc.stdout.splitlines())}
    assert settings["smtpd_milters"].startswith("{ inet:127.0.0.1:8894, default_action=tempfail")
    assert settings["milter_default_action"] == "tempfail" and settings["non_smtpd_milters"] == ""
    assert "{auth_authen}" in settings["milter_mail_macros"].split()
    assert settings["smtpd_relay_restrictions"] == "permit"
    # The commented variant (B) is valid too once uncommented.
    variant_b = re.search(r"^#(smtpd_relay_restrictions = permit_mynetworks.*?)\n(?!#    )", snippet, re.M | re.S)
    text = re.sub(r"^#", "", variant_b.group(1), flags=re.M)
    (conf / "main.cf").write_text((conf / "main.cf.base").read_text() + text + "\n")
    proc = postfix(postfix_tools, "postconf", "-h", "smtpd_relay_restrictions")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert "check_client_access hash:/var/lib/relaymilter/relayers" in proc.stdout
    # A misspelt parameter would have been reported: the check above can fail.
    (conf / "main.cf").write_text((conf / "main.cf.base").read_text() + "smtpd_miltrs = inet:127.0.0.1:8894\n")
    assert "unused parameter" in postfix(postfix_tools, "postconf", "-n").stderr


def test_postfix_reads_a_map_vsmtprelay_wrote(postfix_tools, tmp_path):
    (postfix_tools / "conf" / "main.cf").write_text((postfix_tools / "conf" / "main.cf.base").read_text())
    db = tmp_path / "relayers.db"
    vsmtprelay = [sys.executable, "-m", "relaymilter.cli.vsmtprelay", "-f", str(db)]
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT / "milter")}
    run(vsmtprelay + ["add", "10.11.12.13", "906502527"], env=env)
    run(vsmtprelay + ["add", "::ffff:192.0.2.9", "906502600"], env=env)
    run(vsmtprelay + ["add", "2001:db8::1", "906502700"], env=env)
    for key, value in (("10.11.12.13", "906502527"), ("192.0.2.9", "906502600"), ("2001:db8::1", "906502700")):
        proc = postfix(postfix_tools, "postmap", "-q", key, "hash:%s" % db.with_suffix(""))
        assert proc.returncode == 0 and proc.stdout.strip() == value, (key, proc.stdout, proc.stderr)
    # The all-numeric value is what check_client_access treats as OK; an absent client is not found.
    assert postfix(postfix_tools, "postmap", "-q", "192.0.2.10", "hash:%s" % db.with_suffix("")).returncode == 1
