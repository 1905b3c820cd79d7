"""NAME
    relaymilter.yamlcheck - strict YAML reading with FILE:LINE errors

DESCRIPTION
    Configuration, log patterns and test scenarios are YAML that people edit
    by hand. A typo must stop the program with the file and line of the
    mistake, not be ignored. This module composes the YAML node tree (which
    keeps line marks) and offers small typed accessors that raise ConfigError
    with ``FILE:LINE: message``.

DIAGNOSTICS
    ConfigError for unreadable files, YAML syntax errors, unknown keys,
    duplicate keys and values of the wrong type.
"""

from __future__ import annotations

import builtins
from typing import Any, Callable, Iterable, Optional, overload

import yaml

from relaymilter.errors import ConfigError

Node = yaml.Node
NodeType = Any     # yaml.Node: PyYAML ships no type information


def where(source: str, node: Optional[NodeType]) -> str:
    if node is None:
        return source
    return "%s:%d" % (source, node.start_mark.line + 1)


def compose_file(path: str) -> Optional[NodeType]:
    """The YAML node tree of *path*; ConfigError naming file and line on any problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    return compose_text(data, path)


MAX_DEPTH = 64      # nesting levels a hand-written file never needs; PyYAML recurses per level


def _line_of(text: bytes | str, pos: int) -> int:
    if isinstance(text, bytes):
        return text.count(b"\n", 0, pos) + 1
    return text.count("\n", 0, pos) + 1


def _check_text(data: bytes | str, source: str) -> str:
    """*data* as text; ConfigError FILE:LINE for a NUL byte or bytes that are not UTF-8."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("%s:%d: not UTF-8 text (byte 0x%02x)"
                              % (source, _line_of(data, exc.start), data[exc.start])) from None
    else:
        text = data
    nul = text.find("\0")
    if nul >= 0:
        raise ConfigError("%s:%d: NUL character in the file" % (source, _line_of(text, nul)))
    return text


def _check_depth(text: str, source: str) -> None:
    """ConfigError FILE:LINE where collections nest deeper than MAX_DEPTH (before PyYAML recurses)."""
    opens = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
             yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closes = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, opens):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError("%s:%d: nested more than %d levels deep"
                                      % (source, token.start_mark.line + 1, MAX_DEPTH))
            elif isinstance(token, closes):
                depth -= 1
    except yaml.YAMLError:
        pass        # compose() reports it, with its line


def compose_text(data: bytes | str, source: str) -> Optional[NodeType]:
    """The node tree of *data*; every problem a one-line ConfigError naming SOURCE:LINE."""
    text = _check_text(data, source)
    _check_depth(text, source)
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError("%s:%d: YAML syntax error: %s" % (source, line, exc.problem or exc)) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError("%s:%d: character %r not allowed in YAML"
                          % (source, _line_of(text, exc.position), chr(exc.character))) from None
    except yaml.YAMLError as exc:
        raise ConfigError("%s: YAML error: %s" % (source, str(exc).replace("\n", " "))) from None
    except RecursionError:
        raise ConfigError("%s: nested too deeply" % source) from None


class Mapping:
    """A YAML mapping node whose keys are checked against what the schema allows."""

    def __init__(self, source: str, node: Optional[NodeType], what: str = "section") -> None:
        self.source = source
        self.node = node
        self.items: dict[str, tuple[NodeType, NodeType]] = {}
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError("%s: %s must be a mapping of key: value" % (where(source, node), what))
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError("%s: keys must be plain words" % where(source, knode))
            if knode.value in self.items:
                raise ConfigError("%s: duplicate key %r" % (where(source, knode), knode.value))
            self.items[knode.value] = (knode, vnode)

    def check_keys(self, allowed: Iterable[str], what: str = "key") -> None:
        allowed = set(allowed)
        for key, (knode, _) in self.items.items():
            if key not in allowed:
                raise ConfigError(
                    "%s: unknown %s %r (known: %s)" % (where(self.source, knode), what, key, ", ".join(sorted(allowed)))
                )

    def node_of(self, key: str) -> Optional[NodeType]:
        pair = self.items.get(key)
        return pair[1] if pair else None

    def has(self, key: str) -> bool:
        return key in self.items

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError("%s: %s: %s" % (where(self.source, self.node_of(key) or self.node), key, message))

    def value(self, key: str, default: Any = None) -> Any:
        """The plain Python value of *key* (constructed safely), or *default*."""
        node = self.node_of(key)
        if node is None:
            return default
        return construct(self.source, node)

    @overload
    def str(self, key: builtins.str, default: builtins.str, nullable: bool = False) -> builtins.str: ...

    @overload
    def str(self, key: builtins.str, default: None = None, nullable: bool = False) -> Optional[builtins.str]: ...

    def str(self, key: builtins.str, default: Optional[builtins.str] = None,
            nullable: bool = False) -> Optional[builtins.str]:
        v = self.value(key, default)
        if v is None and (nullable or default is None):
            return None
        if not isinstance(v, str) or not v:
            raise self.err(key, "must be a non-empty string")
        return v

    def required_str(self, key: builtins.str) -> builtins.str:
        """A non-empty string that must be there."""
        v = self.str(key)
        if v is None:
            raise self.err(key, "is required")
        return v

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        v = self.value(key, default)
        if not isinstance(v, bool):
            raise self.err(key, "must be true or false")
        return v

    @overload
    def int(self, key: builtins.str, default: builtins.int, minimum: builtins.int = 0,
            nullable: builtins.bool = False) -> builtins.int: ...

    @overload
    def int(self, key: builtins.str, default: None, minimum: builtins.int = 0,
            nullable: builtins.bool = False) -> Optional[builtins.int]: ...

    def int(self, key: builtins.str, default: Optional[builtins.int], minimum: builtins.int = 0,
            nullable: builtins.bool = False) -> Optional[builtins.int]:
        v = self.value(key, default)
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.err(key, "must be a whole number >= %d%s" % (minimum, " or null" if nullable else ""))
        return v

    def str_list(self, key: builtins.str, default: Iterable[builtins.str] = (),
                 check: Optional[Callable[[builtins.str], Any]] = None) -> list[Any]:
        """A list of strings (a single string is accepted as a one-item list)."""
        node = self.node_of(key)
        if node is None:
            return list(default)
        if isinstance(node, yaml.ScalarNode):
            v = construct(self.source, node)
            if v is None:
                return []
            nodes = [node]
        elif isinstance(node, yaml.SequenceNode):
            nodes = node.value
        else:
            raise self.err(key, "must be a list")
        out = []
        for item in nodes:
            v = construct(self.source, item)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError("%s: %s: each item must be a non-empty string" % (where(self.source, item), key))
            if check is not None:
                try:
                    v = check(v.strip())
                except ValueError as exc:
                    raise ConfigError("%s: %s: %s" % (where(self.source, item), key, exc)) from None
            out.append(v)
        return out

    def sub(self, key: builtins.str) -> "Mapping":
        return Mapping(self.source, self.node_of(key), "%r" % key)


def construct(source: str, node: NodeType) -> Any:
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError("%s: %s" % (where(source, node), exc)) from None
