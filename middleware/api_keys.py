"""API keys for the ``auth`` middleware: their config, the keys file, and the lookup table.

A key is stored as given or as ``sha256:<64 hex digits>`` of it (so the config never needs to hold
the secret). Lookup hashes the presented key with SHA-256, finds the entry by digest and confirms
with ``hmac.compare_digest``: the time it takes does not depend on how much of a key matched.
Keys are never logged; an entry is named by its ``id``.

A keys file (YAML or JSON) holds a ``keys:`` list with the same fields as the inline ``keys``,
``${VAR}`` interpolation included, and its problems are reported with the file's own line numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from proxy.config import opt, req
from proxy.config_loader import _Builder  # the typed YAML builder behind load_config
from proxy.identity import Identity, KeyLimits

SHA256_PREFIX: Final = "sha256:"
ALL_MODELS: Final = "*"


@dataclass(frozen=True, repr=False)  # its own __repr__: a logged config never shows a key
class ApiKeyConfig:
    id: str = req("the key's name in logs, metrics and rate-limit buckets (never the key itself)", min_len=1)
    key: str = req("the API key, or 'sha256:<64 hex digits>' of it", min_len=1)
    tenant: str = opt("", "who the key belongs to (default: the key's id)")
    models: tuple[str, ...] = opt((ALL_MODELS,), "route names the key may use; '*' for all", min_len=1)
    limits: KeyLimits = opt(KeyLimits(), "rate limits of this key, overriding rate_limit's defaults")
    metadata: dict[str, Any] = opt({}, "free-form data for later middleware (request.ctx)")

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.key.startswith(SHA256_PREFIX):
            hex_digest = self.key[len(SHA256_PREFIX) :]
            if len(hex_digest) != 64 or not all(c in "0123456789abcdefABCDEF" for c in hex_digest):
                problems.append(("key", "after 'sha256:' must come 64 hex digits (sha256sum of the key)"))
        for i, model in enumerate(self.models):
            if not model:
                problems.append((f"models[{i}]", "must not be empty"))
        return problems

    def __repr__(self) -> str:
        return f"ApiKeyConfig(id={self.id!r}, key='***', tenant={self.tenant!r}, models={self.models!r})"

    @property
    def digest(self) -> bytes:
        if self.key.startswith(SHA256_PREFIX):
            return bytes.fromhex(self.key[len(SHA256_PREFIX) :])
        return hashlib.sha256(self.key.encode()).digest()

    def identity(self) -> Identity:
        models = None if ALL_MODELS in self.models else frozenset(self.models)
        return Identity(self.id, self.tenant or self.id, models, self.limits, dict(self.metadata))


@dataclass(frozen=True)
class KeysFile:
    keys: tuple[ApiKeyConfig, ...] = req("the API keys", min_len=1)


class KeyStore:
    """Presented key → Identity, by SHA-256 digest."""

    def __init__(self, entries: Iterable[ApiKeyConfig]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Identity]] = {}
        for entry in entries:
            digest = entry.digest
            if digest in self._by_digest:
                raise ValueError(f"keys {self._by_digest[digest][1].key_id!r} and {entry.id!r} are the same")
            self._by_digest[digest] = (digest, entry.identity())

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: bytes) -> Identity | None:
        digest = hashlib.sha256(presented).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]


def duplicates(entries: Iterable[tuple[str, ApiKeyConfig]]) -> list[tuple[str, str]]:
    """Problems for entries (``(where, key)``) that repeat an id or a key seen before."""
    problems = []
    ids: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for where, entry in entries:
        if entry.id in ids:
            problems.append((f"{where}.id", f"duplicate key id {entry.id!r} (first in {ids[entry.id]})"))
        ids.setdefault(entry.id, where)
        digest = entry.digest
        if digest in digests:
            problems.append((f"{where}.key", f"the same key as {digests[digest]}"))
        digests.setdefault(digest, where)
    return problems


def load_keys_file(
    path: str, env: Mapping[str, str] | None = None
) -> tuple[tuple[ApiKeyConfig, ...], list[str]]:
    """The keys in ``path`` and the problems found (each ``file:line: path: message``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return (), [f"{path}: cannot read: {e.strerror or e}"]
    except UnicodeDecodeError as e:
        return (), [f"{path}: cannot read: not UTF-8 text (bad byte at offset {e.start})"]
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        return (), [f"{path}:{line}: not valid YAML or JSON: {e.problem or e.context}"]
    except yaml.YAMLError as e:
        return (), [f"{path}:1: not valid YAML or JSON: {str(e).splitlines()[0]}"]
    if not isinstance(root, yaml.MappingNode):
        return (), [f"{path}:1: must be a mapping with a 'keys:' list"]
    builder = _Builder(path, os.environ if env is None else env)
    built = builder.build(KeysFile, root, "")
    if builder.problems or not isinstance(built, KeysFile):
        return (), builder.report()
    return built.keys, []
