"""
The Redis broker: every L{IBroker} duty shared by all the processes of a deployment
through one Redis (SPEC §7), so that they behave as one server. docs/scaling.rst
describes the key layout, the failure behaviour and the bounds.

Two connections per process (txredisapi, which reconnects by itself):

  - the command connection runs every operation as one Lua script (EVALSHA; EVAL when
    Redis has forgotten the script). A publish is one round trip: the script gives the
    event the channel's next C{seq}, checks and sets the idempotency key, appends the
    event to the channel's capped history and PUBLISHes it, atomically, so every
    process sees one order per channel. Operations are sent in call order on this one
    connection, so two publishes of one process take their C{seq}s in call order.
  - the subscriber connection SUBSCRIBEs to the Redis channel of every channel watched
    here, and to the control channel. Events reach the hub only from there, the ones
    this process published included: each is delivered once.

Redis forgets subscriptions with the connection, and pub/sub does not keep what was
published meanwhile. After a reconnection the broker subscribes again to everything
watched, then calls the handler given to L{RedisBroker.setReconnected}: the hub must
then bring every subscriber up to date from the history (or tell it that it cannot).

Presence is kept per process: each process holds a lease in Redis, renewed every
C{presenceRefresh} seconds, and connections count only while the lease of the process
that registered them is alive. A process that dies stops renewing: its users go offline
at most C{presenceExpiry} seconds later, and the survivors remove its entries.

While Redis cannot be reached every operation fails at once with
C{OpError(UNAVAILABLE)}; one that gets no answer fails after C{timeout} seconds.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import txredisapi  # type: ignore[import-untyped]
from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, FirstError, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from marketplace_ws.broker import ControlHandler, Delivery, Event, IBroker, Published, Recovery
from marketplace_ws.envelope import UNAVAILABLE, OpError

__all__ = ["RedisBroker", "RedisURL", "RedisURLError", "RedisUnavailable", "parseRedisURL"]

_log = Logger()

DEFAULT_PORT = 6379

#: Redis error replies that say "not now" rather than "never": answered C{unavailable}.
_TRANSIENT = (
    "LOADING",
    "BUSY",
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "NOAUTH",
    "NOPERM",
    "MISCONF",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)

#: Presence entries registered (or re-registered) by one script call.
_CHUNK = 500
#: Entries of dead processes removed by one heartbeat, at most.
_REAP = 2000


# The URL


#: Seconds before registering again after Redis answered that it cannot serve yet.
_RETRY_REGISTER = 1.0


class RedisURLError(ValueError):
    """
    C{REDIS_URL} cannot be used. The message names the problem, never the password.
    """


@frozen
class RedisURL:
    """
    A parsed C{REDIS_URL}: C{redis://[user[:password]@]host[:port][/db]}, or
    C{rediss://} for TLS, which verifies the server's certificate against the platform's
    trust store, or the CA certificates of C{?ssl_ca_certs=/path/ca.pem}.

    The password is not part of the C{repr}, L{where} or L{redacted}.
    """

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    caFile: str | None = None

    def where(self) -> str:
        """C{host:port/db}: where Redis is, for log lines and errors."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.db}"

    def redacted(self) -> str:
        """The URL with the password replaced by C{***}."""
        credentials = ""
        if self.username is not None or self.password is not None:
            credentials = self.username or ""
            if self.password is not None:
                credentials += ":***"
            credentials += "@"
        query = "" if self.caFile is None else f"?ssl_ca_certs={self.caFile}"
        return f"{'rediss' if self.tls else 'redis'}://{credentials}{self.where()}{query}"


def parseRedisURL(text: str) -> RedisURL:
    """
    Parse C{REDIS_URL}.

    @raise RedisURLError: naming what is wrong, without echoing the URL (it may hold a
        password).
    """
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        raise RedisURLError(
            "REDIS_URL is not a URL: expected redis://[user:password@]host[:port][/db]"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(
            "REDIS_URL must start with redis:// (or rediss:// for TLS), "
            "as in redis://[user:password@]host[:port][/db]"
        )
    host = parts.hostname
    if not host:
        raise RedisURLError("REDIS_URL names no host: redis://host:6379/0")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise RedisURLError("REDIS_URL: the port must be a number from 1 to 65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisURLError("REDIS_URL: the path must be the database number (redis://host:6379/0)")
    caFile = None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "ssl_ca_certs" and value:
            caFile = value
        else:
            raise RedisURLError(
                f"REDIS_URL: unknown parameter {name!r}; the only one understood is "
                "ssl_ca_certs=/path/ca.pem (with rediss://)"
            )
    tls = parts.scheme == "rediss"
    if caFile is not None and not tls:
        raise RedisURLError("REDIS_URL: ssl_ca_certs needs rediss:// (TLS)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password == "":
        password = None
    return RedisURL(host, port, int(path or 0), username, password, tls, caFile)


class RedisUnavailable(Exception):
    """
    The broker could not start: Redis could not be reached, or refused the connection.
    The message names C{REDIS_URL} and where Redis is, never the password; C{problem}
    is the message without the setting's name.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"REDIS_URL (--redis-url): {problem}")
        self.problem = problem


# The scripts

_NOW = """
local now = redis.call('TIME')
local nowMs = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""

# An event, as kept in the history and published: [seq,time,channel,event,data]. Its
# seq and time in milliseconds, read without decoding the rest.
_ENTRY = """
local function seqAndMs(entry)
  local seq, s, us = string.match(entry, '^%[(%d+),(%d+)%.(%d+)')
  return tonumber(seq), tonumber(s) * 1000 + math.floor(tonumber(us) / 1000)
end
"""

# Where a channel with no seq key starts: above every seq of a channel whose key has
# expired. The floor hash keeps the highest seq published before the current period
# (floor), in the period before (old) and in the current one (cur), a period being the
# seq key's TTL; a key expires at least one period after its last publish, so its seq
# is in floor or old by then. Without the hash (a Redis that lost its data), the
# highest seq the calling process has seen.
_FLOOR = """
local function start(floorKey, ttl, seen)
  local f = redis.call('HMGET', floorKey, 'floor', 'old', 'cur', 'at')
  if not f[4] then return tonumber(seen) end
  local top = math.max(tonumber(f[1]), tonumber(f[2]))
  if ttl > 0 and nowMs - tonumber(f[4]) >= ttl then top = math.max(top, tonumber(f[3])) end
  return top
end
"""

#: KEYS: seq, history, floor, and the idempotency key if there is one.
#: ARGV: pub/sub channel, the event after its seq and time (',"channel","event",data]'),
#: history size, history age (ms), idempotency window (ms), seq TTL (ms, 0: none), the
#: highest seq the process has seen.
#: Answers {seq, 1 if a duplicate else 0}.
_PUBLISH = (
    _NOW
    + _ENTRY
    + """
local idempotency = KEYS[4]
if idempotency then
  local seen = redis.call('GET', idempotency)
  if seen then return {tonumber(seen), 1} end
end
local ttl = tonumber(ARGV[6])
local f = redis.call('HMGET', KEYS[3], 'floor', 'old', 'cur', 'at')
local floor, old, cur, at = tonumber(f[1]), tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
local dirty = false
if not at then
  floor, old, cur, at, dirty = tonumber(ARGV[7]), 0, 0, nowMs, true
end
if ttl > 0 and nowMs - at >= ttl then
  floor, old, cur, at, dirty = math.max(floor, old), cur, 0, nowMs, true
end
local seq = (tonumber(redis.call('GET', KEYS[1])) or math.max(floor, old)) + 1
if ttl > 0 then
  redis.call('SET', KEYS[1], seq, 'PX', ttl)
else
  redis.call('SET', KEYS[1], seq)
end
if seq > cur then cur, dirty = seq, true end
if dirty then
  redis.call('HSET', KEYS[3], 'floor', floor, 'old', old, 'cur', cur,
             'at', string.format('%d', at))
end
local message = '[' .. seq .. ',' .. now[1] .. '.' .. string.format('%06d', now[2]) .. ARGV[2]
local size, age = tonumber(ARGV[3]), tonumber(ARGV[4])
if size > 0 and age > 0 then
  redis.call('RPUSH', KEYS[2], message)
  redis.call('LTRIM', KEYS[2], -size, -1)
  while true do
    local head = redis.call('LINDEX', KEYS[2], 0)
    if not head then break end
    local _, ms = seqAndMs(head)
    if ms >= nowMs - age then break end
    redis.call('LPOP', KEYS[2])
  end
  redis.call('PEXPIRE', KEYS[2], age)
end
if idempotency then
  redis.call('SET', idempotency, seq, 'PX', ARGV[5])
end
redis.call('PUBLISH', ARGV[1], message)
return {seq, 0}
"""
)

#: KEYS: seq, history, floor. ARGV: since ('' for the position only), history age (ms),
#: seq TTL (ms), the highest seq the process has seen.
#: Answers {seq} for the position, else {seq, 1 if recovered, {events after since}}.
_READ = (
    _NOW
    + _ENTRY
    + _FLOOR
    + """
local top = tonumber(redis.call('GET', KEYS[1]))
local since = tonumber(ARGV[1])
if not top then
  top = start(KEYS[3], tonumber(ARGV[3]), ARGV[4])
  if not since then return {top} end
  return {top, since == top and 1 or 0, {}}
end
if not since then return {top} end
if since >= top then return {top, since == top and 1 or 0, {}} end
local horizon = nowMs - tonumber(ARGV[2])
local n = redis.call('LLEN', KEYS[2])
for i = 0, n - 1 do
  local oldest, ms = seqAndMs(redis.call('LINDEX', KEYS[2], i))
  if ms >= horizon then
    if since < oldest - 1 then return {top, 0, {}} end
    return {top, 1, redis.call('LRANGE', KEYS[2], i + since - oldest + 1, -1)}
  end
end
return {top, 0, {}}
"""
)

#: ARGV: operation, key prefix, this process's id, then the operation's arguments.
#: Keys are made here from the prefix: presence reaches keys no caller can name ahead
#: (the entries of dead processes), so this broker needs one Redis, not a Cluster.
_PRESENCE = (
    _NOW
    + """
local op, P, me = ARGV[1], ARGV[2], ARGV[3]
local procs = P .. 'procs'
local registry = P .. 'proc:' .. me

local function lease(pid)
  local score = redis.call('ZSCORE', procs, pid)
  return score ~= false and tonumber(score) >= nowMs
end
-- The caller is alive, whatever its lease says: a heartbeat is about to renew it.
local leases = {[me] = true}
local function alive(pid)
  local known = leases[pid]
  if known == nil then
    known = lease(pid)
    leases[pid] = known
  end
  return known
end

-- The connections of a hash (connection id -> process id) whose process is alive; the
-- others are removed on the way.
local function live(key)
  local fields = redis.call('HGETALL', key)
  local n = 0
  for i = 1, #fields, 2 do
    if alive(fields[i + 1]) then n = n + 1 else redis.call('HDEL', key, fields[i]) end
  end
  return n
end

local function connections(user) return P .. 'conns:' .. user end
local function members(channel) return P .. '{' .. channel .. '}:members' end
local function member(channel, user) return P .. '{' .. channel .. '}:member:' .. user end

-- An entry is {'c', user, connection} (online) or {'m', channel, user, connection}
-- (present on a channel); the registry of a process lists the entries it made.
local function register(e, pid, reg)
  if e[1] == 'c' then
    redis.call('HSET', connections(e[2]), e[3], pid)
  else
    redis.call('HSET', member(e[2], e[3]), e[4], pid)
    redis.call('SADD', members(e[2]), e[3])
  end
  redis.call('SADD', reg, cjson.encode(e))
end

local function unregister(e, pid)
  if e[1] == 'c' then
    local key = connections(e[2])
    if redis.call('HGET', key, e[3]) == pid then redis.call('HDEL', key, e[3]) end
  else
    local key = member(e[2], e[3])
    if redis.call('HGET', key, e[4]) == pid then redis.call('HDEL', key, e[4]) end
    if live(key) == 0 then redis.call('SREM', members(e[2]), e[3]) end
  end
end

local function clear(pid)
  local reg = P .. 'proc:' .. pid
  for _, e in ipairs(redis.call('SMEMBERS', reg)) do unregister(cjson.decode(e), pid) end
  redis.call('DEL', reg)
end

if op == 'add' then
  local user, conn = ARGV[4], ARGV[5]
  register({'c', user, conn}, me, registry)
  return live(connections(user))
elseif op == 'remove' then
  local user, conn = ARGV[4], ARGV[5]
  redis.call('HDEL', connections(user), conn)
  redis.call('SREM', registry, cjson.encode({'c', user, conn}))
  return live(connections(user))
elseif op == 'count' then
  return live(connections(ARGV[4]))
elseif op == 'online' then
  local result = {}
  for i = 4, #ARGV do result[#result + 1] = live(connections(ARGV[i])) > 0 and 1 or 0 end
  return result
elseif op == 'join' then
  local channel, user, conn = ARGV[4], ARGV[5], ARGV[6]
  local first = live(member(channel, user)) == 0
  register({'m', channel, user, conn}, me, registry)
  return first and 1 or 0
elseif op == 'leave' then
  local channel, user, conn = ARGV[4], ARGV[5], ARGV[6]
  local key = member(channel, user)
  if redis.call('HEXISTS', key, conn) == 0 then return 0 end
  redis.call('HDEL', key, conn)
  redis.call('SREM', registry, cjson.encode({'m', channel, user, conn}))
  if live(key) > 0 then return 0 end
  redis.call('SREM', members(channel), user)
  return 1
elseif op == 'members' then
  local channel = ARGV[4]
  local result = {}
  for _, user in ipairs(redis.call('SMEMBERS', members(channel))) do
    if live(member(channel, user)) > 0 then
      result[#result + 1] = user
    else
      redis.call('SREM', members(channel), user)
    end
  end
  return result
elseif op == 'heartbeat' then
  -- Renew this process's lease; remove what processes whose lease ran out registered.
  -- Answers 1 if the lease was still alive, 0 if it had run out (or never existed).
  local was = lease(me)
  redis.call('ZADD', procs, string.format('%d', nowMs + tonumber(ARGV[4])), me)
  local budget = tonumber(ARGV[5])
  local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', '(' .. string.format('%d', nowMs),
                          'LIMIT', 0, 10)
  for _, pid in ipairs(dead) do
    if budget <= 0 then break end
    local reg = P .. 'proc:' .. pid
    local batch = redis.call('SPOP', reg, budget)
    for _, e in ipairs(batch) do unregister(cjson.decode(e), pid) end
    budget = budget - #batch
    if redis.call('EXISTS', reg) == 0 then redis.call('ZREM', procs, pid) end
  end
  return was and 1 or 0
elseif op == 'resync' then
  -- Make Redis hold exactly this process's entries: the first call of a resync clears
  -- what was registered before, every call registers a chunk.
  if ARGV[4] == '1' then clear(me) end
  for i = 5, #ARGV do register(cjson.decode(ARGV[i]), me, registry) end
  return 1
elseif op == 'retire' then
  clear(me)
  redis.call('ZREM', procs, me)
  return 1
end
return redis.error_reply('unknown presence operation ' .. op)
"""
)


class _Script:
    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


_SCRIPTS = (
    PUBLISH := _Script("publish", _PUBLISH),
    READ := _Script("read", _READ),
    PRESENCE := _Script("presence", _PRESENCE),
)


# Connections


def _ready(protocol: Any) -> None:
    # What txredisapi's own connectionMade does once AUTH and SELECT have succeeded.
    protocol.connected = 1
    protocol._ready = True
    waiting, protocol._waiting_for_connect = protocol._waiting_for_connect, []
    for d in waiting:
        d.callback(protocol)


async def _handshake(protocol: Any) -> None:
    """
    AUTH, SELECT and CLIENT SETNAME, done here rather than by txredisapi: it stops
    reconnecting for good when AUTH or SELECT fails in any way, a timeout included, so
    a Redis slow to answer once would be given up for the life of the process.
    """
    factory = protocol.factory
    try:
        for command in factory.handshake:
            await protocol.execute_command(*command)
    except txredisapi.ResponseError as e:
        factory.refused(str(e))
        protocol.transport.loseConnection()
        return
    except Exception as e:  # noqa: BLE001 - lost or silent: ClientService tries again
        # connectionLost reports it (txredisapi has aborted a silent connection).
        protocol.problem = protocol.problem or str(e) or e.__class__.__name__
        if protocol.connected:
            protocol.transport.abortConnection()
        return
    _ready(protocol)


class _Handshaking:
    """
    Both connections' start: our own AUTH and SELECT (L{_handshake}), and a failure
    to get ready reported to the factory.
    """

    #: Why the connection could not be made ready, if it was not.
    problem = ""
    _ready: bool
    factory: Any

    def connectionMade(self) -> None:
        Deferred.fromCoroutine(_handshake(self))

    def connectionLost(self, why: Failure) -> None:
        if not self._ready:
            self.factory.failed(self.problem or why.getErrorMessage())
        super().connectionLost(why)  # type: ignore[misc]


class _CommandProtocol(_Handshaking, txredisapi.RedisProtocol):
    pass


class _SubscriberProtocol(_Handshaking, txredisapi.SubscriberProtocol):
    pass

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.onMessage(channel, message)


class _Factory(txredisapi.RedisFactory):
    """
    One connection (txredisapi's pool of one, reconnected by a ClientService) that
    reports when it is usable, lost, refused, or could not be made.
    """

    initialDelay = 0.5
    maxDelay = 5.0

    def __init__(
        self,
        protocol: type,
        handshake: list[tuple[str, ...]],
        timeout: float,
        onReady: Callable[[Any], None],
        onLost: Callable[[Any], None],
        onFailure: Callable[[str, bool], None],
        onMessage: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(
            None,
            None,
            1,
            isLazy=True,
            charset="utf-8",
            replyTimeout=timeout,
            convertNumbers=False,
        )
        self.protocol = protocol
        self.handshake = handshake
        self.onReady = onReady
        self.onLost = onLost
        self.onFailure = onFailure
        self.onMessage = onMessage

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.onReady(conn)

    def delConnection(self, conn: Any) -> None:
        known = conn in self.pool
        super().delConnection(conn)
        if known:
            self.onLost(conn)

    def refused(self, reason: str) -> None:
        self.onFailure(reason, True)

    def failed(self, reason: str) -> None:
        self.onFailure(reason, False)


@implementer(IStreamClientEndpoint)
class _NotingEndpoint:
    """Notes why a connection attempt failed, for the error L{RedisBroker.start} gives."""

    def __init__(self, endpoint: Any, note: Callable[[str, bool], None], where: str) -> None:
        self._endpoint = endpoint
        self._note = note
        self._where = where

    def __repr__(self) -> str:
        # ClientService names the endpoint in its "Scheduling retry" log lines.
        return f"<Redis at {self._where}>"

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.connect(protocolFactory)

        def failed(failure: Failure) -> Failure:
            self._note(failure.getErrorMessage(), False)
            return failure

        return d.addErrback(failed)


class _Watch:
    __slots__ = ("confirmed", "count", "waiters")

    def __init__(self) -> None:
        #: Watches made and not undone, the ones still waiting included.
        self.count = 0
        #: Redis confirmed the subscription on the current connection.
        self.confirmed = False
        self.waiters: list[Deferred[None]] = []


# The broker


@implementer(IBroker)
class RedisBroker:
    """
    L{IBroker} on Redis. Call L{start} before use and L{stop} at the end.

    @ivar publishes: publishes sent to Redis.
    @ivar publishRoundTrips: Redis commands those publishes took: one each (EVALSHA),
        two when Redis had forgotten the script (EVALSHA, then EVAL).
    @ivar roundTrips: every command sent on the command connection.
    @ivar reconnections: times delivery was interrupted and resumed (the handler of
        L{setReconnected} was called).
    """

    def __init__(
        self,
        url: str | RedisURL,
        reactor: Any,
        *,
        prefix: str = "mws:",
        historySize: int = 100,
        historyAge: float = 300.0,
        idempotencyWindow: float = 600.0,
        seqTTL: float = 7 * 86400.0,
        presenceRefresh: float = 30.0,
        presenceExpiry: float = 90.0,
        timeout: float = 5.0,
        startTimeout: float = 10.0,
    ) -> None:
        if historySize < 0 or historyAge < 0 or idempotencyWindow < 0 or seqTTL < 0:
            raise ValueError("history size and age, the idempotency window and seqTTL must be >= 0")
        if seqTTL and seqTTL < max(historyAge, idempotencyWindow):
            raise ValueError(
                "seqTTL must be 0 (never expire) or at least historyAge and idempotencyWindow"
            )
        if not 0 < presenceRefresh < presenceExpiry:
            raise ValueError("presenceRefresh must be > 0 and below presenceExpiry")
        if timeout <= 0 or startTimeout <= 0:
            raise ValueError("timeout and startTimeout must be > 0")
        if not prefix:
            raise ValueError("prefix must not be empty: it keeps the broker's keys apart")
        self.url = url if isinstance(url, RedisURL) else parseRedisURL(url)
        self._reactor = reactor
        self._registerRetry: Any = None
        self.prefix = prefix
        self.historySize = historySize
        self.historyAge = historyAge
        self.idempotencyWindow = idempotencyWindow
        self.seqTTL = seqTTL
        self.presenceRefresh = presenceRefresh
        self.presenceExpiry = presenceExpiry
        self.timeout = timeout
        self.startTimeout = startTimeout
        #: This process's name in Redis: its presence lease and registry.
        self.processId = secrets.token_hex(8)
        self.publishes = 0
        self.publishRoundTrips = 0
        self.roundTrips = 0
        self.reconnections = 0

        # Pub/sub ignores the database number: the names carry it, so deployments
        # sharing a Redis on different databases do not hear each other.
        self._eventsPrefix = f"{prefix}{self.url.db}:ev:"
        self._controlChannel = f"{prefix}{self.url.db}:control"
        self._floorKey = f"{prefix}floor"
        self._historyAgeMs = _ms(historyAge)
        self._idempotencyMs = _ms(idempotencyWindow)
        self._seqTTLMs = _ms(seqTTL)

        self._deliver: Delivery | None = None
        self._control: ControlHandler | None = None
        self._reconnected: Callable[[], None] | None = None
        self._watches: dict[str, _Watch] = {}
        # What this process has registered, to register again when Redis lost it.
        self._online: dict[str, set[str]] = {}
        self._present: dict[str, dict[str, set[str]]] = {}
        #: The highest seq seen: where channels start after Redis lost its data.
        self._highest = 0

        self._commands: _Factory | None = None
        self._subscriber: _Factory | None = None
        self._conn: Any = None
        self._sub: Any = None
        self._commandUp = False
        self._subscriberUp = False
        self._registering = False
        self._lost = False
        self._down = False
        self._stopping = False
        self._started = False
        self._starting: Deferred[None] | None = None
        self._startTimer: Any = None
        self._lastError = ""
        self._reported: set[str] = set()
        self._heartbeat = LoopingCall(lambda: Deferred.fromCoroutine(self._beat()))
        self._heartbeat.clock = reactor

    def __repr__(self) -> str:
        return f"<RedisBroker {self.url.redacted()} prefix={self.prefix!r}>"

    @property
    def available(self) -> bool:
        """Both connections are up: what C{/ready} reports."""
        return self._commandUp and self._subscriberUp

    # Life

    def start(self) -> Deferred[None]:
        """
        Connect. Fires once both connections are up, this process's presence lease is
        taken and the control channel subscribed.

        @raise RedisUnavailable: (the Deferred fails with it) when Redis refuses the
            credentials or the database, or cannot be reached within C{startTimeout}
            seconds. The broker has stopped by then.
        """
        assert self._starting is None, "start() once"
        starting: Deferred[None] = Deferred(self._cancelStart)
        self._starting = starting
        try:
            endpoint = self._endpoint()
        except OSError as e:
            self._stopping = True
            starting.errback(
                RedisUnavailable(f"cannot read ssl_ca_certs {self.url.caFile}: {e.strerror or e}")
            )
            return starting
        handshake: list[tuple[str, ...]] = []
        url = self.url
        if url.password is not None:
            handshake.append(
                ("AUTH", url.username, url.password) if url.username else ("AUTH", url.password)
            )
        name = ("CLIENT", "SETNAME", f"marketplace-ws:{self.processId}")
        commandHandshake = [*handshake, *([("SELECT", str(url.db))] if url.db else []), name]
        self._commands = _Factory(
            _CommandProtocol,
            commandHandshake,
            self.timeout,
            self._commandReady,
            self._commandLost,
            self._connectionFailed,
        )
        self._subscriber = _Factory(
            _SubscriberProtocol,
            [*handshake, name],
            self.timeout,
            self._subscriberReady,
            self._subscriberLost,
            self._connectionFailed,
            self._message,
        )
        self._commands.startConnecting(endpoint)
        self._subscriber.startConnecting(endpoint)
        self._startTimer = self._reactor.callLater(self.startTimeout, self._startTimedOut)
        return starting

    def _cancelStart(self, starting: Deferred[None]) -> None:
        self.stop()

    def _endpoint(self) -> Any:
        url = self.url
        endpoint: Any = HostnameEndpoint(self._reactor, url.host, url.port, timeout=self.timeout)
        if url.tls:
            if url.caFile is not None:
                with open(url.caFile, "rb") as f:
                    pem = f.read()
                # A bundle: every certificate in the file is trusted.
                marker = b"-----END CERTIFICATE-----"
                certificates = [
                    Certificate.loadPEM(block + marker)
                    for block in pem.split(marker)
                    if b"-----BEGIN CERTIFICATE-----" in block
                ]
                if not certificates:
                    raise OSError(f"no PEM certificate in {url.caFile}")
                trust: Any = trustRootFromCertificates(certificates)
            else:
                trust = platformTrust()
            endpoint = wrapClientTLS(optionsForClientTLS(url.host, trust), endpoint)
        return _NotingEndpoint(endpoint, self._connectionFailed, url.where())

    def _startTimedOut(self) -> None:
        self._startTimer = None
        problem = f"cannot reach Redis at {self.url.where()} within {self.startTimeout:g}s"
        if self._lastError:
            problem += f" ({self._lastError})"
        self._startFailed(problem)

    def _startFailed(self, problem: str) -> None:
        starting = self._starting
        if starting is None or starting.called or self._stopping:
            return
        self._starting = None
        error = RedisUnavailable(problem)
        self.stop().addBoth(lambda _: starting.errback(error))

    def _connectionFailed(self, reason: str, refused: bool) -> None:
        self._lastError = reason
        if not refused:
            return
        problem = f"Redis at {self.url.where()} refused the connection: {reason}"
        if not self._started:
            self._startFailed(problem)
        else:
            self._report(problem, error=True)

    def stop(self) -> Deferred[None]:
        """
        Withdraw this process's presence (its users' other connections stay counted)
        and disconnect.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._registerRetry is not None and self._registerRetry.active():
            self._registerRetry.cancel()
        if self._startTimer is not None and self._startTimer.active():
            self._startTimer.cancel()
        starting, self._starting = self._starting, None
        if starting is not None and not starting.called:
            starting.errback(CancelledError("stopped before Redis was reached"))
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._conn is not None and self._commandUp:
            try:
                await self._presence("retire")
            except Exception:  # noqa: BLE001 - leaving anyway: the lease runs out
                _log.warn("could not withdraw presence from Redis; it expires by itself")
        for factory in (self._commands, self._subscriber):
            if factory is not None:
                await factory.disconnect()
        self._conn = self._sub = None
        self._commandUp = self._subscriberUp = False
        for watch in self._watches.values():
            self._failWaiters(watch)
        self._watches.clear()

    def setReconnected(self, handler: Callable[[], None]) -> None:
        """
        After the subscriber connection was lost and made again, and every watched
        channel subscribed again, call C{handler()}: events published meanwhile were
        not delivered, and each subscriber must recover them from the history.
        """
        self._reconnected = handler

    # The command connection

    def _commandReady(self, conn: Any) -> None:
        self._conn = conn
        # Written now, before anything else can be sent on this connection, so every
        # EVALSHA after them finds its script.
        for script in _SCRIPTS:
            self.roundTrips += 1
            conn.execute_command("SCRIPT", "LOAD", script.source).addErrback(lambda f: None)
        Deferred.fromCoroutine(self._register(conn))
        if not self._heartbeat.running:
            self._heartbeat.start(self.presenceRefresh, now=False)

    async def _register(self, conn: Any) -> None:
        """
        Renew the lease and register this process's presence again, replacing what Redis
        holds of it: Redis may have lost it, or kept entries whose removal failed while
        it was away. Then the command connection is up.
        """
        if self._registering:
            return
        self._registering = True
        try:
            beat = Deferred.fromCoroutine(self._presence("heartbeat", *self._lease()))
            await gatherResults([beat, self._resync()], consumeErrors=True)
        except FirstError as e:
            self._lastError = problem = e.subFailure.getErrorMessage()
            transient = e.subFailure.check(OpError) and e.subFailure.value.code == UNAVAILABLE
            if transient and self._conn is conn and not self._stopping:
                # LOADING and the like, just after Redis restarted: a second from now,
                # not the next heartbeat (and not a failed start).
                if self._registerRetry is None or not self._registerRetry.active():
                    self._registerRetry = self._reactor.callLater(
                        _RETRY_REGISTER, self._retryRegister, conn
                    )
            elif self._conn is conn and not self._started:
                # Redis answered, and said no (permissions, memory): not worth waiting.
                self._startFailed(f"Redis at {self.url.where()} refused the broker: {problem}")
            else:
                _log.warn("registering presence in Redis failed: {error}", error=problem)
            return
        finally:
            self._registering = False
        if self._conn is not conn or self._stopping:
            return
        self._commandUp = True
        self._up()

    def _retryRegister(self, conn: Any) -> None:
        if self._conn is conn and not self._commandUp and not self._stopping:
            Deferred.fromCoroutine(self._register(conn))

    def _commandLost(self, conn: Any) -> None:
        if self._conn is conn:
            self._conn = None
            self._commandUp = False
            self._wentDown("command")

    def _lease(self) -> tuple[str, str]:
        return str(int(self.presenceExpiry * 1000)), str(_REAP)

    def _resync(self) -> Deferred[None]:
        """Register this process's presence again, replacing what Redis holds of it."""
        entries = [
            json.dumps(["c", user, conn]) for user, conns in self._online.items() for conn in conns
        ] + [
            json.dumps(["m", channel, user, conn])
            for channel, users in self._present.items()
            for user, conns in users.items()
            for conn in conns
        ]
        chunks = [entries[i : i + _CHUNK] for i in range(0, len(entries), _CHUNK)] or [[]]
        # Every chunk is written now, in order, before any later presence change.
        calls = [
            Deferred.fromCoroutine(self._presence("resync", "1" if i == 0 else "0", *chunk))
            for i, chunk in enumerate(chunks)
        ]
        done = gatherResults(calls, consumeErrors=True)
        return done.addCallbacks(lambda _: None, lambda f: f.value.subFailure)

    async def _beat(self) -> None:
        try:
            await self._renew()
        except Exception:  # noqa: BLE001 - the next beat tries again
            _log.failure("renewing this process's presence in Redis failed")

    async def _renew(self) -> None:
        if self._sub is not None:
            # A silent network would leave the subscriber connection looking alive: a
            # PING without its answer in time drops it, and it is made again.
            self._sub.execute_command("PING").addErrback(lambda f: None)
        if self._conn is None:
            return
        if not self._commandUp:
            await self._register(self._conn)
            return
        try:
            alive = await self._presence("heartbeat", *self._lease())
        except OpError:
            return
        if not alive and not self._stopping:
            _log.warn(
                "this process's presence lease had run out (stalled for more than "
                "{expiry}s?): registering its connections again",
                expiry=self.presenceExpiry,
            )
            try:
                await self._resync()
            except OpError:
                return

    # The subscriber connection

    def _subscriberReady(self, conn: Any) -> None:
        self._sub = conn
        Deferred.fromCoroutine(self._resubscribe(conn))

    async def _resubscribe(self, conn: Any) -> None:
        for channel, watch in list(self._watches.items()):
            self._subscribe(channel, watch)
        # Last: replies come in order, so once it is confirmed every channel is too.
        control = conn.execute_command("SUBSCRIBE", self._controlChannel)
        try:
            await control
        except Exception as e:  # noqa: BLE001 - lost again: the next connection retries
            self._lastError = str(e)
            _log.debug("subscribing to the control channel failed: {error}", error=str(e))
            return
        if self._sub is not conn or self._stopping:
            return
        self._subscriberUp = True
        self._up()

    def _subscriberLost(self, conn: Any) -> None:
        if self._sub is not conn:
            return
        self._sub = None
        if self._subscriberUp:
            # Delivered events may have been missed from now on.
            self._lost = True
        self._subscriberUp = False
        for channel, watch in list(self._watches.items()):
            watch.confirmed = False
            self._failWaiters(watch)
            if watch.count == 0:
                del self._watches[channel]
        self._wentDown("subscriber")

    def _subscribe(self, channel: str, watch: _Watch) -> None:
        d = self._sub.execute_command("SUBSCRIBE", self._eventsPrefix + channel)

        def confirmed(reply: Any) -> None:
            if self._watches.get(channel) is watch:
                watch.confirmed = True
                waiters, watch.waiters = watch.waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        def failed(failure: Failure) -> None:
            if self._watches.get(channel) is watch:
                self._failWaiters(watch)
                if watch.count == 0:
                    del self._watches[channel]

        d.addCallbacks(confirmed, failed)

    def _failWaiters(self, watch: _Watch) -> None:
        # A watch that failed never happened: the hub will not unwatch it.
        waiters, watch.waiters = watch.waiters, []
        watch.count -= len(waiters)
        for waiter in waiters:
            waiter.errback(self._unavailable())

    def _message(self, name: str, message: str) -> None:
        try:
            if name == self._controlChannel:
                kind, data = json.loads(message)
                if self._control is not None:
                    self._control(kind, data)
                return
            item = json.loads(message)
            seq = item[0]
            exclude = item[5] if len(item) > 5 else None
            event = Event(item[2], seq, item[3], item[4], float(item[1]), exclude)
        except Exception:  # noqa: BLE001 - one bad message must not stop the others
            _log.failure("handling a message from Redis on {name} failed", name=name)
            return
        if seq > self._highest:
            self._highest = seq
        if self._deliver is not None:
            try:
                self._deliver(event)
            except Exception:  # noqa: BLE001 - published and kept: the publisher must not retry
                _log.failure("delivering {channel} {seq} failed", channel=event.channel, seq=seq)

    # Both

    def _up(self) -> None:
        if not (self._commandUp and self._subscriberUp):
            return
        if self._down:
            self._down = False
            self._reported.clear()
            _log.info(
                "Redis at {where} reachable again: {count} channel(s) subscribed",
                where=self.url.where(),
                count=len(self._watches),
            )
        starting = self._starting
        if starting is not None and not self._started:
            self._started = True
            if self._startTimer is not None and self._startTimer.active():
                self._startTimer.cancel()
            self._startTimer = None
            starting.callback(None)
        if self._lost:
            self._lost = False
            self.reconnections += 1
            if self._reconnected is not None:
                try:
                    self._reconnected()
                except Exception:  # noqa: BLE001 - reported, and the broker goes on
                    _log.failure("the reconnection handler failed")

    def _wentDown(self, which: str) -> None:
        if self._stopping or not self._started:
            return
        if not self._down:
            self._down = True
            _log.warn(
                "lost the {which} connection to Redis at {where}: reconnecting; "
                "operations answer unavailable meanwhile",
                which=which,
                where=self.url.where(),
            )

    def _report(self, message: str, error: bool = False) -> None:
        if message in self._reported:
            return
        self._reported.add(message)
        if error:
            _log.error("{message}", message=message)
        else:
            _log.warn("{message}", message=message)

    def _unavailable(self) -> OpError:
        return OpError(UNAVAILABLE, "Redis is unreachable: retry with backoff")

    async def _eval(self, script: _Script, keys: tuple[str, ...], args: tuple[str, ...]) -> Any:
        """
        Run a script in one round trip (EVALSHA), or two when Redis has forgotten it.
        """
        conn = self._conn
        if conn is None:
            raise self._unavailable()
        self.roundTrips += 1
        try:
            return await conn.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except txredisapi.ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise self._refused(e) from None
        except txredisapi.ConnectionError:
            raise self._unavailable() from None
        # Redis restarted, or SCRIPT FLUSH: EVAL loads it again for the next EVALSHA.
        self.roundTrips += 1
        if script is PUBLISH:
            self.publishRoundTrips += 1
        try:
            return await conn.execute_command("EVAL", script.source, len(keys), *keys, *args)
        except txredisapi.ResponseError as e:
            raise self._refused(e) from None
        except txredisapi.ConnectionError:
            raise self._unavailable() from None

    def _refused(self, error: Exception) -> Exception:
        message = str(error)
        if message.startswith(_TRANSIENT):
            return OpError(UNAVAILABLE, f"Redis cannot serve this now ({message.split()[0]})")
        return error

    async def _presence(self, op: str, *args: str) -> Any:
        return await self._eval(PRESENCE, (), (op, self.prefix, self.processId, *args))

    # Delivery

    def setDelivery(self, deliver: Delivery) -> None:
        self._deliver = deliver

    def watch(self, channel: str) -> Deferred[None]:
        if self._sub is None:
            return _failed(self._unavailable())
        watch = self._watches.get(channel)
        if watch is None:
            watch = self._watches[channel] = _Watch()
            self._subscribe(channel, watch)
        watch.count += 1
        if watch.confirmed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        watch.waiters.append(waiter)
        return waiter

    def unwatch(self, channel: str) -> Deferred[None]:
        watch = self._watches.get(channel)
        if watch is None or watch.count <= 0:
            return succeed(None)
        watch.count -= 1
        if watch.count > 0:
            return succeed(None)
        del self._watches[channel]
        if self._sub is None:
            # Nothing is subscribed on a connection that is gone.
            return succeed(None)
        d = self._sub.execute_command("UNSUBSCRIBE", self._eventsPrefix + channel)
        return d.addCallbacks(lambda _: None, _connectionGone)

    # Publishing

    def publish(
        self, channel: str, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        return Deferred.fromCoroutine(self._publish(channel, event, data, idempotencyKey))

    async def _publish(
        self, channel: str, event: str, data: Any, idempotencyKey: str | None
    ) -> Published:
        tail = f",{json.dumps(channel)},{json.dumps(event)},{_dumps(data)}]"
        keys: tuple[str, ...] = (
            f"{self.prefix}{{{channel}}}:seq",
            f"{self.prefix}{{{channel}}}:hist",
            self._floorKey,
        )
        if idempotencyKey is not None and self.idempotencyWindow > 0:
            keys += (f"{self.prefix}{{{channel}}}:idem:{idempotencyKey}",)
        args = (
            self._eventsPrefix + channel,
            tail,
            str(self.historySize),
            self._historyAgeMs,
            self._idempotencyMs,
            self._seqTTLMs,
            str(self._highest),
        )
        if self._conn is None:
            raise self._unavailable()
        self.publishes += 1
        self.publishRoundTrips += 1
        seq, duplicate = await self._eval(PUBLISH, keys, args)
        if seq > self._highest:
            self._highest = seq
        return Published(channel, seq, duplicate=bool(duplicate))

    def broadcast(
        self, channel: str, event: str, data: Any, exclude: str | None = None
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._broadcast(channel, event, data, exclude))

    async def _broadcast(self, channel: str, event: str, data: Any, exclude: str | None) -> None:
        message = _dumps([0, self._reactor.seconds(), channel, event, data, exclude])
        await self._command("PUBLISH", self._eventsPrefix + channel, message)

    async def _command(self, *args: str) -> Any:
        conn = self._conn
        if conn is None:
            raise self._unavailable()
        self.roundTrips += 1
        try:
            return await conn.execute_command(*args)
        except txredisapi.ResponseError as e:
            raise self._refused(e) from None
        except txredisapi.ConnectionError:
            raise self._unavailable() from None

    # Reading

    def history(self, channel: str, since: int) -> Deferred[Recovery]:
        return Deferred.fromCoroutine(self._history(channel, since))

    async def _history(self, channel: str, since: int) -> Recovery:
        reply = await self._read(channel, str(since))
        top, recovered, entries = reply
        events = []
        for entry in entries:
            item = json.loads(entry)
            events.append(Event(item[2], item[0], item[3], item[4], float(item[1])))
        return Recovery(tuple(events), bool(recovered), top)

    def currentSeq(self, channel: str) -> Deferred[int]:
        return Deferred.fromCoroutine(self._currentSeq(channel))

    async def _currentSeq(self, channel: str) -> int:
        reply = await self._read(channel, "")
        return int(reply[0])

    async def _read(self, channel: str, since: str) -> Any:
        keys = (
            f"{self.prefix}{{{channel}}}:seq",
            f"{self.prefix}{{{channel}}}:hist",
            self._floorKey,
        )
        reply = await self._eval(
            READ, keys, (since, self._historyAgeMs, self._seqTTLMs, str(self._highest))
        )
        if reply[0] > self._highest:
            self._highest = reply[0]
        return reply

    # Presence

    def addPresence(self, userId: str, connectionId: str) -> Deferred[int]:
        # Kept here whatever Redis answers: a resync makes Redis agree.
        self._online.setdefault(userId, set()).add(connectionId)
        return Deferred.fromCoroutine(self._presence("add", userId, connectionId))

    def removePresence(self, userId: str, connectionId: str) -> Deferred[int]:
        connections = self._online.get(userId)
        if connections is not None:
            connections.discard(connectionId)
            if not connections:
                del self._online[userId]
        return Deferred.fromCoroutine(self._presence("remove", userId, connectionId))

    def connectionCount(self, userId: str) -> Deferred[int]:
        return Deferred.fromCoroutine(self._presence("count", userId))

    def online(self, userIds: Iterable[str]) -> Deferred[dict[str, bool]]:
        users = list(userIds)
        if not users:
            return succeed({})

        async def ask() -> dict[str, bool]:
            flags = await self._presence("online", *users)
            return {user: bool(flag) for user, flag in zip(users, flags, strict=True)}

        return Deferred.fromCoroutine(ask())

    def join(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        self._present.setdefault(channel, {}).setdefault(userId, set()).add(connectionId)

        async def ask() -> bool:
            return bool(await self._presence("join", channel, userId, connectionId))

        return Deferred.fromCoroutine(ask())

    def leave(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        users = self._present.get(channel)
        if users is not None and userId in users:
            users[userId].discard(connectionId)
            if not users[userId]:
                del users[userId]
                if not users:
                    del self._present[channel]

        async def ask() -> bool:
            return bool(await self._presence("leave", channel, userId, connectionId))

        return Deferred.fromCoroutine(ask())

    def members(self, channel: str) -> Deferred[list[str]]:
        async def ask() -> list[str]:
            return sorted(await self._presence("members", channel))

        return Deferred.fromCoroutine(ask())

    # Control

    def setControl(self, handler: ControlHandler) -> None:
        self._control = handler

    def control(self, kind: str, data: Mapping[str, Any]) -> Deferred[None]:
        message = _dumps([kind, dict(data)])

        async def send() -> None:
            await self._command("PUBLISH", self._controlChannel, message)

        return Deferred.fromCoroutine(send())


def _ms(seconds: float) -> str:
    # Never 0 for a duration that is not: Redis refuses an expiry of 0 ms.
    return str(max(1, round(seconds * 1000)) if seconds > 0 else 0)


def _dumps(value: Any) -> str:
    # ASCII: a lone surrogate in a string could not be sent as UTF-8.
    return json.dumps(value, separators=(",", ":"))


def _connectionGone(failure: Failure) -> None:
    # Subscriptions end with their connection.
    failure.trap(txredisapi.ConnectionError)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
