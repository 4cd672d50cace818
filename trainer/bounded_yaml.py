"""YAML files read with bounds: a config or spec file is refused, with a one-line message, when it is
too large, not UTF-8, nested too deep or expands (through aliases) to too many values, before parsing
gets slow or validation runs out of memory ("billion laughs"). `yaml.safe_load` underneath: no Python
objects are ever built from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainer.messages import ConfigError, short_path, short_text

# Bounds on what a config or spec file may be: far above any real spec (a few KiB, a few levels),
# far below what makes parsing slow or validation run out of memory (YAML alias "billion laughs").
MAX_YAML_BYTES = 64 << 10  # checked on the file size, before anything is read (shipped specs: ~1 KiB)
MAX_YAML_DEPTH = 32  # nested mappings and lists
MAX_YAML_NODES = 100_000  # scalars, lists and mappings, counting each alias as the node it repeats


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than MAX_YAML_DEPTH while composing, before Python's
    recursion limit is reached."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlTooComplex(
                    f"nests deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}); configs are a few levels deep"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _YamlTooComplex(yaml.YAMLError):
    pass


def _expanded_nodes(node: yaml.Node) -> int:
    """Nodes of the document with every alias expanded, stopping past MAX_YAML_NODES; each distinct node
    is visited once (memoized), so an alias bomb is measured in microseconds, and cycles are refused."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(current: yaml.Node, depth: int) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise _YamlTooComplex("has an alias that refers to itself (a recursive structure)")
        if depth > MAX_YAML_DEPTH:
            line = current.start_mark.line + 1
            raise _YamlTooComplex(f"nests deeper than {MAX_YAML_DEPTH} levels (line {line}); configs are a few levels deep")
        visiting.add(key)
        children: list = []
        if isinstance(current, yaml.SequenceNode):
            children = current.value
        elif isinstance(current, yaml.MappingNode):
            children = [item for pair in current.value for item in pair]
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise _YamlTooComplex(
                    f"expands to more than {MAX_YAML_NODES} values (aliases included); configs hold a few hundred"
                )
        visiting.discard(key)
        sizes[key] = total
        return total

    return size(node, 0)


def safe_load_bounded(text: str) -> Any:
    """yaml.safe_load with bounded depth and size (aliases expanded), raising yaml.YAMLError beyond them.

    libyaml's loader composes when present (about 10x faster than PyYAML's; it refuses flow nesting past
    1000 levels itself); the depth and size bounds are then checked on the composed nodes, before any
    Python object is built."""
    loader = getattr(yaml, "CSafeLoader", _BoundedLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one short line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return short_text(f"{problem} at line {mark.line + 1}, column {mark.column + 1}")
    return short_text(str(err))


def read_yaml_text(path: str | Path) -> str:
    """The text of a YAML file: an existing file of at most MAX_YAML_BYTES, valid UTF-8 (size checked first)."""
    path = Path(path)
    shown = short_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {shown} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{shown} is {size} bytes; config and spec files are limited to {MAX_YAML_BYTES} bytes "
            f"(a spec is a few KiB: put data in a data source, not in the YAML)"
        )
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{shown} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            f"save it as UTF-8 YAML"
        ) from None


def parse_yaml_mapping(text: str, source: str) -> dict:
    """A YAML mapping from text (bounded, see safe_load_bounded); `source` names it in messages."""
    try:
        data = safe_load_bounded(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (bounded size, UTF-8, bounded depth); an empty file is an empty mapping."""
    return parse_yaml_mapping(read_yaml_text(path), short_path(path))
