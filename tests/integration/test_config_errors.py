"""Every command answers a hostile configuration with one line naming FILE:LINE.

Real files, the installed scripts: a configuration nested thousands of levels deep (flow
and block style), one with bytes that are not UTF-8, one with a NUL. Before, PyYAML's
recursion gave a ~3,000-line traceback and the encoding errors a line without a line
number (and a second line with a byte offset).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BAD = {
    "nested_flow": (b"local_domains: [example.com]\nrelay_domains: " + b"[" * 5000 + b"]" * 5000 + b"\n", 2,
                    "nested more than 64 levels deep"),
    "nested_block": (b"local_domains: [example.com]\npopwatch:\n"
                     + b"".join(b"  " * (i + 1) + b"k%d:\n" % i for i in range(3000)), 66,
                     "nested more than 64 levels deep"),
    "not_utf8": (b"local_domains: [example.com]\n\nrelay_domains: [\xff\xfe.example]\n", 3,
                 "not UTF-8 text (byte 0xff)"),
    "nul": (b"local_domains: [example.com]\nrelay_domains: [a\x00b.example]\n", 2, "NUL character in the file"),
}

# (command, argv before the file, argv after it)
COMMANDS = {
    "relaymilter": (["relaymilter", "--check-config", "-c"], []),
    "vsmtprelay": (["vsmtprelay", "-c"], ["dump"]),
    "vnewspammers": (["vnewspammers", "-c"], []),
    "relaymilter-popwatch": (["relaymilter-popwatch", "--dumpconfig", "-c"], []),
    "relaymilter-popwatch-patterns": (["relaymilter-popwatch", "--list", "--pattern-file"], []),
    "relaymilter-guard": (["relaymilter-guard", "-c"], ["list"]),
    "relaymilter-test": (["relaymilter-test"], []),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(BAD))
def test_one_line_naming_file_and_line(tmp_path: Path, command: str, kind: str) -> None:
    data, line, what = BAD[kind]
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    before, after = COMMANDS[command]
    ok = tmp_path / "ok.yaml"          # a configuration of our own, whatever /etc holds
    ok.write_text("{}\n")
    env = {**os.environ, "RELAYMILTER_CONFIG": str(ok)}
    proc = subprocess.run([*before, str(path), *after], capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=env)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode in (1, 2), (proc.returncode, err[-500:])
    assert err.count("\n") == 1, err[-2000:]
    assert "%s:%d: %s" % (path, line, what) in err, err
