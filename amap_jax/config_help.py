"""`train.py --help`: every config section and key with its default and one line, read from
the defaults (`config.defaults`) and the comments beside them in the source (the config module
and each method's dataclass), so the list cannot drift from what a run uses."""

from __future__ import annotations

import inspect
import re
import textwrap

import ml_collections

from amap_jax import config as config_lib
from amap_jax import methods

_ASSIGN = re.compile(r"^(\s*)(?:c\.)?(\w+)\s*(?::[^=#]+)?=(?!=)\s*(dict\()?")


def comments(source: str) -> dict[str, str]:
    """dotted name -> the comment of its assignment (`name=...`, `c.name = ...`,
    `name: T = ...`; inside `name=dict(` blocks the names are dotted): the comment after it
    on its line, else the comment lines right above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    stack: list[tuple[int, str]] = []  # open dict( blocks: (indent, name)
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stripped.startswith(")") and indent <= stack[-1][0]:
            stack.pop()
        m = _ASSIGN.match(line)
        if m:
            name = ".".join([n for _, n in stack] + [m.group(2)])
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            text = trailing or " ".join(above)
            if text and name not in out:
                out[name] = text
            if m.group(3) and not stripped.endswith(")"):
                stack.append((len(m.group(1)), m.group(2)))
        above = []
    return out


def _first_sentence(text: str, width: int = 90) -> str:
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return textwrap.shorten(sentence, width, placeholder="...")


def _entries(node, prefix: str):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _entries(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def text() -> str:
    """The config reference: top-level keys, then a block per section, a line per key."""
    defaults = config_lib.defaults()
    notes = comments(inspect.getsource(config_lib))
    owners = methods.sections()
    lines = ["config keys (override with --config.KEY=VALUE; defaults shown):", ""]
    sections = []
    for key, value in defaults.items():
        if isinstance(value, ml_collections.ConfigDict):
            sections.append(key)
        else:
            lines.append(_line(key, value, notes.get(key, "")))
    for section in sections:
        if section in owners:
            own = comments(inspect.getsource(owners[section]))
            users = [n for n, cls in methods.REGISTRY.items() if cls.section == section]
            which = f"method {users[0]}" if len(users) == 1 else f"methods {', '.join(users)}"
            lines += ["", f"{section}: settings of {which} (amap_jax/methods/)"]
        else:
            own = {
                k[len(section) + 1 :]: v for k, v in notes.items() if k.startswith(section + ".")
            }
            lines += ["", section]
        for path, v in _entries(defaults[section], f"{section}."):
            lines.append(_line(path, v, own.get(path[len(section) + 1 :], "")))
    return "\n".join(lines)


def _line(key: str, value, note: str) -> str:
    shown = f"{key}={value!r}"
    return f"  {shown:<44} {_first_sentence(note)}".rstrip()
