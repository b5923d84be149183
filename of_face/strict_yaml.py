"""YAML reading that refuses a key given twice in one mapping.

PyYAML's SafeLoader keeps the last of two equal keys silently: a second `Global:` section of a
config would throw the first away. `load` raises `DuplicateKeyError` naming the file and both lines.
"""
from typing import IO, Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    pass


def _strict_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKeyError(
                f"{loader.name}: line {key_node.start_mark.line + 1}: '{key}' is given twice (first on line "
                f"{seen[key] + 1}); merge them: the later one would silently replace the earlier")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load(stream: IO) -> Any:
    """yaml.safe_load, but a key repeated within one mapping raises DuplicateKeyError."""
    return yaml.load(stream, Loader=_StrictLoader)


def one_line(path, exc: yaml.YAMLError) -> str:
    """A YAML syntax error as one line naming the file, line and column (PyYAML's own text spans
    several lines: the context, the problem and a caret under each)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and opened is not None and opened is not mark:  # where the unclosed thing began
        context += f" that starts at line {opened.line + 1}, column {opened.column + 1}"
    return f"{path}: {where}not valid YAML: {problem}" + (f" ({context})" if context else "")
