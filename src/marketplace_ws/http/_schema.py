"""
The small part of JSON Schema the HTTP API is described in.

Each endpoint's body, parameters and answer are written once, as schema dicts; the
same dicts validate requests (L{validate}) and go into the OpenAPI document verbatim.
So the document cannot promise what the server does not check, nor the server refuse
what the document allows. L{check} refuses a keyword L{validate} does not implement,
so a schema cannot say more than is enforced.

Patterns are anchored (C{^…$}) and matched with C{re.fullmatch}: that is JSON Schema's
search semantics for an anchored pattern, without Python's C{$} also matching before a
final newline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from marketplace_ws.channels import ID_PATTERN, KINDS, parseChannel
from marketplace_ws.envelope import OpError

Schema = Mapping[str, Any]

#: Keywords that only describe (the document shows them; validation ignores them).
_ANNOTATIONS = frozenset({"title", "description", "examples", "default"})

#: Keywords L{validate} enforces.
_ASSERTIONS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "enum",
        "minimum",
        "maximum",
    }
)

_TYPES: Mapping[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}

_ARTICLES = {
    "object": "a JSON object",
    "array": "an array",
    "integer": "an integer",
    "null": "null",
}


def _isChannel(value: str) -> bool:
    try:
        parseChannel(value)
    except OpError:
        return False
    return True


#: Formats with a checker: what the server really parses such a value with.
_FORMATS: Mapping[str, tuple[Callable[[str], bool], str]] = {
    "channel": (
        _isChannel,
        "must be user:<id>, conversation:<id> or listing:<id>, the id 1 to 128"
        " characters of letters, digits and _ - . : @ |",
    ),
}

#: An id as L{marketplace_ws.channels} accepts it: users, conversations, listings.
ID = f"^{ID_PATTERN.pattern}$"
#: A channel name, the same language as L{parseChannel} (L{_FORMATS} checks it with
#: parseChannel itself; a test keeps the two in step).
CHANNEL = f"^({'|'.join(sorted(KINDS))}):{ID_PATTERN.pattern}$"


class SchemaError(Exception):
    """
    A value does not fit its schema; the message names where and why.
    """


def check(schema: Schema) -> Schema:
    """
    Refuse a schema using a keyword L{validate} would ignore, or a pattern that is not
    anchored; return it unchanged.
    """
    for key, value in schema.items():
        if key not in _ASSERTIONS and key not in _ANNOTATIONS:
            raise ValueError(f"schema keyword {key!r} is not enforced by the validator")
        if key == "properties":
            for sub in value.values():
                check(sub)
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            check(value)
        elif key == "pattern" and not (value.startswith("^") and value.endswith("$")):
            raise ValueError(f"pattern {value!r} is not anchored with ^ and $")
        elif key == "format" and value not in _FORMATS:
            raise ValueError(f"format {value!r} has no checker")
    return schema


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def validate(schema: Schema, value: Any, where: str) -> None:
    """
    @param where: how the value is named in an error message (C{body},
        C{events[2].channel}, C{userIds}).
    @raise SchemaError: the first problem found.
    """
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[kind](value) for kind in kinds):
            names = " or ".join(_ARTICLES.get(kind, f"a {kind}") for kind in kinds)
            raise SchemaError(f"{where} must be {names}")
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(choice) for choice in schema["enum"])
        raise SchemaError(f"{where} must be one of {choices}")
    if isinstance(value, str):
        _string(schema, value, where)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{where} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{where} must be at most {schema['maximum']}")
    elif isinstance(value, list):
        _array(schema, value, where)
    elif isinstance(value, dict):
        _object(schema, value, where)


def _string(schema: Schema, value: str, where: str) -> None:
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if len(value) < low or (high is not None and len(value) > high):
        if high is None:
            raise SchemaError(f"{where} must be at least {low} characters long")
        raise SchemaError(f"{where} must be {low} to {high} characters long")
    if "format" in schema:
        accepts, problem = _FORMATS[schema["format"]]
        if not accepts(value):
            raise SchemaError(f"{where} {problem}")
    if "pattern" in schema and _compiled(schema["pattern"]).fullmatch(value) is None:
        raise SchemaError(f"{where} must match the pattern {schema['pattern']}")


def _array(schema: Schema, value: list[Any], where: str) -> None:
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    if len(value) < low or (high is not None and len(value) > high):
        if high is None:
            raise SchemaError(f"{where} must hold at least {low} items")
        raise SchemaError(f"{where} must hold {low} to {high} items")
    items = schema.get("items")
    if items is not None:
        for index, item in enumerate(value):
            validate(items, item, f"{where}[{index}]")


def _object(schema: Schema, value: dict[str, Any], where: str) -> None:
    prefix = "" if where == "body" else f"{where}."
    for name in schema.get("required", ()):
        if name not in value:
            raise SchemaError(f"{prefix}{name} is required")
    properties: Schema = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            validate(properties[name], item, f"{prefix}{name}")
        elif extra is False:
            known = ", ".join(properties)
            # The name is the caller's own input, of any length: cut it short.
            raise SchemaError(f"{prefix}{name[:64]} is not a known field (known: {known})")
        elif isinstance(extra, Mapping):
            validate(extra, item, f"{prefix}{name[:64]}")
