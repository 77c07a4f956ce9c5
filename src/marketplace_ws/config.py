"""
Settings: one table of every setting, turned into command-line flags, read from the
environment, validated once into a frozen L{Config}.

Every setting has a flag and an environment variable; the flag wins. The table is the
single place a setting is declared, so C{--help}, the environment and validation can
never disagree. A bad value raises L{ConfigError}, whose one line names the
environment variable (the name operators put in their deployment files), the flag,
and what is wrong; it never repeats a secret's value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from marketplace_ws.db.url import DatabaseURL, DatabaseURLError, parse_database_url
from marketplace_ws.limits import ConnectionLimits, parseRates

#: Secrets shorter than this are refused in production (and warned about in
#: development): HMAC-SHA256 keys should be at least as long as the hash.
MIN_SECRET_BYTES = 32

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
)


class ConfigError(Exception):
    """
    A setting is missing or wrong. C{str()} is the one line printed at start-up.

    C{transient} marks what a restart may cure without touching the setting: the
    database or Redis not reachable yet, the port still held by the old process. The
    process then exits 69 (EX_UNAVAILABLE), which supervisors retry, rather than 78
    (EX_CONFIG), which the systemd units are told never to restart.
    """

    transient = False

    def __init__(self, setting: Setting | str, problem: str, *, transient: bool = False) -> None:
        self.transient = transient
        name = setting.label if isinstance(setting, Setting) else setting
        # One line, whatever the bad value held: a start-up error is read in a log.
        problem = problem.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{name}: {problem}")
        self.setting = setting
        self.problem = problem


@frozen
class Setting:
    """
    One setting: its flag, its environment variable, its default and its help text.
    """

    flag: str
    env: str
    default: str | None
    help: str
    boolean: bool = False
    secret: bool = False

    @property
    def key(self) -> str:
        """The key under which L{usage.Options} stores the flag (its long name)."""
        return self.flag

    @property
    def label(self) -> str:
        return f"{self.env} (--{self.flag})"

    def describe(self) -> str:
        """Help text for C{--help}: what it does, its variable and its default."""
        default = "unset" if self.default is None else repr(self.default)
        if self.secret and self.default is None:
            default = "generated in development"
        return f"{self.help} [env {self.env}; default {default}]"


SETTINGS: tuple[Setting, ...] = (
    Setting("ws-port", "WS_PORT", "8080", "TCP port for WebSocket clients (0 picks a free one)."),
    Setting(
        "ws-endpoint",
        "WS_ENDPOINT",
        None,
        "Twisted endpoint string for WebSocket clients, instead of --ws-port "
        "(ssl:8443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0).",
    ),
    Setting("http-port", "HTTP_PORT", "8081", "TCP port for the HTTP API and health checks."),
    Setting(
        "http-endpoint",
        "HTTP_ENDPOINT",
        None,
        "Twisted endpoint string for the HTTP API, instead of --http-port.",
    ),
    Setting(
        "tls-cert",
        "TLS_CERT",
        None,
        "PEM file: the server's certificate, then its intermediates (certbot's "
        "fullchain.pem). With --tls-key, both listeners serve TLS (wss://, https://); "
        "SIGHUP reloads the files.",
    ),
    Setting(
        "tls-key",
        "TLS_KEY",
        None,
        "PEM file: the certificate's private key, unencrypted (certbot's privkey.pem).",
    ),
    Setting(
        "database-url",
        "DATABASE_URL",
        None,
        "PostgreSQL URL (Prisma's form is understood). Unset in development: an "
        "embedded PostgreSQL in --data-dir.",
    ),
    Setting(
        "database-schema",
        "DATABASE_SCHEMA",
        "marketplace_ws",
        "PostgreSQL schema holding this server's tables.",
    ),
    Setting(
        "database-pool-size", "DATABASE_POOL_SIZE", "5", "PostgreSQL connections to keep open."
    ),
    Setting(
        "database-statement-timeout",
        "DATABASE_STATEMENT_TIMEOUT",
        "10",
        "Seconds after which PostgreSQL cancels a statement.",
    ),
    Setting(
        "migrate",
        "MARKETPLACE_WS_MIGRATE",
        "false",
        "Apply pending database migrations at start-up (always on with the embedded database).",
        boolean=True,
    ),
    Setting(
        "redis-url",
        "REDIS_URL",
        None,
        "Redis URL (redis://[user:password@]host[:port][/db], rediss:// for TLS) shared by "
        "every process of a deployment; unset: one process, events in memory.",
        secret=True,
    ),
    Setting(
        "jwt-secret",
        "JWT_SECRET",
        None,
        "Shared secret for HS256/384/512 tokens issued by the Next.js app.",
        secret=True,
    ),
    Setting(
        "jwt-algorithms",
        "JWT_ALGORITHMS",
        None,
        "Comma-separated JWT algorithms to accept, never taken from the token (default "
        "HS256, or RS256,ES256 with a public key or JWKS URL).",
    ),
    Setting(
        "http-api-secret",
        "HTTP_API_SECRET",
        None,
        "Bearer secret the Next.js backend presents to the HTTP API.",
        secret=True,
    ),
    Setting(
        "metrics-token",
        "METRICS_TOKEN",
        None,
        "Bearer token /metrics requires; unset: /metrics is open (keep the HTTP port private).",
        secret=True,
    ),
    Setting(
        "jwt-public-key",
        "JWT_PUBLIC_KEY_FILE",
        None,
        "PEM file with the public key for RS*/ES*/PS* tokens.",
    ),
    Setting("jwks-url", "JWKS_URL", None, "JWKS URL to fetch RS*/ES* verification keys from."),
    Setting("jwt-leeway", "JWT_LEEWAY", "10", "Seconds of clock skew allowed on exp, nbf and iat."),
    Setting("jwt-audience", "JWT_AUDIENCE", None, "Required aud claim, if any."),
    Setting("jwt-issuer", "JWT_ISSUER", None, "Required iss claim, if any."),
    Setting("jwt-user-claim", "JWT_USER_CLAIM", "sub", "Claim holding the user id."),
    Setting(
        "allowed-origins",
        "ALLOWED_ORIGINS",
        None,
        "Comma-separated browser origins allowed to connect (https://app.example.com, "
        "https://*.example.com); unset allows any.",
    ),
    Setting("token-cookie", "WS_TOKEN_COOKIE", "mws_token", "Cookie that may carry the token."),
    Setting(
        "auth-timeout",
        "WS_AUTH_TIMEOUT",
        "10",
        "Seconds a connection without a token has to send its auth frame (then 4001).",
    ),
    Setting(
        "token-expiry-notice",
        "WS_TOKEN_EXPIRY_NOTICE",
        "60",
        "Seconds before exp at which token.expiring is sent.",
    ),
    Setting(
        "max-message-size",
        "WS_MAX_MESSAGE_SIZE",
        "65536",
        "Largest message in bytes, after decompression (larger: close 1009).",
    ),
    Setting("max-frame-size", "WS_MAX_FRAME_SIZE", "65536", "Largest frame payload in bytes."),
    Setting(
        "open-handshake-timeout",
        "WS_OPEN_HANDSHAKE_TIMEOUT",
        "10",
        "Seconds a client has to complete the WebSocket handshake.",
    ),
    Setting("ping-interval", "WS_PING_INTERVAL", "25", "Seconds between pings (0: none)."),
    Setting("ping-timeout", "WS_PING_TIMEOUT", "10", "Seconds to wait for a pong before dropping."),
    Setting(
        "max-connections-per-user",
        "WS_MAX_CONNECTIONS_PER_USER",
        "10",
        "Open connections one user may hold (the newest beyond it is closed with 4029).",
    ),
    Setting(
        "rate-limits",
        "WS_RATE_LIMITS",
        "*=20/s:40,typing=4/s:8",
        "Per-connection rate limits, OP=RATE/UNIT[:BURST] separated by commas; * for any op.",
    ),
    Setting(
        "rate-limit-close-after",
        "WS_RATE_LIMIT_CLOSE_AFTER",
        "50",
        "Rate-limited requests within a minute after which the connection is closed (4029).",
    ),
    Setting(
        "bad-frame-limit",
        "WS_BAD_FRAME_LIMIT",
        "10",
        "Malformed requests in a row after which the connection is closed (4000).",
    ),
    Setting(
        "permessage-deflate",
        "WS_PERMESSAGE_DEFLATE",
        "false",
        "Accept permessage-deflate compression (true or false). Off by default: its zlib "
        "state triples an idle connection's memory, and events are mostly too small to gain.",
    ),
    Setting(
        "deflate-window-bits",
        "WS_DEFLATE_WINDOW_BITS",
        "11",
        "zlib window of a compressed connection, 9-15 (smaller: less memory).",
    ),
    Setting(
        "max-subscriptions",
        "WS_MAX_SUBSCRIPTIONS",
        "100",
        "Channels one connection may be subscribed to at once (more: forbidden).",
    ),
    Setting(
        "max-send-buffer",
        "WS_MAX_SEND_BUFFER",
        "1048576",
        "Bytes of events queued for one connection that is not reading before it is "
        "closed as a slow consumer (4008).",
    ),
    Setting(
        "chat-max-body",
        "CHAT_MAX_BODY",
        "4000",
        "Longest chat message body in characters (longer: too_large).",
    ),
    Setting(
        "typing-timeout",
        "WS_TYPING_TIMEOUT",
        "6",
        "Seconds a typing indicator lasts unless the client repeats it.",
    ),
    Setting(
        "history-size",
        "HISTORY_SIZE",
        "100",
        "Events kept per channel for recovery with subscribe {since} (0: none).",
    ),
    Setting(
        "history-age",
        "HISTORY_TTL",
        "300",
        "Seconds an event stays in its channel's history.",
    ),
    Setting(
        "idempotency-window",
        "IDEMPOTENCY_WINDOW",
        "600",
        "Seconds a publish idempotencyKey is remembered for deduplication.",
    ),
    Setting(
        "outbox-sweep-interval",
        "OUTBOX_SWEEP_INTERVAL",
        "5",
        "Seconds between sweeps of the outbox for rows no notification announced.",
    ),
    Setting(
        "outbox-batch-size",
        "OUTBOX_BATCH_SIZE",
        "100",
        "Outbox rows published per transaction.",
    ),
    Setting(
        "http-max-body",
        "HTTP_MAX_BODY",
        "1048576",
        "Largest HTTP API request body in bytes (larger: 413).",
    ),
    Setting(
        "http-cors-origins",
        "HTTP_CORS_ORIGINS",
        None,
        "Comma-separated browser origins allowed to call the HTTP API (CORS); unset: none.",
    ),
    Setting(
        "conformance",
        "MARKETPLACE_WS_CONFORMANCE",
        "false",
        "Echo mode for the Autobahn testsuite: no auth, no database, production limits "
        "and settings otherwise. Refused with --production.",
        boolean=True,
    ),
    Setting(
        "data-dir",
        "MARKETPLACE_WS_DATA_DIR",
        ".marketplace-ws",
        "Directory for development state: the embedded database and generated secrets.",
    ),
    Setting(
        "production",
        "MARKETPLACE_WS_ENV",
        "development",
        "Production mode: missing or short secrets and a missing DATABASE_URL are fatal "
        "(the variable takes 'production' or 'development').",
        boolean=True,
    ),
    Setting(
        "shutdown-timeout",
        "SHUTDOWN_TIMEOUT",
        "10",
        "Seconds a SIGTERM/SIGINT shutdown may take to close sockets and finish "
        "database work before the process exits anyway.",
    ),
)

BY_FLAG: Mapping[str, Setting] = {s.flag: s for s in SETTINGS}


def settingsFor(flags: tuple[str, ...]) -> tuple[Setting, ...]:
    """The settings named by C{flags}, for commands that need only a few."""
    return tuple(BY_FLAG[f] for f in flags)


def optionsTables(
    settings: tuple[Setting, ...] = SETTINGS,
) -> tuple[list[list[Any]], list[list[Any]]]:
    """
    C{optParameters} and C{optFlags} for a L{twisted.python.usage.Options}.

    Defaults stay C{None} in the table so that an absent flag can fall through to the
    environment; the real default is shown in the help text instead.
    """
    parameters = [[s.flag, None, None, s.describe()] for s in settings if not s.boolean]
    flags = [[s.flag, None, s.describe()] for s in settings if s.boolean]
    return parameters, flags


def raw(setting: Setting, options: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """
    The text of one setting: the flag if given, else the environment, else the default.
    """
    given = options.get(setting.key)
    if setting.boolean:
        if given:
            return "production" if setting.flag == "production" else "true"
    elif given is not None:
        return str(given)
    fromEnv = environ.get(setting.env)
    if fromEnv is not None and fromEnv != "":
        return fromEnv
    return setting.default


def _boolean(setting: Setting, text: str | None) -> bool:
    value = (text or "").strip().lower()
    if setting.flag == "production":
        if value in ("production", "prod"):
            return True
        if value in ("development", "dev", "test", ""):
            return False
        raise ConfigError(setting, f"{text!r} is neither 'production' nor 'development'")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(setting, f"{text!r} is not a boolean (use true or false)")


def _port(setting: Setting, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(setting, f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise ConfigError(setting, f"{port} is not a port number (0-65535)")
    return port


def _number(setting: Setting, text: str, kind: Callable[[str], float], low: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(setting, f"{text!r} is not a number") from None
    if value < low:
        raise ConfigError(setting, f"{text} is below the minimum of {low:g}")
    return value


def _endpoint(
    portSetting: Setting,
    endpointSetting: Setting,
    options: Mapping[str, Any],
    environ: Mapping[str, str],
) -> tuple[str, str]:
    """
    The endpoint string of one listener (a full string as given, or C{tcp:PORT}), and
    the label of the setting it came from, for errors once it is used.

    A flag beats the environment even across the pair, so C{--ws-port 9000} overrides
    C{WS_ENDPOINT} from a deployment file, as an operator typing it would expect.
    """
    portFlag = options.get(portSetting.key)
    endpointFlag = options.get(endpointSetting.key)
    if portFlag is not None and endpointFlag is not None:
        raise ConfigError(
            endpointSetting,
            f"give either --{endpointSetting.flag} or --{portSetting.flag}, not both",
        )
    source = endpointSetting
    if endpointFlag is not None:
        description = str(endpointFlag)
    elif portFlag is not None:
        description, source = f"tcp:{_port(portSetting, str(portFlag))}", portSetting
    elif environ.get(endpointSetting.env):
        description = environ[endpointSetting.env]
    else:
        text = raw(portSetting, options, environ)
        assert text is not None
        description, source = f"tcp:{_port(portSetting, text)}", portSetting
    _checkEndpoint(endpointSetting, description)
    return description, source.label


def _anyPort(description: str) -> bool:
    """C{tcp:0}, C{ssl:0:…}: a free port chosen at listen time, different each time."""
    kind, _, rest = description.partition(":")
    return kind in ("tcp", "tcp6", "ssl") and rest.partition(":")[0] in ("0", "port=0")


def _checkEndpoint(setting: Setting, description: str) -> None:
    """
    Parse an endpoint string now, so a typo stops start-up with the setting's name
    instead of a traceback once the reactor runs.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(setting, f"{description!r} is not a valid endpoint: {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. ssl: with a missing key file
        raise ConfigError(setting, f"{description!r} cannot be used: {e}") from None


@frozen
class JWTSettings:
    """How tokens are verified: the key source, accepted algorithms and claim rules."""

    secret: str | None = field(repr=False)
    publicKeyFile: Path | None
    jwksURL: str | None
    algorithms: tuple[str, ...]
    leeway: float
    audience: str | None
    issuer: str | None
    userClaim: str

    @property
    def usesSecret(self) -> bool:
        return any(a.startswith("HS") for a in self.algorithms)


@frozen
class DeliverySettings:
    """How long events are remembered: recovery history and publish deduplication."""

    historySize: int = 100
    historyAge: float = 300.0
    idempotencyWindow: float = 600.0


@frozen
class OutboxSettings:
    sweepInterval: float = 5.0
    batchSize: int = 100


@frozen
class TLSSettings:
    """The files both listeners serve TLS from (L{marketplace_ws.tls})."""

    certificate: Path
    key: Path


@frozen
class Config:
    """
    The validated settings of one server process.
    """

    wsEndpoint: str
    wsSource: str
    httpEndpoint: str
    httpSource: str
    #: WS_PORT and HTTP_PORT name the same port: one listener serves both (platforms
    #: with one public port). Port 0 (any free port) is never shared.
    sharedPort: bool
    databaseURL: DatabaseURL | None
    redisURL: str | None = field(repr=False)
    databaseSchema: str
    databasePoolSize: int
    statementTimeout: float
    migrate: bool
    jwt: JWTSettings
    httpApiSecret: str | None = field(repr=False)
    metricsToken: str | None = field(repr=False)
    limits: ConnectionLimits
    delivery: DeliverySettings
    outbox: OutboxSettings
    chatMaxBody: int
    httpMaxBody: int
    corsOrigins: tuple[str, ...]
    dataDir: Path
    production: bool
    conformance: bool
    shutdownTimeout: float
    tls: TLSSettings | None = None

    @property
    def embeddedDatabase(self) -> bool:
        return self.databaseURL is None


def _schema(setting: Setting, text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", text):
        raise ConfigError(
            setting, f"{text!r} is not a plain PostgreSQL identifier (lower case, digits, _)"
        )
    return text


def _algorithms(setting: Setting, text: str | None, asymmetric: bool) -> tuple[str, ...]:
    if text is None:
        return ("RS256", "ES256") if asymmetric else ("HS256",)
    canonical = {a.upper(): a for a in _ALGORITHMS}
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise ConfigError(setting, "no algorithm given")
    for name in names:
        if name.upper() not in canonical:
            raise ConfigError(setting, f"{name!r} is not supported (use {', '.join(_ALGORITHMS)})")
    algorithms = tuple(canonical[name.upper()] for name in names)
    if asymmetric is False and any(not a.startswith("HS") for a in algorithms):
        raise ConfigError(setting, "RS/ES/PS algorithms need JWT_PUBLIC_KEY_FILE or JWKS_URL")
    return algorithms


def _secret(
    setting: Setting, text: str | None, production: bool, needed: bool = True
) -> str | None:
    if text is None:
        if production and needed:
            raise ConfigError(setting, "is required in production (32 or more bytes)")
        return None
    if production and len(text.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(
            setting,
            f"is {len(text.encode('utf-8'))} bytes; production requires {MIN_SECRET_BYTES} "
            "or more (openssl rand -base64 48)",
        )
    return text


def _jwt(options: Mapping[str, Any], env: Mapping[str, str], production: bool) -> JWTSettings:
    s = BY_FLAG

    def text(flag: str) -> str | None:
        return raw(s[flag], options, env)

    keyFile = text("jwt-public-key")
    publicKey = Path(keyFile) if keyFile else None
    if publicKey is not None and not publicKey.is_file():
        raise ConfigError(s["jwt-public-key"], f"{keyFile} is not a readable file")
    jwks = text("jwks-url")
    if jwks is not None and urlsplit(jwks).scheme not in ("https", "http"):
        raise ConfigError(s["jwks-url"], f"{jwks!r} is not an http(s) URL")
    if production and jwks is not None and urlsplit(jwks).scheme != "https":
        raise ConfigError(s["jwks-url"], "must be https in production")
    algorithms = _algorithms(
        s["jwt-algorithms"], text("jwt-algorithms"), publicKey is not None or jwks is not None
    )
    usesSecret = any(a.startswith("HS") for a in algorithms)
    return JWTSettings(
        secret=_secret(s["jwt-secret"], text("jwt-secret"), production, needed=usesSecret),
        publicKeyFile=publicKey,
        jwksURL=jwks,
        algorithms=algorithms,
        leeway=_number(s["jwt-leeway"], text("jwt-leeway") or "", float, 0),
        audience=text("jwt-audience"),
        issuer=text("jwt-issuer"),
        userClaim=text("jwt-user-claim") or "sub",
    )


def _redis(setting: Setting, text: str | None) -> str | None:
    if text is None:
        return None
    # Imported here: the broker pulls in txredisapi, which `--help` does not need.
    from marketplace_ws.broker.redis import RedisURLError, parseRedisURL

    try:
        parseRedisURL(text)
    except RedisURLError as e:
        problem = str(e).removeprefix("REDIS_URL: ").removeprefix("REDIS_URL ")
        raise ConfigError(setting, problem) from None
    return text


def _origins(setting: Setting, text: str | None) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in (text or "").split(",") if o.strip())
    for origin in origins:
        if urlsplit(origin).scheme not in ("http", "https") or not urlsplit(origin).netloc:
            raise ConfigError(setting, f"{origin!r} is not an origin like https://app.example.com")
    return origins


def _limits(options: Mapping[str, Any], env: Mapping[str, str]) -> ConnectionLimits:
    s = BY_FLAG

    def number(flag: str, kind: Callable[[str], float] = float, low: float = 0) -> Any:
        return _number(s[flag], raw(s[flag], options, env) or "", kind, low)

    ratesText = raw(s["rate-limits"], options, env) or ""
    try:
        rates = parseRates(ratesText)
    except ValueError as e:
        raise ConfigError(s["rate-limits"], str(e)) from None
    origins = _origins(s["allowed-origins"], raw(s["allowed-origins"], options, env))
    bits = number("deflate-window-bits", int, 9)
    if bits > 15:
        raise ConfigError(s["deflate-window-bits"], f"{bits} is above the maximum of 15")
    return ConnectionLimits(
        maxMessageSize=number("max-message-size", int, 1),
        maxFrameSize=number("max-frame-size", int, 1),
        openHandshakeTimeout=number("open-handshake-timeout", float, 0.1),
        authTimeout=number("auth-timeout", float, 0.1),
        pingInterval=number("ping-interval"),
        pingTimeout=number("ping-timeout"),
        maxConnectionsPerUser=number("max-connections-per-user", int, 1),
        rates=rates,
        abuseLimit=number("rate-limit-close-after", int, 1),
        garbageLimit=number("bad-frame-limit", int, 1),
        expiryNotice=number("token-expiry-notice"),
        allowedOrigins=origins,
        tokenCookie=raw(s["token-cookie"], options, env) or "",
        deflate=_boolean(s["permessage-deflate"], raw(s["permessage-deflate"], options, env)),
        deflateWindowBits=bits,
        maxSubscriptions=number("max-subscriptions", int, 1),
        maxSendBuffer=number("max-send-buffer", int, 1024),
        typingTimeout=number("typing-timeout", float, 0.1),
    )


def _tls(
    options: Mapping[str, Any], env: Mapping[str, str], endpoints: Mapping[str, str]
) -> TLSSettings | None:
    """
    The certificate and key files, both or neither. An C{ssl:} endpoint (whose TLS is
    Twisted's own, without reload) cannot be combined with them: TLS twice.
    """
    s = BY_FLAG
    cert, key = raw(s["tls-cert"], options, env), raw(s["tls-key"], options, env)
    if cert is None and key is None:
        return None
    if key is None:
        raise ConfigError(s["tls-key"], "is required with TLS_CERT: the certificate's private key")
    if cert is None:
        raise ConfigError(s["tls-cert"], "is required with TLS_KEY: the certificate and its chain")
    for flag, description in endpoints.items():
        if description.startswith("ssl:"):
            raise ConfigError(
                s[flag],
                "is an ssl: endpoint, which has TLS of its own; with TLS_CERT and TLS_KEY "
                "give a port or a tcp: endpoint",
            )
    return TLSSettings(Path(cert), Path(key))


def databaseFromOptions(
    options: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[DatabaseURL | None, str]:
    """
    The database URL (C{None}: use the embedded server) and our schema's name: all that
    C{marketplace-ws migrate} needs, so it does not demand the server's secrets.
    """
    s = BY_FLAG
    production = _boolean(s["production"], raw(s["production"], options, environ))
    text = raw(s["database-url"], options, environ)
    url = None
    if text is None:
        if production:
            raise ConfigError(s["database-url"], "is required in production")
    else:
        try:
            url = parse_database_url(text)
        except DatabaseURLError as e:
            raise ConfigError(s["database-url"], str(e)) from None
    # Prisma's ?schema= names the app's schema; ours stays separate (DATABASE_SCHEMA) so
    # the app's migrations never see drift.
    schema = _schema(s["database-schema"], raw(s["database-schema"], options, environ) or "")
    return url, schema


def configFromOptions(
    options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Config:
    """
    Validate every setting, flag over environment over default.

    @raise ConfigError: for the first setting that is wrong.
    """
    env = os.environ if environ is None else environ
    s = BY_FLAG

    def text(flag: str) -> str | None:
        return raw(s[flag], options, env)

    production = _boolean(s["production"], text("production"))
    conformance = _boolean(s["conformance"], text("conformance"))
    if production and conformance:
        raise ConfigError(s["conformance"], "is a test mode and is refused with --production")
    wsEndpoint, wsSource = _endpoint(s["ws-port"], s["ws-endpoint"], options, env)
    httpEndpoint, httpSource = _endpoint(s["http-port"], s["http-endpoint"], options, env)
    databaseURL, schema = databaseFromOptions(options, env)
    poolSize = _number(s["database-pool-size"], text("database-pool-size") or "", int, 1)
    if databaseURL is not None and databaseURL.connection_limit is not None:
        poolSize = min(poolSize, databaseURL.connection_limit)
    return Config(
        wsEndpoint=wsEndpoint,
        wsSource=wsSource,
        httpEndpoint=httpEndpoint,
        httpSource=httpSource,
        sharedPort=wsEndpoint == httpEndpoint and not _anyPort(wsEndpoint),
        databaseURL=databaseURL,
        redisURL=_redis(s["redis-url"], text("redis-url")),
        databaseSchema=schema,
        databasePoolSize=poolSize,
        statementTimeout=_number(
            s["database-statement-timeout"], text("database-statement-timeout") or "", float, 0.001
        ),
        migrate=_boolean(s["migrate"], text("migrate")) or databaseURL is None,
        jwt=_jwt(options, env, production),
        httpApiSecret=_secret(s["http-api-secret"], text("http-api-secret"), production),
        metricsToken=text("metrics-token"),
        limits=_limits(options, env),
        delivery=DeliverySettings(
            historySize=_number(s["history-size"], text("history-size") or "", int, 0),
            historyAge=_number(s["history-age"], text("history-age") or "", float, 0),
            idempotencyWindow=_number(
                s["idempotency-window"], text("idempotency-window") or "", float, 0
            ),
        ),
        outbox=OutboxSettings(
            sweepInterval=_number(
                s["outbox-sweep-interval"], text("outbox-sweep-interval") or "", float, 0.01
            ),
            batchSize=_number(s["outbox-batch-size"], text("outbox-batch-size") or "", int, 1),
        ),
        chatMaxBody=_number(s["chat-max-body"], text("chat-max-body") or "", int, 1),
        httpMaxBody=_number(s["http-max-body"], text("http-max-body") or "", int, 1),
        corsOrigins=_origins(s["http-cors-origins"], text("http-cors-origins")),
        dataDir=Path(text("data-dir") or ".marketplace-ws"),
        production=production,
        conformance=conformance,
        shutdownTimeout=_number(s["shutdown-timeout"], text("shutdown-timeout") or "", float, 0),
        tls=_tls(options, env, {"ws-endpoint": wsEndpoint, "http-endpoint": httpEndpoint}),
    )
