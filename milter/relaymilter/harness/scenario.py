"""NAME
    relaymilter.harness.scenario - scenario files: sessions with expected answers

DESCRIPTION
    A scenario file is YAML, readable as documentation of a rule set:

        socket: inet:8894@127.0.0.1        # optional; the command line wins
        timeout: 5                         # optional, seconds per step
        sessions:
          - name: unknown client may not relay
            client: 192.0.2.10             # claimed in CONNECT only
            helo: client.example           # optional
            auth: alice                    # optional: {auth_authen}/{auth_type}
            from: <alice@example.net>
            rcpts:
              - <bob@remote.example>: 550 5.7.1 Relaying denied
              - <postmaster@example.com>: continue
              - <carol@example.com>        # sent, answer not checked
            headers: ["Subject: hello"]    # optional; headers or body run DATA
            body: "hi\\n"
            expect: {connect: continue, mail: continue, eom: continue}

    An expected answer is the exact string the harness reports (``continue``,
    ``reject``, ``550 5.7.1 Relaying denied``, ``not sent``) or a regular
    expression, searched for: ``"regex: ^550 "`` or ``{regex: "^550 "}``.
    ``expect`` keys: connect, helo, mail, data, header (every header),
    eoh, body (every chunk), eom.

DIAGNOSTICS
    ScenarioError ``FILE:LINE: message`` for YAML syntax errors, unknown
    keys, missing keys, wrong types, bad client addresses and bad regular
    expressions, using the YAML node marks so the line is the offending one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from relaymilter.harness.errors import ScenarioError
from relaymilter.harness.runner import SessionResult, SessionSpec, StepResult, run_session
from relaymilter.ipaddr import parse_ip
from relaymilter.errors import ConfigError
from relaymilter.yamlcheck import compose_text

DEFAULT_TIMEOUT = 5.0
_FILE_KEYS = {"socket", "timeout", "sessions"}
_SESSION_KEYS = {"name", "client", "client_name", "helo", "auth", "from", "rcpts", "headers", "body", "expect"}
_EXPECT_KEYS = ("connect", "helo", "mail", "data", "header", "eoh", "body", "eom")


@dataclass(frozen=True)
class Expectation:
    text: str
    is_regex: bool
    where: str

    def matches(self, answer: str) -> bool:
        if self.is_regex:
            return re.search(self.text, answer) is not None
        return answer == self.text

    def __str__(self) -> str:
        return "regex: %s" % self.text if self.is_regex else self.text


@dataclass(frozen=True)
class Scenario:
    name: str
    where: str
    spec: SessionSpec
    expect: Dict[str, Expectation]
    rcpt_expect: Tuple[Optional[Expectation], ...]

    def expectation_for(self, step: StepResult) -> Optional[Expectation]:
        if step.step == "rcpt":
            return self.rcpt_expect[step.index]
        return self.expect.get(step.step)


@dataclass(frozen=True)
class ScenarioFile:
    path: str
    socket: Optional[str]
    timeout: Optional[float]
    scenarios: Tuple[Scenario, ...]


@dataclass(frozen=True)
class Check:
    step: StepResult
    expected: Optional[Expectation]

    @property
    def ok(self) -> bool:
        return self.expected is None or self.expected.matches(self.step.answer)


@dataclass(frozen=True)
class Outcome:
    scenario: Scenario
    checks: Tuple[Check, ...]
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)


# ------------------------------------------------------------------ loading


class _Loader:
    """Turns composed YAML nodes into values, naming FILE:LINE on every error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def where(self, node: yaml.Node) -> str:
        return "%s:%d" % (self.path, node.start_mark.line + 1)

    def fail(self, node: yaml.Node, message: str) -> ScenarioError:
        return ScenarioError("%s: %s" % (self.where(node), message))

    def mapping(self, node: yaml.Node, what: str, allowed: Sequence[str]) -> Dict[str, Tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, "%s must be a mapping" % what)
        out: Dict[str, Tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, "a key in %s" % what)
            if key not in allowed:
                raise self.fail(key_node, "unknown key %r in %s (known: %s)" % (key, what, ", ".join(sorted(allowed))))
            if key in out:
                raise self.fail(key_node, "duplicate key %r in %s" % (key, what))
            out[key] = (key_node, value_node)
        return out

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.fail(node, "%s must be a string" % what)
        return str(node.value)

    def sequence(self, node: yaml.Node, what: str) -> List[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, "%s must be a list" % what)
        return list(node.value)

    def expectation(self, node: yaml.Node, what: str) -> Expectation:
        if isinstance(node, yaml.MappingNode):
            fields = self.mapping(node, what, ("regex",))
            if "regex" not in fields:
                raise self.fail(node, "%s: an answer given as a mapping is {regex: PATTERN}" % what)
            return self._regex(fields["regex"][1], what)
        text = self.string(node, what)
        if text.startswith("regex:"):
            return self._regex(node, what, text[len("regex:"):].strip())
        return Expectation(text, False, self.where(node))

    def _regex(self, node: yaml.Node, what: str, text: Optional[str] = None) -> Expectation:
        pattern = self.string(node, what) if text is None else text
        try:
            re.compile(pattern)
        except re.error as err:
            raise self.fail(node, "bad regular expression %r in %s: %s" % (pattern, what, err)) from None
        return Expectation(pattern, True, self.where(node))


