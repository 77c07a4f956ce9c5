"""
The deployment files say what the server needs: each is parsed here and its settings
checked against the server's own (the settings table, the exit status of a bad
setting, the ping interval). No Docker engine, no systemd and no nginx run here, so:

- the Dockerfile's install and start steps are run for real by C{.ci/check-dockerfile}
  (its parser is the one these tests use);
- the systemd units are checked with C{systemd-analyze verify}, and the socket unit's
  order and the service's endpoint indexes by starting the server under
  C{systemd-socket-activate} with the sockets the unit describes;
- nginx's configuration is read by a small parser of its block syntax.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import treq
import yaml
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from marketplace_ws.auth import mintToken
from marketplace_ws.client import connect
from marketplace_ws.config import BY_FLAG, SETTINGS, configFromOptions
from marketplace_ws.service import EX_CONFIG
from tests import pg
from tests.serverprocess import ServerProcess, baseEnvironment, binary

reactor: Any = _reactor
TOP = Path(__file__).resolve().parent.parent
SYSTEMD = TOP / "deploy" / "systemd"
SHUTDOWN_TIMEOUT = float(BY_FLAG["shutdown-timeout"].default or 0)
WS_PORT = int(BY_FLAG["ws-port"].default or 0)
HTTP_PORT = int(BY_FLAG["http-port"].default or 0)
#: Longest silence of a healthy connection: a ping every interval, a pong within timeout.
PING_SILENCE = float(BY_FLAG["ping-interval"].default or 0) + float(
    BY_FLAG["ping-timeout"].default or 0
)
SETTING_NAMES = {s.env for s in SETTINGS}
SECRETS = {s.env for s in SETTINGS if s.secret} | {"DATABASE_URL"}


def loadCheck() -> ModuleType:
    """C{.ci/check-dockerfile} as a module: its Dockerfile and .dockerignore parsers."""
    name = "check_dockerfile"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, str(TOP / ".ci" / "check-dockerfile"))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    loader.exec_module(module)
    return module


check = loadCheck()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- systemd units -------------------------------------------------------------------


Unit = dict[str, dict[str, list[str]]]


def parseUnit(text: str) -> Unit:
    """
    A unit file: section -> key -> every value given, in order. Keys repeat in units
    (ListenStream=, SystemCallFilter=, Environment=), so no value is dropped; an empty
    assignment resets the list, as systemd does.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{line!r} outside a section"
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def readUnit(name: str) -> Unit:
    return parseUnit((SYSTEMD / name).read_text())


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    if len(values) != 1:
        raise AssertionError(f"[{section}] {key}= has {len(values)} values: {values}")
    return values[0]


def seconds(text: str) -> float:
    """systemd and nginx time spans: 30, 30s, 1min, 1m, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        total += float(number) * units[unit]
    return total


def endpointArguments(execStart: str) -> dict[str, str]:
    """--ws-endpoint and --http-endpoint of an ExecStart= line."""
    argv = shlex.split(execStart)
    found = {}
    for flag in ("--ws-endpoint", "--http-endpoint"):
        found[flag] = argv[argv.index(flag) + 1]
    return found


# --- nginx ---------------------------------------------------------------------------


class Block:
    """One nginx directive: its name, its arguments and, for a block, its children."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.children: list[Block] = []

    def all(self, name: str) -> list[Block]:
        return [c for c in self.children if c.name == name]

    def first(self, name: str) -> Block:
        found = self.all(name)
        if not found:
            raise AssertionError(f"no {name} in {self.name} {' '.join(self.args)}")
        return found[0]

    def values(self, name: str) -> list[list[str]]:
        return [c.args for c in self.all(name)]


