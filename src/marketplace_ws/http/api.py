"""
The C{/api/v1} tree the Next.js backend calls (SPEC §5), as one leaf resource that
dispatches on a route table.

Every request goes the same way, whatever the endpoint: match the path (404) and the
method (405, with C{Allow}), answer a CORS preflight, check the body's size (413), the
bearer secret (401), the parameters and the JSON body against the route's schemas
(400, 415), then run the route's handler and answer its result as JSON. Anything a
handler raises becomes an error body: an L{OpError} with its code's status, anything
else C{internal}, logged here and never shown to the caller. So a new endpoint is one
L{Route} in an area's C{ROUTES} (L{publish}, L{presence}, L{users}, L{stats}), and
the OpenAPI document (L{openapi}) describes it from the same entry.

Answers are written when the handler's Deferred fires; a caller that went away
meanwhile gets nothing written, and the work it asked for (a publish) still completes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from marketplace_ws.broker import Published
from marketplace_ws.channels import Channel
from marketplace_ws.envelope import (
    BAD_REQUEST,
    INTERNAL,
    NOT_FOUND,
    TOO_LARGE,
    UNAUTHORIZED,
    UNAVAILABLE,
    explain,
)
from marketplace_ws.http import (
    conversations,
    notifications,
    openapi,
    presence,
    publish,
    stats,
    users,
)
from marketplace_ws.http._bearer import Bearer
from marketplace_ws.http._cors import Cors
from marketplace_ws.http._errors import STATUS, ApiError, errorBody, tooLargeMessage
from marketplace_ws.http._json import respond
from marketplace_ws.http._routes import Call, Route, Router
from marketplace_ws.http._schema import SchemaError, validate

_log = Logger()


class Backend(Protocol):
    """
    What the API asks of the rest of the server: the hub and broker for events and
    presence, the protocol factory for connections.
    """

    def publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None
    ) -> Deferred[Published]: ...

    def online(self, userIds: Sequence[str]) -> Deferred[dict[str, bool]]: ...

    def members(self, channel: Channel) -> Deferred[list[str]]: ...

    def disconnect(self, userId: str, reason: str) -> Deferred[int]:
        """Close the user's WebSockets with code 4003; how many were closed."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def findOrCreateConversation(
        self, listingId: str | None, participants: list[tuple[str, str]]
    ) -> Deferred[dict[str, Any]]: ...

    def systemMessage(self, conversationId: str, body: str) -> Deferred[dict[str, Any]]: ...

    def notify(
        self,
        userIds: list[str],
        type: str,
        title: str,
        body: str | None,
        data: Any,
        idempotencyKey: str | None,
    ) -> Deferred[list[dict[str, Any]]]: ...


#: Every endpoint but the OpenAPI document's, which is made from this table.
ROUTES: tuple[Route, ...] = (
    publish.ROUTES
    + conversations.ROUTES
    + notifications.ROUTES
    + presence.ROUTES
    + users.ROUTES
    + stats.ROUTES
)

_CHALLENGE = b'Bearer realm="marketplace-ws"'


def apiResource(
    backend: Backend, secret: str | None, maxBody: int, corsOrigins: tuple[str, ...]
) -> Resource:
    """
    The resource to mount at C{/api}: it serves C{/api/v1/…} and answers a JSON 404
    for anything else under C{/api}.

    @param secret: C{HTTP_API_SECRET}; C{None} disables the API (every call but the
        OpenAPI document is answered 503).
    @param maxBody: the largest request body, in bytes. Checked here against
        C{Content-Length} and the body received; L{marketplace_ws.http.body} stops
        reading a larger one early, and should be the site's request factory.
    @param corsOrigins: browser origins allowed to call the API.
    """
    document: dict[str, Any] = {}
    routes = (*ROUTES, openapi.route(lambda: document))
    document.update(openapi.document(routes, maxBody))
    return ApiResource(backend, secret, maxBody, Cors(corsOrigins), Router(routes))


