"""Rule specs: one spelling of "a rule with options" for every command and config file.

``NAME[:option=value,...]``: ``dfa``, ``dfa:k=1``, ``dfa:rank=4``, ``usf:scale=1.0``,
``dfa:boundaries=["layer1","layer2"]``. Values are read as TOML values (``1`` an integer, ``0.5``
a number, ``true`` a boolean, ``[1, 2]`` a list); anything else is a string, as with ``--set``.
"""

from __future__ import annotations

import json
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_value(text: str):
    """``text`` read as a TOML value; a bare word stays a string."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_rule_spec(spec: str) -> tuple[str, dict]:
    """``"dfa:k=1,init=sign"`` -> ``("dfa", {"k": 1, "init": "sign"})``.

    The rule name is not checked here (``sdfa.convert`` checks it against the registry).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a rule spec is NAME[:option=value,...], e.g. dfa:k=1; got {spec!r}")
    name, _, rest = spec.partition(":")
    options = {}
    for item in _split(rest):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"rule options look like 'dfa:k=1,init=sign' (option=value, comma-separated); "
                f"got {spec!r}"
            )
        if key.strip() in options:
            raise ValueError(f"rule spec {spec!r} gives option {key.strip()!r} twice")
        options[key.strip()] = parse_value(value)
    return name.strip(), options


def format_rule_spec(name: str, options: dict | None = None) -> str:
    """The spec of ``name`` with ``options`` (None values left out): ``dfa:k=1``."""
    items = [f"{k}={toml_value(v)}" for k, v in (options or {}).items() if v is not None]
    return name + (":" + ",".join(items) if items else "")


def _split(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (a list value may hold commas)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def toml_value(value) -> str:
    """One value in inline TOML syntax (what ``--set``, specs and config files read)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite: validate() rejects nan and inf
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
