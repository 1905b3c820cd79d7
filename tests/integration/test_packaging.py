"""The Debian package, end to end: dpkg-buildpackage, lintian, install, upgrade, run, verify the units, remove, purge.

packaging/scripts/build-deb.sh builds the package twice with dpkg-buildpackage
(the tree as it is, and the same tree as an older version for the upgrade);
lintian must pass the result with no error, warning, info or pedantic tag left
(overrides carry their reason). The older build is installed with dpkg -i, an
administrator's changes are made (configuration edited, relayers.db and
spammers.db filled, as the package's user), and the current build is
installed over it: the changes must survive. Then the installed commands run
from /usr/bin with Debian's python3 and modules, nothing of the checkout on
their path; the installed milter runs as the package's user with the unit's
umask on a unix socket, answers relay questions, reloads on SIGHUP and stops
on SIGTERM; the expire unit's own command expires the packaged map;
systemd-analyze verifies every installed unit (it needs the binaries and man
pages the units name, which is why this runs on the installed package). The
last test removes the package (configuration and maps stay) and purges it
(nothing stays but the system user, as Debian does). The shipped Postfix
snippet is checked by Postfix's own postconf, from the Debian postfix package
unpacked in a temporary folder (postfix conflicts with sendmail-bin, so it is
never installed).

Needs root, dpkg-dev, lintian and the Build-Depends of packaging/debian/control
(packaging/scripts/deps.sh --test); a machine that already has a relaymilter
package installed is left alone (the module is skipped).
"""

from __future__ import annotations

import calendar
import fcntl
import grp
import hashlib
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
from typing import Iterator, NamedTuple

import pytest

from relaymilter import __version__

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted(p.name for p in (ROOT / "packaging" / "systemd").iterdir() if p.suffix in (".service", ".timer"))
SYSTEM_CONFIG = "/etc/relaymilter/relaymilter.yaml"
STATE = Path("/var/lib/relaymilter")
SITE = "/usr/lib/python3/dist-packages"
COMMANDS = ("relaymilter", "vsmtprelay", "vnewspammers", "relaymilter-popwatch", "relaymilter-test",
            "relaymilter-mirror", "relaymilter-guard")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
PREVIOUS = __version__ + "-0"
CURRENT = __version__ + "-1"
LOCK = "/run/lock/relaymilter-package-test.lock"