@frozen
class _Reply:
    status: int
    #: The JSON answer; a 204 (a preflight's) has none.
    body: Any
    headers: Mapping[bytes, bytes] = field(factory=dict)


class ApiResource(Resource):
    isLeaf = True

    def __init__(
        self, backend: Backend, secret: str | None, maxBody: int, cors: Cors, router: Router
    ) -> None:
        super().__init__()
        self._backend = backend
        self._secret = None if secret is None else Bearer(secret)
        self._maxBody = maxBody
        self._cors = cors
        self._router = router

    def render(self, request: Request) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        answering = Deferred.fromCoroutine(self._answer(request, gone))
        answering.addErrback(lambda f: _log.failure("answering an API request failed", f))
        return NOT_DONE_YET

    async def _answer(self, request: Request, gone: list[Failure]) -> None:
        try:
            reply = await self._dispatch(request)
        except ApiError as e:
            reply = _Reply(e.status, errorBody(e.code, e.message), e.headers)
        except Exception as e:  # noqa: BLE001 - the caller hears "internal"; the log has the rest
            problem = explain(e)
            if problem is not None:
                reply = _Reply(STATUS[problem.code], errorBody(problem.code, problem.message))
            else:
                _log.failure(
                    "{method} {path} failed", method=_text(request.method), path=_path(request)
                )
                reply = _internal()
        if gone:
            _log.debug(
                "{method} {path}: the client went away before the answer",
                method=_text(request.method),
                path=_path(request),
            )
            return
        for name, value in {**self._cors.headers(request), **reply.headers}.items():
            request.setHeader(name, value)
        if reply.status == 204:
            request.setResponseCode(reply.status)
            request.setHeader(b"cache-control", b"no-store")
            request.finish()
            return
        try:
            data = respond(request, reply.status, reply.body)
        except (TypeError, ValueError):
            _log.failure(
                "{method} {path}: the answer is not JSON",
                method=_text(request.method),
                path=_path(request),
            )
            data = respond(request, 500, _internal().body)
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    async def _dispatch(self, request: Request) -> _Reply:
        segments = _segments(request)
        match = self._router.match(segments[1:]) if segments[:1] == ["v1"] else None
        if match is None:
            raise ApiError(
                NOT_FOUND,
                "there is no endpoint at this path: /api/v1/openapi.json lists them",
            )
        methods, raw = match
        allow = ", ".join([*sorted(methods), "OPTIONS"]).encode("ascii")
        if request.method == b"OPTIONS":
            preflight = self._cors.preflight(request, ", ".join(sorted(methods)).encode("ascii"))
            return _Reply(204, None, {b"allow": allow, **preflight})
        route = methods.get(_text(request.method))
        if route is None:
            raise ApiError(
                BAD_REQUEST,
                f"/api/v1{next(iter(methods.values())).path} takes {' or '.join(sorted(methods))}",
                status=405,
                headers={b"allow": allow},
            )
        self._checkSize(request)
        if not route.public:
            self._authorise(request)
        params = _params(route, raw, request)
        body = _body(route, request) if route.body is not None else None
        return _Reply(200, await route.handler(Call(self._backend, params, body)))

    def _checkSize(self, request: Request) -> None:
        tooLarge = ApiError(TOO_LARGE, tooLargeMessage(self._maxBody))
        if getattr(request, "bodyTooLarge", False):
            raise tooLarge
        for length in request.requestHeaders.getRawHeaders(b"content-length") or ():
            if length.strip().isdigit() and int(length) > self._maxBody:
                raise tooLarge
        content = request.content
        if content is not None:
            # A chunked body has no Content-Length: what arrived is what counts.
            content.seek(0, 2)
            size = content.tell()
            content.seek(0)
            if size > self._maxBody:
                raise tooLarge

    def _authorise(self, request: Request) -> None:
        if self._secret is None:
            raise ApiError(
                UNAVAILABLE, "the HTTP API is disabled: set HTTP_API_SECRET to enable it"
            )
        token = Bearer.token(request)
        if token is None:
            raise ApiError(
                UNAUTHORIZED,
                "send Authorization: Bearer <HTTP_API_SECRET>",
                headers={b"www-authenticate": _CHALLENGE},
            )
        if not self._secret.matches(token):
            raise ApiError(
                UNAUTHORIZED,
                "the bearer token is not this server's HTTP_API_SECRET",
                headers={b"www-authenticate": _CHALLENGE + b', error="invalid_token"'},
            )


