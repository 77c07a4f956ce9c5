"""
The route table's entry: everything about one endpoint in one place, read both by the
resource that serves it and by the OpenAPI document that describes it.

An area of the API (C{publish.py}, C{presence.py}, …) is a tuple of L{Route}s; adding
an endpoint is adding an entry, and its validation, errors, CORS, authentication and
documentation follow from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from attrs import field, frozen

from marketplace_ws.http._schema import Schema, check

if TYPE_CHECKING:
    from marketplace_ws.http.api import Backend


@frozen
class Parameter:
    """
    A path segment (C{{name}} in the route's path) or a query parameter.

    A query parameter of C{type: array} takes every occurrence of the name, each of
    them comma-separated (C{?userIds=a,b&userIds=c}); any other occurs at most once.
    Path segments and query values are strings; the schema says what else they must be.
    """

    name: str
    schema: Schema = field(converter=check)
    description: str
    required: bool = True
    example: Any = None


@frozen
class Call:
    """
    One validated request, as a handler sees it: C{params} holds the path and query
    parameters by name (absent optional ones are missing), C{body} the JSON body, or
    C{None} for a route without one.
    """

    backend: Backend
    params: Mapping[str, Any]
    body: Any


#: What a route does: its answer is sent as JSON with status 200.
Handler = Callable[[Call], Awaitable[Any]]


def _checkOptional(schema: Schema | None) -> Schema | None:
    return None if schema is None else check(schema)


@frozen
class Route:
    """
    One endpoint: C{path} is relative to C{/api/v1}, with C{{name}} for a segment that
    is a parameter.

    A body whose schema requires nothing may be left out altogether (then it is C{{}},
    and needs no Content-Type): C{fetch(url, {method: "POST"})} is a complete call.
    """

    method: Literal["GET", "POST"]
    path: str
    operationId: str
    summary: str
    description: str
    handler: Handler
    response: Schema = field(converter=check)
    responseExample: Any
    tag: str
    body: Schema | None = field(default=None, converter=_checkOptional)
    bodyExample: Any = None
    pathParams: tuple[Parameter, ...] = ()
    query: tuple[Parameter, ...] = ()
    #: Served without the bearer secret.
    public: bool = False
    #: Error codes worth documenting besides the ones every route may answer.
    errors: tuple[str, ...] = ()

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))

    @property
    def bodyOptional(self) -> bool:
        return self.body is not None and not self.body.get("required")


class Router:
    """
    Which route a path and method name: literal segments win over parameters, so
    C{/publish/batch} is never taken for a C{/publish/{id}} added later.
    """

    def __init__(self, routes: tuple[Route, ...]) -> None:
        byPath: dict[tuple[str, ...], dict[str, Route]] = {}
        for route in routes:
            methods = byPath.setdefault(route.segments, {})
            if route.method in methods:
                raise ValueError(f"{route.method} {route.path} is in the table twice")
            methods[route.method] = route
            names = {p.name for p in route.pathParams}
            placeholders = {s[1:-1] for s in route.segments if s.startswith("{")}
            if names != placeholders:
                raise ValueError(f"{route.path}: path parameters {names} != {placeholders}")
        self.routes = routes
        # Most literal first (leftmost literal deciding ties): the first match wins.
        self._templates = sorted(
            byPath.items(),
            key=lambda item: tuple(not s.startswith("{") for s in item[0]),
            reverse=True,
        )

    def match(self, segments: list[str]) -> tuple[dict[str, Route], dict[str, str]] | None:
        """
        The routes at this path by method, and the path parameters' raw values.
        """
        for template, methods in self._templates:
            if len(template) != len(segments):
                continue
            values: dict[str, str] = {}
            for pattern, segment in zip(template, segments, strict=True):
                if pattern.startswith("{"):
                    if not segment:
                        break
                    values[pattern[1:-1]] = segment
                elif pattern != segment:
                    break
            else:
                return methods, values
        return None