def run(cmd: list[str], timeout: float = 120, check: bool = True, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or CLEAN_ENV, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s" % (cmd, proc.returncode, proc.stdout, proc.stderr))
    return proc


def package_status() -> str:
    """dpkg's status of relaymilter ("install ok installed", "deinstall ok config-files", ...) or ""."""
    proc = run(["dpkg-query", "-W", "-f=${Status}", "relaymilter"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def package_installed() -> bool:
    return package_status() == "install ok installed"


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


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Builds(NamedTuple):
    previous: Path
    current: Path
    changes: Path


def build(out: Path, version: str | None) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if version:
        env["DEB_VERSION"] = version
    started = time.monotonic()
    proc = run(["bash", str(ROOT / "packaging" / "scripts" / "build-deb.sh"), str(out)], timeout=900, env=env)
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out, proc.stdout
    print("build-deb.sh (%s) took %.1f s" % (version or "as is", time.monotonic() - started))
    return path


@pytest.fixture(scope="module")
def package_lock() -> Iterator[None]:
    """One installed-package test at a time on this machine (several checkouts may run the suite at once)."""
    with open(LOCK, "a") as fh:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("%s: another installed-package test held it for 15 minutes" % LOCK)
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def debs(tmp_path_factory, package_lock) -> Builds:
    if os.geteuid() != 0:
        pytest.skip("installing a .deb needs root")
    for tool in ("dpkg", "dpkg-deb", "dpkg-buildpackage", "lintian", "systemd-analyze", "setpriv", "runuser"):
        if shutil.which(tool, path=CLEAN_ENV["PATH"]) is None:
            pytest.fail("%s is missing: run packaging/scripts/deps.sh --test" % tool)
    if package_status():
        pytest.skip("a relaymilter package is installed on this machine; not touching it")
    previous = build(tmp_path_factory.mktemp("deb-previous"), PREVIOUS)
    current = build(tmp_path_factory.mktemp("deb"), None)
    assert previous.name == "relaymilter_%s_all.deb" % PREVIOUS
    assert current.name == "relaymilter_%s_all.deb" % CURRENT
    changes, = current.parent.glob("relaymilter_%s_*.changes" % CURRENT)
    return Builds(previous, current, changes)


WANTS = {"relaymilter.service": "multi-user", "relaymilter-popwatch.service": "multi-user",
         "relaymilter-expire.timer": "timers", "relaymilter-expire-daily.timer": "timers"}


def enabled() -> dict[str, bool]:
    """Which of the installable units are enabled (their [Install] symlink exists)."""
    return {unit: os.path.lexists("/etc/systemd/system/%s.target.wants/%s" % (target, unit))
            for unit, target in WANTS.items()}


class Upgrade(NamedTuple):
    fresh: dict             # enabled() right after the first install
    config: str             # the administrator's edited configuration
    relayers: str           # vsmtprelay dump before the upgrade
    spammers_db: str        # digest of spammers.db before the upgrade


@pytest.fixture(scope="module")
def installed(debs) -> Iterator[Upgrade]:
    """The previous build installed and used, then the current build installed over it."""
    missing = [d.strip().split()[0] for d in run(["dpkg-deb", "-f", str(debs.current), "Depends"]).stdout.split(",")]
    missing = [d for d in missing if ":" not in d and run(["dpkg-query", "-W", "-f=${Status}", d],
                                                          check=False).stdout != "install ok installed"]
    assert not missing, "not installed: %s (packaging/scripts/deps.sh --test installs them)" % " ".join(missing)
    try:
        proc = dpkg("-i", str(debs.previous))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert run(["dpkg-query", "-W", "-f=${Version}", "relaymilter"]).stdout == PREVIOUS
        fresh = enabled()
        # An administrator's changes: a local domain, a login, a spammers list built as the package's user,
        # the milter disabled for now and the strict expiry timer enabled.
        config = Path(SYSTEM_CONFIG).read_text()
        assert config.count("\nlocal_domains: []") == 1, "the packaged configuration changed: adapt this test"
        edited = config.replace("\nlocal_domains: []", "\nlocal_domains: [upgrade.example]")
        Path(SYSTEM_CONFIG).write_text(edited)
        run(["/usr/bin/vsmtprelay", "add", "203.0.113.8", "906502527"])
        Path("/etc/relaymilter/spammers").write_text("spammer@upgrade.example\n")
        run(["runuser", "-u", "relaymilter", "--", "/usr/bin/vnewspammers"])
        run(["systemctl", "disable", "relaymilter.service"])
        run(["systemctl", "enable", "relaymilter-expire.timer"])
        before = Upgrade(fresh, edited, run(["/usr/bin/vsmtprelay", "dump"]).stdout, digest(STATE / "spammers.db"))
        proc = dpkg("-i", str(debs.current))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield before
    finally:
        if package_status():
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

def test_package_metadata(debs):
    deb = debs.current
    fields = {name: run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()
              for name in ("Package", "Version", "Depends", "Architecture")}
    assert fields["Package"] == "relaymilter" and fields["Version"] == CURRENT
    # Pure Python: the compiled parts are Debian's own modules, so Debian's security updates reach them.
    assert fields["Architecture"] == "all"
    depends = {d.strip().split(" ")[0] for d in fields["Depends"].split(",")}
    assert {"python3-milter", "python3-bsddb3", "python3-yaml", "python3-redis", "adduser", "python3:any"} <= depends
    conffiles = sorted(run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split())
    assert conffiles == sorted([SYSTEM_CONFIG, "/etc/relaymilter/spammers", "/etc/cron.d/relaymilter"])
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ["./usr/bin/%s" % c for c in COMMANDS] + \
                ["./lib/systemd/system/%s" % u for u in UNITS] + \
                ["./etc/relaymilter/relaymilter.yaml", "./etc/cron.d/relaymilter",
                 "./usr/share/man/man8/relaymilter.8.gz", "./usr/share/man/man5/relaymilter.yaml.5.gz",
                 "./usr/share/relaymilter/sendmail/relaymilter.m4", "./usr/share/relaymilter/postfix/main.cf.snippet",
                 "./usr/share/relaymilter/postfix/main.cf.snippet-b",
                 "./usr/share/doc/relaymilter/copyright", "./usr/share/doc/relaymilter/changelog.Debian.gz",
                 ".%s/relaymilter/store/bdb.py" % SITE]:
        assert re.search(r" %s( |$)" % re.escape(path), listing, re.M), path
    assert "/tmp/" not in listing and "pyenv" not in listing and "__pycache__" not in listing
    assert ".so" not in listing and "/usr/lib/relaymilter" not in listing     # no private virtualenv
    print("package size: %d bytes" % deb.stat().st_size)


def test_lintian_passes_the_build(debs):
    """lintian on the .changes (the .deb and its .buildinfo): every tag at every level is fixed or overridden."""
    proc = run(["lintian", "--info", "--pedantic", "--fail-on", "error,warning,info,pedantic", str(debs.changes)],
               timeout=600, check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr
    # Each override says why, on the line before it.
    overrides = (ROOT / "packaging" / "debian" / "relaymilter.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line and not line.startswith("#"):
            assert i > 0 and overrides[i - 1].startswith("# "), line


# --- installed ----------------------------------------------------------------------

def test_upgrade_keeps_configuration_and_maps(installed):
    assert run(["dpkg-query", "-W", "-f=${Version}", "relaymilter"]).stdout == CURRENT
    assert Path(SYSTEM_CONFIG).read_text() == installed.config
    assert not list(Path("/etc/relaymilter").glob("*.dpkg-*")), "dpkg saw a conffile conflict"
    assert run(["/usr/bin/vsmtprelay", "dump"]).stdout == installed.relayers
    assert "203.0.113.8 906502527" in installed.relayers
    assert digest(STATE / "spammers.db") == installed.spammers_db
    assert Path("/etc/relaymilter/spammers").read_text() == "spammer@upgrade.example\n"
    owner = pwd.getpwnam("relaymilter").pw_uid
    assert os.stat(STATE / "relayers.db").st_uid == owner and os.stat(STATE / "spammers.db").st_uid == owner
    # The administrator's choice of units stands: the upgrade neither re-enabled the milter nor dropped the timer.
    assert enabled() == {**installed.fresh, "relaymilter.service": False, "relaymilter-expire.timer": True}
    run(["/usr/bin/vsmtprelay", "delete", "203.0.113.8"])


def test_installed_commands_run_from_the_package(installed, shared_dir):
    for cmd in COMMANDS:
        first = Path("/usr/bin", cmd).read_text().splitlines()[0]
        assert first == "#! /usr/bin/python3" or first == "#!/usr/bin/python3", first
        proc = run(["/usr/bin/" + cmd, "--version"])
        assert __version__ in proc.stdout + proc.stderr
    # Debian's interpreter and Debian's modules: bsddb3 for Berkeley DB (the berkeleydb API under its old name).
    where = run(["/usr/bin/python3", "-c", "import relaymilter, milter, yaml, redis; from relaymilter.store import bdb;"
                 "print(relaymilter.__file__, milter.__file__, yaml.__file__, redis.__file__, bdb.db.__file__)"],
                cwd="/").stdout.split()
    assert where[0] == SITE + "/relaymilter/__init__.py", where
    assert all(w.startswith(SITE + "/") for w in where) and "/bsddb3/" in where[-1], where
    for path in where:
        assert run(["dpkg", "-S", path]).returncode == 0

    check = run(["/usr/bin/relaymilter", "--check-config"])
    assert SYSTEM_CONFIG in check.stdout and "relayers /var/lib/relaymilter/relayers.db" in check.stdout

    db = shared_dir / "relayers.db"
    run(["/usr/bin/vsmtprelay", "-f", str(db), "add", "10.11.12.13", "906502527"])
    run(["/usr/bin/vsmtprelay", "-f", str(db), "add", "2001:DB8::7", "906502600"])
    dump = run(["/usr/bin/vsmtprelay", "-f", str(db), "dump"]).stdout
    assert dump == ("# timestamp (UTC): Tue Sep 22 22:15:27 1998\n10.11.12.13 906502527\n"
                    "# timestamp (UTC): Tue Sep 22 22:16:40 1998\n2001:db8::7 906502600\n")
    # Without -f the packaged configuration's map is used: the one postinst created.
    run(["/usr/bin/vsmtprelay", "add", "198.51.100.77", "906502527"])
    assert "198.51.100.77 906502527" in run(["/usr/bin/vsmtprelay", "-f", str(STATE / "relayers.db"), "dump"]).stdout
    run(["/usr/bin/vsmtprelay", "delete", "198.51.100.77"])


def test_installed_redis_store_works_with_debians_redis_module(installed, shared_dir):
    """The mail-farm parts on a real redis-server through Debian's python3-redis (4.3 in Debian 12, not pip's):
    vsmtprelay on a TCP and a unix:// URL, relaymilter-mirror, and the milter's own lookups, run as its user."""
    from redisproc import RedisServer

    redis_sock = shared_dir / "redis.sock"
    server = RedisServer(shared_dir / "redis", extra=["--unixsocket", str(redis_sock),
                                                      "--unixsocketperm", "777"]).start()
    milter = None
    try:
        url = server.url()
        run(["/usr/bin/vsmtprelay", "-f", url, "add", "192.0.2.44", "906502527"])
        assert run(["/usr/bin/vsmtprelay", "-f", url, "dump"]).stdout == \
            "# timestamp (UTC): Tue Sep 22 22:15:27 1998\n192.0.2.44 906502527\n"
        assert "192.0.2.44 906502527" in run(["/usr/bin/vsmtprelay", "-f", "unix://%s?db=0" % redis_sock,
                                              "dump"]).stdout
        mirror = shared_dir / "mirror.db"
        run(["/usr/bin/relaymilter-mirror", "--from", url, "--to", str(mirror), "--once"])
        assert "192.0.2.44 906502527" in run(["/usr/bin/vsmtprelay", "-f", str(mirror), "dump"]).stdout

        rundir = shared_dir / "redis-run"
        rundir.mkdir()
        pw = pwd.getpwnam("relaymilter")
        os.chown(rundir, pw.pw_uid, pw.pw_gid)
        spec = "unix:%s/milter.sock" % rundir
        config = shared_dir / "redis-milter.yaml"
        config.write_text("socket: %s\nlog: stderr\nlocal_domains: [example.com]\nadd_host_names: false\n"
                          "relayers: {url: '%s'}\nspammers: {source: %s/spammers, path: %s/spammers.db}\n"
                          % (spec, url, shared_dir, shared_dir))
        config.chmod(0o644)
        log = (shared_dir / "redis-milter.log").open("w")
        milter = subprocess.Popen(["setpriv", "--reuid", "relaymilter", "--regid", "relaymilter", "--init-groups",
                                   "--inh-caps=-all", "/usr/bin/relaymilter", "-c", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV)
        wait_for(lambda: ask(spec, "192.0.2.7", "a@example.com").returncode == 0, 20, "the milter to answer")
        for _ in range(2):      # the second lookup reuses the milter's idle Redis connection
            granted = ask(spec, "192.0.2.44", "bob@remote.example")
            assert "RCPT <bob@remote.example>: continue" in granted.stdout, granted.stdout + granted.stderr
            refused = ask(spec, "192.0.2.45", "bob@remote.example")
            assert "RCPT <bob@remote.example>: 550 5.7.1 Relaying denied" in refused.stdout, refused.stdout
        milter.send_signal(signal.SIGTERM)
        assert milter.wait(timeout=30) == 0
        log.close()
        assert "rule=relayers_db" in (shared_dir / "redis-milter.log").read_text()
    finally:
        if milter is not None and milter.poll() is None:
            milter.kill()
            milter.wait(timeout=10)
        server.stop()


def test_installed_commands_name_the_debian_package_of_a_missing_module(installed):
    hider = ROOT / "tests" / "data" / "hide_modules"
    env = {**CLEAN_ENV, "PYTHONPATH": str(hider), "RELAYMILTER_HIDE_MODULES": "redis"}
    proc = run(["/usr/bin/vsmtprelay", "-f", "redis://127.0.0.1:6379/0", "dump"], env=env, check=False)
    assert proc.returncode == 2 and proc.stderr == (
        "vsmtprelay: error: Redis stores (redis:// URLs) and relaymilter-mirror need the package python3-redis, "
        "which is not installed: apt-get install python3-redis\n"), proc.stderr
    # The file store does not need it.
    assert run(["/usr/bin/vsmtprelay", "dump"], env=env).returncode == 0


def test_postinst_made_the_user_state_and_enablement(installed):
    user = pwd.getpwnam("relaymilter")
    assert user.pw_dir == "/var/lib/relaymilter" and user.pw_uid < 1000
    assert grp.getgrgid(user.pw_gid).gr_name == "relaymilter"
    state = os.stat("/var/lib/relaymilter")
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (user.pw_uid, 0o755)
    db = os.stat("/var/lib/relaymilter/relayers.db")
    assert (db.st_uid, stat.S_IMODE(db.st_mode)) == (user.pw_uid, 0o644)
    # A first install enables relaymilter.service (Debian starts daemons); popwatch and the timers are a choice.
    assert installed.fresh == {"relaymilter.service": True, "relaymilter-popwatch.service": False,
                               "relaymilter-expire.timer": False, "relaymilter-expire-daily.timer": False}
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
        assert "SYNOPSIS" in text and "relaymilter %s" % __version__ in text


def test_remove_keeps_configuration_and_maps_then_purge_leaves_nothing(installed):
    files = run(["dpkg-query", "-L", "relaymilter"]).stdout.split()
    owned = [f for f in files if "relaymilter" in f and not f.startswith("/etc/")]
    conffiles = [line.split()[0] for line in run(["dpkg-query", "-W", "-f=${Conffiles}", "relaymilter"]).stdout
                 .splitlines() if line.strip()]
    maps = {p: digest(p) for p in (STATE / "relayers.db", STATE / "spammers.db")}

    proc = dpkg("-r", "relaymilter")          # remove: the programs go, configuration and data stay
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert package_status() == "deinstall ok config-files"
    left = [f for f in owned if os.path.lexists(f) and not os.path.isdir(f)]
    assert not left, left
    assert not os.path.lexists(SITE + "/relaymilter") and shutil.which("vsmtprelay", path="/usr/bin") is None
    assert all(Path(c).is_file() for c in conffiles), conffiles
    assert Path(SYSTEM_CONFIG).read_text() == installed.config
    assert {p: digest(p) for p in maps} == maps

    proc = dpkg("-P", "relaymilter")          # purge: configuration and data go too
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert package_status() in ("", "unknown ok not-installed")
    for path in ("/var/lib/relaymilter", "/etc/relaymilter", "/usr/share/relaymilter", "/etc/cron.d/relaymilter",
                 SITE + "/relaymilter"):
        assert not os.path.lexists(path), path
    leftovers = [str(p) for p in Path("/etc/systemd/system").rglob("relaymilter*")]
    leftovers += [str(p) for p in Path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("relaymilter*")]
    assert not leftovers, leftovers
    # The system user stays (Debian's custom: its id is never handed to another account).
    assert pwd.getpwnam("relaymilter").pw_dir == "/var/lib/relaymilter"


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


@pytest.mark.parametrize("name", ["main.cf.snippet", "main.cf.snippet-b"])
def test_postfix_accepts_every_line_of_the_snippet(postfix_tools, name):
    conf = postfix_tools / "conf"
    snippet = (ROOT / "packaging" / "postfix" / name).read_text()
    (conf / "main.cf").write_text((conf / "main.cf.base").read_text() + snippet)
    proc = postfix(postfix_tools, "postconf", "-n")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    settings = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in proc.stdout.splitlines())}
    assert settings["smtpd_milters"].startswith("{ inet:127.0.0.1:8894, default_action=tempfail")
    assert settings["milter_default_action"] == "tempfail" and settings["non_smtpd_milters"] == ""
    assert "{auth_authen}" in settings["milter_mail_macros"].split()
    # Never a bare `permit`: smtpd refuses to start without a working relay refusal in the list
    # (the live-Postfix tests in test_postfix.py run both snippets).
    restrictions = settings["smtpd_relay_restrictions"].replace(",", " ").split()
    assert restrictions[-1] in ("reject_unauth_destination", "defer_unauth_destination"), restrictions
    if name.endswith("-b"):
        assert restrictions.index("permit_auth_destination") < restrictions.index("check_client_access")
        assert "hash:/var/lib/relaymilter/relayers" in restrictions
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