def load_scenarios(path: str) -> ScenarioFile:
    """Read and validate a scenario file; ScenarioError names FILE:LINE on any problem."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as err:
        raise ScenarioError("%s: cannot read: %s" % (path, err.strerror or err)) from None
    try:
        # NUL, bad UTF-8, nesting too deep, YAML syntax: one FILE:LINE line each
        root = compose_text(data, path)
    except ConfigError as err:
        raise ScenarioError(str(err)) from None
    if root is None:
        raise ScenarioError("%s:1: empty scenario file" % path)
    ld = _Loader(path)
    top = ld.mapping(root, "the scenario file", sorted(_FILE_KEYS))
    socket = ld.string(top["socket"][1], "socket") if "socket" in top else None
    timeout = None
    if "timeout" in top:
        node = top["timeout"][1]
        try:
            timeout = float(ld.string(node, "timeout"))
        except ValueError:
            raise ld.fail(node, "timeout must be a number of seconds") from None
        if timeout <= 0:
            raise ld.fail(node, "timeout must be positive")
    if "sessions" not in top:
        raise ld.fail(root, "missing key 'sessions'")
    scenarios: List[Scenario] = []
    names: Dict[str, str] = {}
    for node in ld.sequence(top["sessions"][1], "sessions"):
        scenario = _load_session(ld, node)
        if scenario.name in names:
            raise ld.fail(node, "duplicate session name %r (first at %s)" % (scenario.name, names[scenario.name]))
        names[scenario.name] = scenario.where
        scenarios.append(scenario)
    if not scenarios:
        raise ld.fail(top["sessions"][1], "no sessions")
    return ScenarioFile(path, socket, timeout, tuple(scenarios))


def _load_session(ld: _Loader, node: yaml.Node) -> Scenario:
    fields = ld.mapping(node, "a session", sorted(_SESSION_KEYS))
    for required in ("name", "client", "from", "rcpts"):
        if required not in fields:
            raise ld.fail(node, "session is missing key %r" % required)

    def opt(key: str) -> Optional[str]:
        return ld.string(fields[key][1], key) if key in fields else None

    name = ld.string(fields["name"][1], "name")
    client_node = fields["client"][1]
    client = ld.string(client_node, "client")
    try:
        parse_ip(client)
    except ValueError as err:
        raise ld.fail(client_node, "client: %s" % err) from None
    rcpts: List[str] = []
    rcpt_expect: List[Optional[Expectation]] = []
    for item in ld.sequence(fields["rcpts"][1], "rcpts"):
        if isinstance(item, yaml.MappingNode):
            if len(item.value) != 1:
                raise ld.fail(item, "a recipient is ADDRESS or {ADDRESS: EXPECTED ANSWER}")
            key_node, value_node = item.value[0]
            rcpts.append(ld.string(key_node, "recipient"))
            rcpt_expect.append(ld.expectation(value_node, "the answer expected for %s" % key_node.value))
        else:
            rcpts.append(ld.string(item, "recipient"))
            rcpt_expect.append(None)
    if not rcpts:
        raise ld.fail(fields["rcpts"][1], "rcpts must list at least one recipient")
    headers = None
    if "headers" in fields:
        headers = []
        for item in ld.sequence(fields["headers"][1], "headers"):
            hname, colon, value = ld.string(item, "a header").partition(":")
            if not colon or not hname.strip() or " " in hname.strip():
                raise ld.fail(item, "a header is written 'Name: value'")
            headers.append((hname.strip(), value.strip()))
    spec = SessionSpec(client=client, mail_from=ld.string(fields["from"][1], "from"), rcpts=tuple(rcpts),
                       helo=opt("helo"), auth=opt("auth"), client_name=opt("client_name"),
                       headers=tuple(headers) if headers is not None else None, body=opt("body"))
    expect: Dict[str, Expectation] = {}
    if "expect" in fields:
        for key, (key_node, value_node) in ld.mapping(fields["expect"][1], "expect", _EXPECT_KEYS).items():
            if key == "helo" and spec.helo is None:
                raise ld.fail(key_node, "expect has helo but the session sends no HELO")
            if key in ("data", "header", "eoh", "body", "eom") and not spec.has_data:
                raise ld.fail(key_node, "expect has %s but the session has no headers or body" % key)
            expect[key] = ld.expectation(value_node, "expect %s" % key)
    return Scenario(name, ld.where(node), spec, expect, tuple(rcpt_expect))


# ------------------------------------------------------------------ running


def run_scenario(scenario: Scenario, socket_spec: str, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run one session and compare every step with its expectation."""
    result: SessionResult = run_session(socket_spec, scenario.spec, timeout=timeout)
    checks = tuple(Check(step, scenario.expectation_for(step)) for step in result)
    return Outcome(scenario, checks, str(result.error) if result.error else "")


