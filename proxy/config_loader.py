"""Builds a :class:`proxy.config.Config` from YAML: ``${ENV}`` interpolation, types, bounds, cross-checks.

Every problem names the file, line and dotted path of the key, e.g.
``config.yaml:7: routes[0].targets[1].weight: must be a number ≥ 0``; all of them are collected and
raised together as one :class:`ConfigError`. The builder is generic: it follows the dataclasses' type
hints and the ``min`` / ``max`` / ``min_len`` field metadata of proxy/config.py, then calls each built
dataclass's ``validate()``. A ``middleware:`` entry is resolved through proxy.registry and its other
keys are built the same way into that middleware's own ``Config`` dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from proxy import registry
from proxy.config import Config, MiddlewareEntry

_STR: Final = "tag:yaml.org,2002:str"
_NULL: Final = "tag:yaml.org,2002:null"
_MERGE: Final = "tag:yaml.org,2002:merge"
# ``$${`` (an escaped, literal ``${``) or ``${body}``; group 2 is empty when the ``}`` is missing.
_REF: Final = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_REF_BODY: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
# Fields that exist on the dataclass but are set by the loader, never from YAML.
_NOT_FROM_YAML: Final = frozenset({(Config, "source")})
_NOUN: Final[Mapping[type, str]] = types.MappingProxyType(
    {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
)


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and build the config file at ``path``; ``env`` (default ``os.environ``) feeds ``${VAR}``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text (bad byte at offset {e.start})"]) from None
    return load_config_text(text, path, env)


def load_config_text(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from YAML ``text``; ``source`` names it in problems and in ``Config.source``."""
    builder = _Builder(source, os.environ if env is None else env)
    config = builder.load(text)
    if config is None or builder.problems:
        raise ConfigError(builder.report())
    return config


class _Invalid:
    """Stands for a value that could not be built; its problem is already recorded."""


_INVALID: Final = _Invalid()


def _join(path: str, rel: str) -> str:
    if not rel:
        return path
    if not path or rel.startswith("["):
        return path + rel
    return f"{path}.{rel}"


def _parent(path: str) -> str:
    return path[: max(path.rfind("."), path.rfind("["), 0)]


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