def parseNginx(text: str) -> Block:
    tokens = re.findall(
        r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};\"']+", re.sub(r"#[^\n]*", "", text)
    )
    root = Block("main", [])
    stack = [root]
    words: list[str] = []
    for token in tokens:
        if token == "{":
            block = Block(words[0], words[1:])
            stack[-1].children.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            stack.pop()
        elif token == ";":
            stack[-1].children.append(Block(words[0], words[1:]))
            words = []
        else:
            words.append(token.strip("\"'") if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "unbalanced nginx configuration"
    return root


def listenPorts(server: Block) -> set[int]:
    """The ports of a server block's listen directives (443, [::]:443, 10.0.0.5:8443)."""
    return {int(args[0].rpartition(":")[2]) for args in server.values("listen")}


def nginxConf() -> Block:
    return parseNginx((TOP / "deploy" / "nginx" / "marketplace-ws.conf").read_text())


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile() -> tuple[Any, Any]:
    """The builder and the runtime stages."""
    _, stages = check.parseDockerfile((TOP / "Dockerfile").read_text())
    return stages[0], stages[-1]


class DockerfileTests(SynchronousTestCase):
    def test_multiStage(self) -> None:
        """
        A builder stage on python:3.11/3.12-slim installs into a venv, and the runtime
        stage, on the same base, copies only that venv from it.
        """
        _, stages = check.parseDockerfile((TOP / "Dockerfile").read_text())
        self.assertGreaterEqual(len(stages), 2)
        builder, runtime = stages[0], stages[-1]
        for stage in (builder, runtime):
            self.assertRegex(stage.base, r"^python:3\.1[123]-slim")
        self.assertEqual(builder.base, runtime.base)
        self.assertTrue(builder.name)
        copies = [c.value for c in runtime.all("COPY")]
        self.assertEqual(copies, [f"--from={builder.name} $VENV $VENV"])

    def test_builderRunsInstallScript(self) -> None:
        """
        The builder's only RUN is deploy/install.sh, the script .ci/check-dockerfile
        runs too, so what CI proves is what the image build does.
        """
        builder, _ = dockerfile()
        self.assertEqual([r.value for r in builder.all("RUN")], ['sh deploy/install.sh "$VENV"'])
        self.assertTrue((TOP / "deploy" / "install.sh").is_file())
        self.assertIn(("WORKDIR", "/src"), [(i.keyword, i.value) for i in builder.instructions])

    def test_venvPathOnlyInVENV(self) -> None:
        """
        The venv's path is written once per stage, in ENV VENV=, so the check can
        relocate it; everything else says $VENV.
        """
        text = (TOP / "Dockerfile").read_text()
        for stage in dockerfile():
            for instruction in stage.instructions:
                if instruction.keyword == "ENV" and instruction.value.startswith("VENV="):
                    continue
                self.assertNotIn("/opt/marketplace-ws/venv", instruction.value)
        self.assertEqual(text.count("VENV=/opt/marketplace-ws/venv"), 2)

    def test_nonRootUser(self) -> None:
        """
        The runtime stage switches to a numeric non-root user before CMD (numeric, so
        an orchestrator can check runAsNonRoot), after the steps that need root.
        """
        _, runtime = dockerfile()
        keywords = [i.keyword for i in runtime.instructions]
        users = runtime.all("USER")
        self.assertEqual(len(users), 1)
        uid, _, gid = users[0].value.partition(":")
        self.assertTrue(uid.isdigit() and int(uid) > 0, users[0].value)
        self.assertTrue(gid.isdigit() and int(gid) > 0, users[0].value)
        userAt = keywords.index("USER")
        self.assertLess(userAt, keywords.index("CMD"))
        self.assertLess(max(i for i, k in enumerate(keywords) if k == "RUN"), userAt)
        creation = [r.value for r in runtime.all("RUN") if check.USER_SETUP.search(r.value)]
        self.assertEqual(len(creation), 1)
        self.assertIn(f"--uid {uid}", creation[0])

    def test_ports(self) -> None:
        """Both listeners' default ports are exposed."""
        _, runtime = dockerfile()
        exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.value.split()}
        self.assertEqual(exposed, {WS_PORT, HTTP_PORT})

    def test_productionAndNoSecrets(self) -> None:
        """
        The image runs in production mode and bakes in no secret: they come from the
        platform at run time.
        """
        env: dict[str, str] = {}
        for stage in dockerfile():
            for instruction in stage.all("ENV"):
                env.update(check.envPairs(instruction.value, env))
            for instruction in stage.all("ARG"):
                self.assertNotIn(instruction.value.partition("=")[0], SECRETS)
        self.assertEqual(env["MARKETPLACE_WS_ENV"], "production")
        self.assertFalse(SECRETS & env.keys(), sorted(SECRETS & env.keys()))
        self.assertFalse({k for k in env if k in SETTING_NAMES} - {"MARKETPLACE_WS_ENV"})

    def test_pluginCache(self) -> None:
        """
        Twisted's plugin cache is written at build time, in the runtime stage as root
        (before USER), and by deploy/install.sh.
        """
        _, runtime = dockerfile()
        step = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
        keywords = [i.keyword for i in runtime.instructions]
        at = [i for i, inst in enumerate(runtime.instructions) if step in inst.value]
        self.assertEqual(len(at), 1)
        self.assertEqual(keywords[at[0]], "RUN")
        self.assertLess(at[0], keywords.index("USER"))
        self.assertIn(step, (TOP / "deploy" / "install.sh").read_text())

    def test_cmdAndStop(self) -> None:
        """CMD runs the plugin in exec form (so SIGTERM reaches twist); STOPSIGNAL is TERM."""
        _, runtime = dockerfile()
        self.assertEqual(check.execForm(runtime.all("CMD")[-1].value), ["twist", "marketplace-ws"])
        self.assertEqual([s.value for s in runtime.all("STOPSIGNAL")], ["SIGTERM"])
        self.assertFalse(runtime.all("ENTRYPOINT"))

    def test_healthcheckShape(self) -> None:
        """
        HEALTHCHECK asks /health on the HTTP port with Python (no curl in slim images),
        within a timeout shorter than its interval.
        """
        _, runtime = dockerfile()
        options, argv = check.healthcheck(runtime)
        self.assertEqual(argv[0], "python")
        self.assertIn("/health", argv[-1])
        self.assertIn("HTTP_PORT", argv[-1])
        self.assertIn(f"'{HTTP_PORT}'", argv[-1])
        self.assertLess(seconds(options["timeout"]), seconds(options["interval"]))
        self.assertGreaterEqual(seconds(options["start-period"]), 30)