def _internal() -> _Reply:
    return _Reply(500, errorBody(INTERNAL, "the server failed to answer; the error is logged"))


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _path(request: Request) -> str:
    # For log lines: the path only (never the query), cut short.
    return request.path[:200].decode("ascii", "replace")


def _segments(request: Request) -> list[str]:
    try:
        return [segment.decode("utf-8") for segment in request.postpath or ()]
    except UnicodeDecodeError:
        raise ApiError(BAD_REQUEST, "the path is not UTF-8 once percent-decoded") from None


def _params(route: Route, raw: Mapping[str, str], request: Request) -> dict[str, Any]:
    params: dict[str, Any] = {}
    try:
        for parameter in route.pathParams:
            validate(parameter.schema, raw[parameter.name], parameter.name)
            params[parameter.name] = raw[parameter.name]
        query = _query(request) if route.query else {}
        for parameter in route.query:
            texts = query.get(parameter.name)
            if texts is None:
                if parameter.required:
                    raise SchemaError(f"{parameter.name} is required")
                continue
            value: Any
            if parameter.schema.get("type") == "array":
                value = [item.strip() for text in texts for item in text.split(",") if item.strip()]
            elif len(texts) == 1:
                value = texts[0]
            else:
                raise SchemaError(f"{parameter.name} may be given once")
            validate(parameter.schema, value, parameter.name)
            params[parameter.name] = value
    except SchemaError as e:
        raise ApiError(BAD_REQUEST, str(e)) from None
    return params


def _query(request: Request) -> dict[str, list[str]]:
    try:
        return parse_qs(
            urlsplit(request.uri.decode("ascii")).query, keep_blank_values=True, errors="strict"
        )
    except UnicodeDecodeError:
        raise SchemaError("the query is not UTF-8 once percent-decoded") from None


def _body(route: Route, request: Request) -> Any:
    assert route.body is not None
    content = b""
    if request.content is not None:
        request.content.seek(0)
        content = request.content.read()
    if not content.strip() and route.bodyOptional:
        return {}
    _checkContentType(request)
    if not content.strip():
        raise ApiError(BAD_REQUEST, "the body is empty: send a JSON object")
    try:
        # Decoded strictly first: json.loads would guess UTF-16 or UTF-32 from bytes.
        value = json.loads(content.decode("utf-8"), parse_constant=_notJSON)
    except UnicodeDecodeError:
        raise ApiError(BAD_REQUEST, "the body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise ApiError(BAD_REQUEST, "the body is not valid JSON") from None
    try:
        validate(route.body, value, "body")
    except SchemaError as e:
        raise ApiError(BAD_REQUEST, str(e)) from None
    return value


def _notJSON(constant: str) -> Any:
    # NaN and Infinity: Python accepts them, JSON (and every browser) does not, and they
    # would be pushed to subscribers as they are.
    raise ValueError(constant)


def _checkContentType(request: Request) -> None:
    values = request.requestHeaders.getRawHeaders(b"content-type") or []
    if len(values) == 1:
        mediaType, *parameters = values[0].decode("latin-1").split(";")
        charsets = {
            value.strip().strip('"').lower()
            for name, _, value in (p.partition("=") for p in parameters)
            if name.strip().lower() == "charset"
        }
        if mediaType.strip().lower() == "application/json" and charsets <= {"utf-8", "utf8"}:
            return
    raise ApiError(
        BAD_REQUEST,
        "the body must be JSON, sent with Content-Type: application/json",
        status=415,
    )