class _Builder:
    """One load: the problems found so far and the line of every path seen, for later messages."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.problems: list[tuple[int, str]] = []
        self.failures = 0  # problems that leave a value unbuilt (not validate() findings)
        self.lines: dict[str, int] = {}
        self.resolver = Resolver()
        self.constructor = SafeConstructor()

    # -- reporting ------------------------------------------------------------------------------

    def problem(self, path: str, message: str, line: int | None = None) -> None:
        if line is None:
            line = self.line_of(path)
        where = f"{self.source}:{line}: {path}: " if path else f"{self.source}:{line}: "
        self.problems.append((line, where + message))

    def fail(self, path: str, message: str, line: int | None = None) -> _Invalid:
        self.failures += 1
        self.problem(path, message, line)
        return _INVALID

    def line_of(self, path: str) -> int:
        while path and path not in self.lines:
            path = _parent(path)
        return self.lines.get(path, 1)

    def report(self) -> list[str]:
        ordered = sorted(self.problems, key=lambda p: p[0])
        return list(dict.fromkeys(text for _, text in ordered))

    # -- entry point ----------------------------------------------------------------------------

    def load(self, text: str) -> Config | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = int(mark.line) + 1 if mark is not None else 1
            hint = ""
            if e.context and e.context_mark is not None and e.context_mark.line + 1 != line:
                hint = f" ({e.context} at line {e.context_mark.line + 1})"
            if "${" in (text.splitlines()[line - 1 : line] or [""])[0]:
                hint = ' (inside {...} or [...], quote a value that uses ${VAR}: "${VAR}")'
            self.problem("", f"YAML syntax error: {e.problem or e.context}{hint}", line)
            return None
        except yaml.YAMLError as e:
            self.problem("", f"YAML syntax error: {str(e).splitlines()[0]}", 1)
            return None
        if root is None:
            self.problem("", "the file is empty; it needs at least 'upstreams:' and 'routes:'", 1)
            return None
        if not isinstance(root, MappingNode):
            self.problem("", f"the top level must be a mapping of settings, got {self.describe(root)}")
            return None
        self.lines[""] = _line(root)
        config = self.build(Config, root, "")
        return None if isinstance(config, _Invalid) else dataclasses.replace(config, source=self.source)

    # -- the generic builder --------------------------------------------------------------------

    def build(self, hint: Any, node: Node, path: str) -> Any:
        """The value of type ``hint`` that ``node`` describes, or ``_INVALID`` (problem recorded)."""
        origin, args = get_origin(hint), get_args(hint)
        if origin is Union or origin is types.UnionType:
            inner = [a for a in args if a is not type(None)]
            if len(inner) != 1:
                raise TypeError(f"unsupported config type {hint!r} at {path!r}")
            if type(None) in args and self.is_null(node, path):
                return None
            return self.build(inner[0], node, path)
        if origin is Literal:
            scalar = self.scalar(node, path) if isinstance(node, ScalarNode) else None
            allowed = [str(a) for a in args]
            if scalar is not None and scalar[0] in allowed:
                return args[allowed.index(scalar[0])]
            if isinstance(node, ScalarNode) and scalar is None:
                return _INVALID  # its ${VAR} problem is recorded
            return self.fail(path, f"must be one of: {', '.join(allowed)}")
        if origin is tuple:
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"unsupported config type {hint!r} at {path!r}; use tuple[X, ...]")
            return self.build_tuple(args[0], node, path)
        if origin is dict:
            return self.build_dict(args[1], node, path)
        if hint is MiddlewareEntry:
            return self.build_middleware(node, path)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(node, MappingNode):
                return self.fail(path, "must be a mapping")
            return self.build_fields(hint, self.mapping_items(node, path), path)
        if hint in _NOUN:
            return self.build_scalar(hint, node, path)
        if hint is Any:
            return self.plain(node, path)
        raise TypeError(f"unsupported config type {hint!r} at {path!r}")

    def build_fields(
        self, cls: type, items: dict[str, tuple[Node, Node]], path: str, skip: frozenset[str] = frozenset()
    ) -> Any:
        fields = {
            f.name: f for f in dataclasses.fields(cls) if f.init and (cls, f.name) not in _NOT_FROM_YAML
        }
        hints = get_type_hints(cls)
        before = self.failures
        kwargs: dict[str, Any] = {}
        for name, (key, value) in items.items():
            if name in skip:
                continue
            sub = _join(path, name)
            self.lines[sub] = _line(key)
            field = fields.get(name)
            if field is None:
                self.unknown_key(name, list(fields), sub)
                continue
            built = self.build(hints[name], value, sub)
            if not isinstance(built, _Invalid) and self.check_rules(field, built, sub):
                kwargs[name] = built
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and name not in items:
                self.fail(_join(path, name), "required")
        if self.failures > before:
            return _INVALID
        try:
            obj = cls(**kwargs)
        except ValueError as e:  # a dataclass's own __post_init__ check
            return self.fail(path, str(e))
        validate = getattr(obj, "validate", None)
        if callable(validate):
            for rel, message in validate():
                self.problem(_join(path, rel), message)
        return obj

    def build_middleware(self, node: Node, path: str) -> Any:
        if not isinstance(node, MappingNode):
            return self.fail(path, "must be a mapping")
        items = self.mapping_items(node, path)
        type_path = _join(path, "type")
        if "type" not in items:
            return self.fail(type_path, "required")
        key, value = items["type"]
        self.lines[type_path] = _line(key)
        type_name = self.build(str, value, type_path)
        if isinstance(type_name, _Invalid):
            return _INVALID
        try:
            cls = registry.resolve(type_name)
        except ValueError as e:
            return self.fail(type_path, str(e))
        config = self.build_fields(cls.Config, items, path, skip=frozenset({"type"}))
        if isinstance(config, _Invalid):
            return _INVALID
        return MiddlewareEntry(type=type_name, config=config, factory=cls)

    def build_tuple(self, item_hint: Any, node: Node, path: str) -> Any:
        if not isinstance(node, SequenceNode):
            return self.fail(path, "must be a list")
        before = self.failures
        items = []
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            self.lines[sub] = _line(item)
            items.append(self.build(item_hint, item, sub))
        return _INVALID if self.failures > before else tuple(items)

    def build_dict(self, value_hint: Any, node: Node, path: str) -> Any:
        if not isinstance(node, MappingNode):
            return self.fail(path, "must be a mapping")
        before = self.failures
        out: dict[str, Any] = {}
        for name, (key, value) in self.mapping_items(node, path).items():
            sub = _join(path, name)
            self.lines[sub] = _line(key)
            out[name] = self.build(value_hint, value, sub)
        return _INVALID if self.failures > before else out

    def build_scalar(self, want: type, node: Node, path: str) -> Any:
        if not isinstance(node, ScalarNode):
            return self.fail(path, f"must be {_NOUN[want]}, got {self.describe(node)}")
        scalar = self.scalar(node, path)
        if scalar is None:
            return _INVALID
        text, tag, interpolated = scalar
        if want is str:
            if tag == _NULL and not interpolated:
                return self.fail(path, "must be a string, got null")
            return text
        if tag == _STR:  # quoted or interpolated: "8080" still fills an int field
            tag = self.resolve(text)
        value = self.construct(tag, text, node)
        if want is bool and isinstance(value, bool):
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if want is int and number and (isinstance(value, int) or value.is_integer()):
            return int(value)
        if want is float and number and not math.isnan(value):
            return float(value)
        got = "null" if tag == _NULL else repr(text)
        return self.fail(path, f"must be {_NOUN[want]}, got {got}")

    def check_rules(self, field: dataclasses.Field[Any], value: Any, path: str) -> bool:
        """Apply the ``min`` / ``max`` / ``min_len`` metadata of ``field``; False after a problem."""
        meta = field.metadata
        if isinstance(value, int | float) and not isinstance(value, bool):
            kind = "an integer" if isinstance(value, int) else "a number"
            if "min" in meta and value < meta["min"]:
                self.fail(path, f"must be {kind} ≥ {_number(meta['min'])}")
                return False
            if "max" in meta and value > meta["max"]:
                self.fail(path, f"must be {kind} ≤ {_number(meta['max'])}")
                return False
        min_len = meta.get("min_len", 0)
        if isinstance(value, str | tuple | list | dict) and len(value) < min_len:
            unit = "characters" if isinstance(value, str) else "entries"
            self.fail(path, "must not be empty" if min_len == 1 else f"must have ≥ {min_len} {unit}")
            return False
        return True

    def unknown_key(self, name: str, known: list[str], path: str) -> None:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = f"known: {', '.join(known)}" if known else "this entry takes no other keys"
        self.fail(path, f"unknown key {name!r} ({hint})")

    # -- YAML nodes -----------------------------------------------------------------------------

    def mapping_items(self, node: MappingNode, path: str) -> dict[str, tuple[Node, Node]]:
        """Key text → (key node, value node), with ``<<`` merges applied and duplicate keys reported."""
        merged: dict[str, tuple[Node, Node]] = {}
        own: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                sources = value.value if isinstance(value, SequenceNode) else [value]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self.fail(path, "'<<' must merge a mapping or a list of mappings", _line(value))
                        continue
                    for name, pair in self.mapping_items(source, path).items():
                        merged.setdefault(name, pair)
            elif not isinstance(key, ScalarNode):
                self.fail(path, f"keys must be plain strings, got {self.describe(key)}", _line(key))
            elif str(key.value) in own:
                first = _line(own[str(key.value)][0])
                self.fail(_join(path, str(key.value)), f"duplicate key (first at line {first})", _line(key))
            else:
                own[str(key.value)] = (key, value)
        return {**merged, **own}

    def scalar(self, node: ScalarNode, path: str) -> tuple[str, str, bool] | None:
        """(text after ``${VAR}`` interpolation, its YAML tag, whether it was interpolated)."""
        raw = str(node.value)
        text = self.interpolate(raw, path, _line(node))
        if text is None:
            return None
        if text != raw and node.style is None:  # a plain scalar: resolve the new text afresh
            return text, self.resolve(text), True
        return text, str(node.tag), text != raw

    def interpolate(self, text: str, path: str, line: int) -> str | None:
        if "${" not in text:
            return text
        ok = True

        def replace(match: re.Match[str]) -> str:
            nonlocal ok
            if match.group(0) == "$${":
                return "${"
            body, closed = match.group(1), match.group(2)
            ref = _REF_BODY.fullmatch(body)
            if not closed or ref is None or "${" in (ref.group(2) or ""):
                ok = False
                self.fail(
                    path,
                    f"bad reference '${{{body}{closed}': write ${{NAME}} or ${{NAME:-default}} "
                    "(and $${ for a literal ${)",
                    line,
                )
                return ""
            name, default = ref.group(1), ref.group(2)
            value = self.env.get(name)
            if default is not None and not value:
                return default
            if value is None:
                ok = False
                self.fail(
                    path,
                    f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)",
                    line,
                )
                return ""
            return value

        result = _REF.sub(replace, text)
        return result if ok else None

    def resolve(self, text: str) -> str:
        """The tag YAML gives ``text`` written as a plain scalar: "8080" → int, "" → null."""
        return str(self.resolver.resolve(ScalarNode, text, (True, False)))  # type: ignore[no-untyped-call]

    def construct(self, tag: str, text: str, like: Node) -> Any:
        try:
            return self.constructor.construct_object(ScalarNode(tag, text, like.start_mark, like.end_mark))
        except (ConstructorError, ValueError):
            return _INVALID

    def is_null(self, node: Node, path: str) -> bool:
        if not isinstance(node, ScalarNode):
            return False
        scalar = self.scalar(node, path)
        return scalar is not None and scalar[1] == _NULL

    def plain(self, node: Node, path: str) -> Any:
        """Plain Python data (dict / list / scalars, interpolated) for fields typed ``Any``."""
        if isinstance(node, MappingNode):
            items = self.mapping_items(node, path)
            return {name: self.plain(value, _join(path, name)) for name, (_, value) in items.items()}
        if isinstance(node, SequenceNode):
            return [self.plain(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        scalar = self.scalar(node, path)
        if scalar is None:
            return _INVALID
        value = self.construct(scalar[1], scalar[0], node)
        return self.fail(path, f"cannot read {scalar[0]!r} as {scalar[1]}") if value is _INVALID else value

    @staticmethod
    def describe(node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        return "null" if node.tag == _NULL else repr(str(node.value))
