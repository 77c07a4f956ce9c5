"""
C{GET /api/v1/openapi.json}: the OpenAPI 3.1 document of the HTTP API, made from the
route table the server dispatches on.

Every schema in it is the one the server validates with (L{_schema}), so a client
generated from it (openapi-typescript, orval) agrees with the server by construction.
It is served without the bearer secret: it describes the API, it does not open it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marketplace_ws import __version__
from marketplace_ws.envelope import ERROR_CODES
from marketplace_ws.http._errors import STATUS
from marketplace_ws.http._routes import Call, Parameter, Route

#: Reusable error responses: name -> (status, when).
_ERRORS: dict[str, tuple[int, str]] = {
    "BadRequest": (400, "bad_request: the body, a parameter or the path is invalid."),
    "Unauthorized": (401, "unauthorized: no bearer token, or not HTTP_API_SECRET."),
    "Forbidden": (403, "forbidden: the caller may not do this."),
    "NotFound": (404, "not_found: no such resource."),
    "MethodNotAllowed": (405, "bad_request: the path does not take this method (see Allow)."),
    "Conflict": (409, "conflict: the request conflicts with the current state."),
    "TooLarge": (413, "too_large: the body is larger than the limit (HTTP_MAX_BODY)."),
    "UnsupportedMediaType": (415, "bad_request: the body is not application/json."),
    "RateLimited": (429, "rate_limited: too many requests."),
    "Internal": (500, "internal: the server failed; the error is logged."),
    "Unavailable": (
        503,
        "unavailable: a dependency (database, Redis) is down, or the API is disabled"
        " (HTTP_API_SECRET is not set). Retry later.",
    ),
}
_BY_CODE = {
    "bad_request": "BadRequest",
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "not_found": "NotFound",
    "conflict": "Conflict",
    "too_large": "TooLarge",
    "rate_limited": "RateLimited",
    "internal": "Internal",
    "unavailable": "Unavailable",
}
assert set(_BY_CODE) == ERROR_CODES
assert all(_ERRORS[name][0] == STATUS[code] for code, name in _BY_CODE.items())

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(ERROR_CODES)},
                "message": {"type": "string", "description": "For people, not programs."},
            },
        }
    },
}

ERROR_EXAMPLE = {"error": {"code": "bad_request", "message": "event is required"}}


def document(routes: tuple[Route, ...], maxBody: int) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    tags = sorted({route.tag for route in routes})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "marketplace-ws HTTP API",
            "version": __version__,
            "description": (
                "The API the Next.js backend calls: publish events, ask about presence,"
                " disconnect users. Every call but this document's carries"
                " `Authorization: Bearer <HTTP_API_SECRET>`. Bodies are JSON"
                f" (`Content-Type: application/json`), at most {maxBody} bytes. Errors are"
                ' `{"error":{"code","message"}}` with the codes of the WebSocket protocol.'
                " This document is served without authentication."
            ),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's HTTP_API_SECRET, compared in constant time.",
                }
            },
            "schemas": {"Error": ERROR},
            "responses": {
                name: {
                    "description": when,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"},
                        }
                    },
                }
                for name, (_, when) in _ERRORS.items()
            },
        },
    }


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operationId,
        "summary": route.summary,
        "description": route.description,
        "tags": [route.tag],
    }
    parameters = [_parameter(p, "path") for p in route.pathParams]
    parameters += [_parameter(p, "query") for p in route.query]
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": not route.bodyOptional,
            "content": {"application/json": {"schema": route.body, "example": route.bodyExample}},
        }
    responses: dict[str, Any] = {
        "200": {
            "description": route.summary,
            "content": {
                "application/json": {"schema": route.response, "example": route.responseExample}
            },
        }
    }
    errors = {"MethodNotAllowed", "Internal", *(_BY_CODE[code] for code in route.errors)}
    if parameters or route.body is not None:
        errors.add("BadRequest")
    if route.body is not None:
        errors |= {"TooLarge", "UnsupportedMediaType"}
    if route.public:
        operation["security"] = []
    else:
        errors |= {"Unauthorized", "Unavailable"}
    for name in sorted(errors, key=lambda name: _ERRORS[name][0]):
        responses[str(_ERRORS[name][0])] = {"$ref": f"#/components/responses/{name}"}
    operation["responses"] = responses
    return operation


def _parameter(parameter: Parameter, where: str) -> dict[str, Any]:
    described: dict[str, Any] = {
        "name": parameter.name,
        "in": where,
        "required": parameter.required or where == "path",
        "description": parameter.description,
        "schema": parameter.schema,
    }
    if parameter.schema.get("type") == "array":
        described["style"] = "form"
        described["explode"] = False
    if parameter.example is not None:
        described["example"] = parameter.example
    return described


def route(describe: Callable[[], dict[str, Any]]) -> Route:
    async def serve(call: Call) -> dict[str, Any]:
        return describe()

    return Route(
        method="GET",
        path="/openapi.json",
        operationId="openapi",
        summary="This document",
        description="Served without authentication.",
        tag="meta",
        handler=serve,
        public=True,
        response={"type": "object"},
        responseExample={"openapi": "3.1.0", "info": {"title": "marketplace-ws HTTP API"}},
    )