def run_file(loaded: ScenarioFile, socket_spec: Optional[str] = None,
             timeout: Optional[float] = None) -> List[Outcome]:
    """Run every session of a loaded file. ``socket_spec``/``timeout`` override the file's."""
    sock = socket_spec or loaded.socket
    if not sock:
        raise ScenarioError("%s: no socket: give --socket or put 'socket:' in the file" % loaded.path)
    wait = timeout or loaded.timeout or DEFAULT_TIMEOUT
    return [run_scenario(s, sock, wait) for s in loaded.scenarios]


def format_outcome(outcome: Outcome) -> List[str]:
    """Report lines for one session: a PASS/FAIL header, then one line per step."""
    lines = ["%s %s %s" % ("PASS" if outcome.passed else "FAIL", outcome.scenario.where, outcome.scenario.name)]
    for check in outcome.checks:
        step, expected = check.step, check.expected
        if expected is None:
            lines.append("  -    %s: %s" % (step.label, step.describe()))
        elif check.ok:
            lines.append("  ok   %s: %s" % (step.label, step.describe()))
        else:
            lines.append("  FAIL %s: expected %s (%s), got %s"
                         % (step.label, expected, expected.where, step.describe()))
        if step.reply is not None:
            lines.extend("         %s" % m for m in step.reply.modifications)
    if outcome.error:
        lines.append("  ERROR %s" % outcome.error)
    # A multi-line SMTP reply keeps its lines, indented under its step.
    return [part for line in lines for part in line.replace("\n", "\n           ").split("\n")]