class Health(Resource):
    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.code if request.path == b"/health" else 404)
        return b"{}"


class HealthcheckCommandTests(TestCase):
    """The HEALTHCHECK command itself, against an HTTP server that answers as told."""

    async def healthcheck(self, code: int, env: dict[str, str] | None = None) -> int:
        port = reactor.listenTCP(0, Site(Health(code)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        _, runtime = dockerfile()
        _, argv = check.healthcheck(runtime)
        environment = {"HTTP_PORT": str(port.getHost().port), **(env or {})}
        _, _, status = await getProcessOutputAndValue(sys.executable, argv[1:], env=environment)
        return int(status)

    async def test_passesOn200(self) -> None:
        self.assertEqual(await self.healthcheck(200), 0)

    async def test_failsOtherwise(self) -> None:
        self.assertNotEqual(await self.healthcheck(503), 0)

    async def test_ignoresProxies(self) -> None:
        """An HTTP proxy in the container's environment does not capture the check."""
        proxy = f"http://127.0.0.1:{freePort()}"
        self.assertEqual(await self.healthcheck(200, {"http_proxy": proxy, "HTTP_PROXY": proxy}), 0)


class CheckParserTests(SynchronousTestCase):
    """The pieces of .ci/check-dockerfile that stand in for Docker."""

    def test_continuationsAndComments(self) -> None:
        text = 'FROM a AS b\n# c\nRUN one \\\n  # inside\n  two\nENV X=1 \\\n    Y="$X 2"\n'
        _, stages = check.parseDockerfile(text)
        self.assertEqual(
            [(i.keyword, i.value) for i in stages[0].instructions],
            [("RUN", "one two"), ("ENV", 'X=1 Y="$X 2"')],
        )

    def test_envPairsSeeOnlyEarlierInstructions(self) -> None:
        """As in Docker, the pairs of one ENV see the environment before it."""
        self.assertEqual(
            check.envPairs('A=1 B="$A/x" PATH="$V/bin:$PATH"', {"A": "0", "V": "/v", "PATH": "/p"}),
            [("A", "1"), ("B", "0/x"), ("PATH", "/v/bin:/p")],
        )

    def test_dockerIgnoreRules(self) -> None:
        ignore = check.DockerIgnore.parse("*\n!src\n**/__pycache__\n!src/keep/__pycache__\n")
        self.assertTrue(ignore.excluded("tests/x.py"))
        self.assertTrue(ignore.excluded(".git"))
        self.assertFalse(ignore.excluded("src/a/b.py"))
        self.assertTrue(ignore.excluded("src/a/__pycache__/b.pyc"))
        self.assertFalse(ignore.excluded("src/keep/__pycache__/b.pyc"))
        self.assertTrue(ignore.mayReincludeInside("src"))
        self.assertFalse(ignore.mayReincludeInside("tests"))


class DockerIgnoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ignore = check.DockerIgnore.parse((TOP / ".dockerignore").read_text())

    def test_excludesWorkingState(self) -> None:
        for path in [
            ".git/HEAD",
            ".tox/tests/bin/python",
            ".venv/bin/python",
            "venv/bin/python",
            ".marketplace-ws/secrets.json",
            ".marketplace-ws/postgres/PG_VERSION",
            "src/marketplace_ws/__pycache__/config.cpython-311.pyc",
            "build/lib/x.py",
            "dist/marketplace_ws-0.1.0-py3-none-any.whl",
            "src/marketplace_ws.egg-info/PKG-INFO",
            "twisted/plugins/dropin.cache",
            "_trial_temp/test.log",
            ".hypothesis/examples/x",
            ".mypy_cache/x",
            ".coverage",
            "tests/test_config.py",
        ]:
            self.assertTrue(self.ignore.excluded(path), path)

    def test_includesWhatTheWheelIsBuiltFrom(self) -> None:
        """
        Every file the wheel is built from reaches the context: the build metadata, the
        README setup.cfg reads, the package with its SQL, the plugin, the install script.
        """
        needed = ["setup.cfg", "pyproject.toml", "README.rst", "deploy/install.sh"]
        for top in ("src", "twisted"):
            for path in (TOP / top).rglob("*"):
                if (
                    path.is_file()
                    and "__pycache__" not in path.parts
                    and not any(p.endswith(".egg-info") for p in path.parts)
                    and path.name != "dropin.cache"
                ):
                    needed.append(str(path.relative_to(TOP)))
        self.assertIn("src/marketplace_ws/db/sql/0001_initial.sql", needed)
        for relative in needed:
            self.assertFalse(self.ignore.excluded(relative), relative)
        for reference in re.findall(r"file:\s*(\S+)", (TOP / "setup.cfg").read_text()):
            self.assertFalse(self.ignore.excluded(reference), reference)


# --- Render, Railway --------------------------------------------------------------


class RenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.blueprint = yaml.safe_load((TOP / "render.yaml").read_text())
        services = self.blueprint["services"]
        [self.web] = [s for s in services if s["type"] == "web"]
        self.env = {e["key"]: e for e in self.web["envVars"]}

    def test_dockerWebService(self) -> None:
        self.assertEqual(self.web["runtime"], "docker")
        self.assertTrue((TOP / self.web["dockerfilePath"]).is_file())
        self.assertEqual(self.web["healthCheckPath"], "/health")
        self.assertNotEqual(self.web.get("plan"), "free")  # a sleeping service drops sockets

    def test_values(self) -> None:
        """
        Every variable is a setting of the server (or Render's PORT), and literal values
        are strings: YAML would turn true into a boolean Render may render as "True".
        """
        for key, entry in self.env.items():
            self.assertIn(key, SETTING_NAMES | {"PORT"})
            if "value" in entry:
                self.assertIsInstance(entry["value"], str, key)
        self.assertEqual(self.env["MARKETPLACE_WS_ENV"]["value"], "production")
        self.assertEqual(self.env["MARKETPLACE_WS_MIGRATE"]["value"], "true")

    def test_publicPortIsTheWebSocketPort(self) -> None:
        """
        Render routes its public traffic (and its health check) to PORT: both listeners
        share it, so /health and the API answer there and WebSockets upgrade there.
        """
        self.assertEqual(self.env["PORT"]["value"], self.env["WS_PORT"]["value"])
        self.assertEqual(self.env["HTTP_PORT"]["value"], self.env["WS_PORT"]["value"])
        options = {
            "ws-port": self.env["WS_PORT"]["value"],
            "http-port": self.env["HTTP_PORT"]["value"],
        }
        self.assertTrue(configFromOptions(options, {}).sharedPort)

    def test_databaseAndRedisWired(self) -> None:
        databases = {d["name"]: d for d in self.blueprint["databases"]}
        source = self.env["DATABASE_URL"]["fromDatabase"]
        self.assertIn(source["name"], databases)
        self.assertEqual(source["property"], "connectionString")
        redis = self.env["REDIS_URL"]["fromService"]
        self.assertEqual(redis["type"], "keyvalue")
        self.assertEqual(redis["property"], "connectionString")
        [keyvalue] = [s for s in self.blueprint["services"] if s["name"] == redis["name"]]
        self.assertEqual(keyvalue["type"], "keyvalue")
        self.assertIn("ipAllowList", keyvalue)  # required by Render
        self.assertEqual(keyvalue.get("maxmemoryPolicy"), "noeviction")
        regions = {s.get("region") for s in [self.web, keyvalue, *databases.values()]}
        self.assertEqual(len(regions), 1, "the private network needs one region")

    def test_secretsNeverWritten(self) -> None:
        """
        Secrets are generated by Render or asked for once (sync: false), never in the
        file; JWT_SECRET is asked for because the Next.js app must hold the same one.
        """
        for key in SECRETS & self.env.keys():
            self.assertNotIn("value", self.env[key], key)
        self.assertIs(self.env["JWT_SECRET"].get("sync"), False)
        self.assertIs(self.env["HTTP_API_SECRET"].get("generateValue"), True)

    def test_shutdownDelay(self) -> None:
        delay = self.web["maxShutdownDelaySeconds"]
        self.assertGreater(delay, float(self.env["SHUTDOWN_TIMEOUT"]["value"]))
        self.assertLessEqual(delay, 300)


class RailwayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = tomllib.loads((TOP / "railway.toml").read_text())

    def test_build(self) -> None:
        self.assertEqual(self.config["build"]["builder"], "DOCKERFILE")
        self.assertTrue((TOP / self.config["build"]["dockerfilePath"]).is_file())

    def test_deploy(self) -> None:
        deploy = self.config["deploy"]
        self.assertEqual(deploy["healthcheckPath"], "/health")
        self.assertEqual(deploy["restartPolicyType"], "ON_FAILURE")
        self.assertIsInstance(deploy["restartPolicyMaxRetries"], int)
        # Railway's parser wants numbers here; its default drain is 0 s.
        self.assertIsInstance(deploy["drainingSeconds"], int)
        self.assertGreater(deploy["drainingSeconds"], SHUTDOWN_TIMEOUT)

    def test_preDeployMigrates(self) -> None:
        """The pre-deploy command is the installed migrate command."""
        [command] = self.config["deploy"]["preDeployCommand"]
        script, subcommand = command.split()
        self.assertIn(f"{script} = ", (TOP / "setup.cfg").read_text())
        from marketplace_ws.cli import Options

        self.assertIn(subcommand, [entry[0] for entry in cast(list[Any], Options.subCommands)])


# --- systemd -------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
    "Environment": "MARKETPLACE_WS_ENV=production",
}


class SystemdUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = readUnit("marketplace-ws.service")
        self.socket = readUnit("marketplace-ws.socket")
        self.template = readUnit("marketplace-ws@.service")

    def test_hardening(self) -> None:
        """Both services run unprivileged, confined, and stop and restart sanely."""
        for unit in (self.service, self.template):
            for key, value in HARDENING.items():
                self.assertEqual(one(unit, "Service", key), value, key)
            self.assertTrue(
                one(unit, "Service", "DynamicUser") == "yes" or unit["Service"].get("User")
            )
            families = set(" ".join(unit["Service"]["RestrictAddressFamilies"]).split())
            self.assertEqual(families, {"AF_INET", "AF_INET6", "AF_UNIX"})
            self.assertEqual(unit["Service"]["CapabilityBoundingSet"], [])
            self.assertGreaterEqual(int(one(unit, "Service", "LimitNOFILE")), 65536)
            self.assertIn(str(EX_CONFIG), one(unit, "Service", "RestartPreventExitStatus").split())
            self.assertGreater(seconds(one(unit, "Service", "TimeoutStopSec")), SHUTDOWN_TIMEOUT)
            self.assertTrue(any(f.startswith("/etc/") for f in unit["Service"]["EnvironmentFile"]))
            # cffi callbacks (pyOpenSSL) need W+X memory: TLS fails under W^X.
            self.assertEqual(one(unit, "Service", "MemoryDenyWriteExecute"), "no")

    def test_sameConfinement(self) -> None:
        """The template confines its processes exactly as the single service does."""
        shared = [
            k
            for k in self.service["Service"]
            if k not in {"ExecStart", "ExecStartPre", "EnvironmentFile"}
        ]
        for key in shared:
            self.assertEqual(self.template["Service"].get(key), self.service["Service"][key], key)

    def test_runsThePlugin(self) -> None:
        for unit in (self.service, self.template):
            argv = shlex.split(one(unit, "Service", "ExecStart"))
            self.assertTrue(argv[0].startswith("/") and argv[0].endswith("/bin/twist"))
            self.assertEqual(argv[1], "marketplace-ws")

    def test_socketActivation(self) -> None:
        """
        Two listening sockets in one unit, IPv4 literals since the service adopts them
        as domain=INET, and the service takes index 0 for WebSockets and 1 for HTTP.
        """
        listens = self.socket["Socket"]["ListenStream"]
        self.assertEqual(len(listens), 2)
        endpoints = endpointArguments(one(self.service, "Service", "ExecStart"))
        self.assertEqual(endpoints["--ws-endpoint"], "systemd:domain=INET:index=0")
        self.assertEqual(endpoints["--http-endpoint"], "systemd:domain=INET:index=1")
        ports = []
        for listen in listens:
            host, _, port = listen.rpartition(":")
            self.assertIsInstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
            ports.append(int(port))
        self.assertEqual(ports, [WS_PORT, HTTP_PORT])
        self.assertIn("marketplace-ws.socket", one(self.service, "Unit", "Requires"))
        self.assertNotIn("PartOf", self.socket["Unit"])  # a restart keeps the sockets
        self.assertEqual(one(self.socket, "Install", "WantedBy"), "sockets.target")

    def test_templatePorts(self) -> None:
        """Instance NN listens on loopback, 80NN for WebSockets and 81NN for HTTP."""
        endpoints = endpointArguments(one(self.template, "Service", "ExecStart"))
        self.assertEqual(endpoints["--ws-endpoint"], "tcp:80%i:interface=127.0.0.1")
        self.assertEqual(endpoints["--http-endpoint"], "tcp:81%i:interface=127.0.0.1")

    def test_templateRequiresRedis(self) -> None:
        """
        Without REDIS_URL the instance refuses to start, with exit status 78, and the
        URL is read by the shell ($$), never expanded onto a command line.
        """
        [pre] = self.template["Service"]["ExecStartPre"]
        self.assertIn('"$${REDIS_URL}"', pre)
        self.assertIn(f"exit {EX_CONFIG}", pre)
        argv = shlex.split(pre)
        script = argv[2].replace("$$", "$").replace("%i", "01")
        env = {"PATH": os.environ["PATH"]}
        result = subprocess.run([argv[0], argv[1], script], env=env, capture_output=True)
        self.assertEqual(result.returncode, EX_CONFIG)
        self.assertIn(b"REDIS_URL is required", result.stderr)
        env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
        self.assertEqual(subprocess.run([argv[0], argv[1], script], env=env).returncode, 0)

    def test_environmentExample(self) -> None:
        """
        The example environment file names only real settings, leaves every secret
        empty, and keeps the shutdown inside TimeoutStopSec.
        """
        values = {}
        for line in (SYSTEMD / "marketplace-ws.env.example").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, sep, value = line.partition("=")
                self.assertTrue(sep, line)
                self.assertIn(key, SETTING_NAMES)
                values[key] = value
        for secret in SECRETS:
            self.assertEqual(values.get(secret, ""), "", secret)
        self.assertEqual(values["MARKETPLACE_WS_ENV"], "production")
        self.assertLess(
            float(values["SHUTDOWN_TIMEOUT"]),
            seconds(one(self.service, "Service", "TimeoutStopSec")),
        )

    def test_systemdAnalyze(self) -> None:
        """
        systemd itself accepts the units (with ExecStart= pointed at this venv's twist,
        since verify checks that the binary exists), and rates them well confined.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in ("marketplace-ws.socket", "marketplace-ws.service", "marketplace-ws@.service"):
            text = (SYSTEMD / name).read_text()
            text = text.replace("/opt/marketplace-ws/venv/bin/twist", binary("twist"))
            (directory / name).write_text(text)
        shutil.copy(directory / "marketplace-ws@.service", directory / "marketplace-ws@01.service")
        units = ["marketplace-ws.socket", "marketplace-ws.service", "marketplace-ws@01.service"]
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *[f"./{u}" for u in units]],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        self.assertEqual((verify.returncode, verify.stdout + verify.stderr), (0, ""))
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "./marketplace-ws.service"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        assert level is not None, security.stdout + security.stderr
        self.assertLess(float(level.group(1)), 2.0)


class SocketActivationTests(TestCase):
    """
    The service unit's command, started the way the socket unit starts it: sockets
    bound by someone else, in the unit's order, adopted by index.
    """

    timeout = 60

    async def firstRequest(self, url: str) -> Any:
        for _ in range(200):
            try:
                return await treq.get(url, persistent=False)
            except ConnectionRefusedError:
                await deferLater(reactor, 0.05)
        raise AssertionError(f"{url}: connection refused for 10 s")

    async def test_adoptsTheSocketsInOrder(self) -> None:
        service = readUnit("marketplace-ws.service")
        socketUnit = readUnit("marketplace-ws.socket")
        argv = shlex.split(one(service, "Service", "ExecStart"))
        wsPort, httpPort = freePort(), freePort()
        listens = [f"127.0.0.1:{port}" for port in (wsPort, httpPort)]
        self.assertEqual(len(listens), len(socketUnit["Socket"]["ListenStream"]))
        secret = "s" * 40
        env = baseEnvironment(
            {
                **dict(e.split("=", 1) for e in service["Service"]["Environment"]),
                "DATABASE_URL": pg.database_url(),
                "DATABASE_SCHEMA": pg.fresh_schema(self),
                "MARKETPLACE_WS_MIGRATE": "true",
                "JWT_SECRET": secret,
                "HTTP_API_SECRET": "a" * 40,
            }
        )
        tool = shutil.which("systemd-socket-activate")
        self.assertIsNotNone(tool, "systemd-socket-activate (Debian package systemd) is missing")
        assert tool is not None
        # systemd names each descriptor after its socket unit (LISTEN_FDNAMES), and
        # Twisted ignores descriptors that come without names.
        command = [
            tool,
            *[f"--listen={listen}" for listen in listens],
            "--fdname=marketplace-ws.socket:marketplace-ws.socket",
            *[f"--setenv={key}" for key in sorted(env) if key != "PATH"],
            binary("twist"),
            *argv[1:],
        ]
        process = ServerProcess()
        reactor.spawnProcess(process, tool, command, env=env)

        def stop() -> Deferred[int]:
            if not process.ended.called:
                process.signal(signal.SIGKILL)
            return process.ended

        self.addCleanup(stop)
        # The first connection makes systemd-socket-activate start the server, as a
        # socket unit does; it waits in the backlog meanwhile. (Until the tool has
        # bound the sockets, connections are refused: try again.)
        first = Deferred.fromCoroutine(self.firstRequest(f"http://127.0.0.1:{httpPort}/health"))
        await process.ready
        response = await first
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content())["status"], "ok")
        client = await connect(f"ws://127.0.0.1:{wsPort}/", mintToken(secret, "socket-user"))
        self.assertEqual(client.welcome["userId"], "socket-user")
        await client.close()
        process.signal(signal.SIGTERM)
        self.assertEqual(await process.ended, 0)


# --- nginx ---------------------------------------------------------------------------


class NginxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.conf = nginxConf()
        self.servers = self.conf.all("server")
        [self.public] = [s for s in self.servers if 443 in listenPorts(s)]
        [self.api] = [
            s
            for s in self.servers
            if s is not self.public and any("ssl" in a for a in s.values("listen"))
        ]

    def test_upgrade(self) -> None:
        """WebSocket upgrades pass through, with the client's address forwarded."""
        [mapping] = self.conf.all("map")
        self.assertEqual(mapping.args, ["$http_upgrade", "$connection_upgrade"])
        location = next(loc for loc in self.public.all("location") if loc.args == ["/"])
        self.assertEqual(location.values("proxy_http_version"), [["1.1"]])
        headers = {tuple(v) for v in location.values("proxy_set_header")}
        self.assertIn(("Upgrade", "$http_upgrade"), headers)
        self.assertIn(("Connection", "$connection_upgrade"), headers)
        self.assertIn(("X-Forwarded-For", "$proxy_add_x_forwarded_for"), headers)
        self.assertEqual(location.values("proxy_pass"), [["http://marketplace_ws"]])

    def test_timeoutsOutlastPings(self) -> None:
        """A healthy but quiet connection is never cut by the proxy between two pings."""
        location = next(loc for loc in self.public.all("location") if loc.args == ["/"])
        for name in ("proxy_read_timeout", "proxy_send_timeout"):
            [[value]] = location.values(name)
            self.assertGreater(seconds(value), PING_SILENCE * 1.5, name)

    def test_upstreamsMatchTheTemplate(self) -> None:
        """The upstreams list marketplace-ws@NN's ports: 80NN and 81NN, NN from 01."""
        upstreams = {u.args[0]: u for u in self.conf.all("upstream")}
        for name, prefix in (("marketplace_ws", "80"), ("marketplace_ws_api", "81")):
            ports = [s[0].rpartition(":")[2] for s in upstreams[name].values("server")]
            self.assertEqual(ports, [f"{prefix}{n:02d}" for n in range(1, len(ports) + 1)])
            for server in upstreams[name].values("server"):
                self.assertTrue(server[0].startswith("127.0.0.1:"))
        balancing = {u.name for u in upstreams["marketplace_ws"].children} & {
            "hash",
            "least_conn",
            "ip_hash",
        }
        self.assertTrue(balancing)

    def test_tls(self) -> None:
        for server in (self.public, self.api):
            self.assertTrue(server.all("ssl_certificate"))
            self.assertTrue(server.all("ssl_certificate_key"))
        [redirect] = [s for s in self.servers if s not in (self.public, self.api)]
        self.assertEqual(redirect.values("return")[0][0], "301")

    def test_apiIsPrivate(self) -> None:
        """
        The HTTP API is on its own port, for private addresses only, and never reached
        through the public server block (which forwards only / and /health).
        """
        allowed = [a[0] for a in self.api.values("allow")]
        self.assertEqual(self.api.values("deny"), [["all"]])
        for network in allowed:
            self.assertTrue(ipaddress.ip_network(network).is_private, network)
        self.assertEqual(
            {p[0] for loc in self.api.all("location") for p in loc.values("proxy_pass")},
            {"http://marketplace_ws_api"},
        )
        self.assertFalse(listenPorts(self.public) & listenPorts(self.api))
        for location in self.public.all("location"):
            if location.values("proxy_pass") == [["http://marketplace_ws_api"]]:
                self.assertEqual(location.args, ["=", "/health"])

    def test_noTokensInAccessLogs(self) -> None:
        """
        Access log lines leave the query string out: browsers may send ?token=.
        """
        formats = {f.args[0]: " ".join(f.args[1:]) for f in self.conf.all("log_format")}
        for server in self.servers:
            for log in server.values("access_log"):
                self.assertEqual(len(log), 2, log)
                line = formats[log[1]]
                for variable in ("$request ", "$request_uri", "$args", "$query_string"):
                    self.assertNotIn(variable, line + " ")
