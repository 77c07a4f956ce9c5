"""
Run the Autobahn|Testsuite (wstest, fuzzingclient mode) against marketplace-ws.

    python autobahn/run.py --cases quick     # cases 1-7 and 10, production limits
    python autobahn/run.py --cases full      # every case, 9.* (16 MiB) and 12/13.* too

Run by ``tox -e autobahn`` and ``tox -e autobahn-full``, with the package installed in
the running interpreter. The testsuite runs only on Python 2.7: this script finds a 2.7
interpreter (``$AUTOBAHN_PYTHON2``, ``python2.7`` or ``python2`` on PATH, pyenv's
``~/.pyenv/versions/2.7.*``), makes or reuses a virtualenv with the pinned testsuite
(``autobahn/requirements-py27.txt``), starts ``twist marketplace-ws --conformance`` on a
free 127.0.0.1 port, runs the suite, stops the server with SIGTERM and reads the
report's ``index.json``.

Exit status: 0 when every case is OK, NON-STRICT or INFORMATIONAL; 1 when any case is
anything else (FAILED, UNCLEAN, WRONG CODE, UNIMPLEMENTED, in behavior or
behaviorClose) or the run itself went wrong; 3 when no Python 2.7 interpreter exists.
A missing interpreter is never a silent skip, in CI or outside it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
REQUIREMENTS = HERE / "requirements-py27.txt"
#: The last virtualenv that runs on, and makes environments for, Python 2.7.
VIRTUALENV = "virtualenv==20.15.1"

#: Results that pass. Everything else (FAILED, UNCLEAN, WRONG CODE, UNIMPLEMENTED)
#: fails the run.
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
ORDER = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "WRONG CODE", "UNCLEAN", "FAILED")

MIB = 1024 * 1024

#: Per selection: its spec file, the server flags it needs beyond the production
#: defaults, the sections it must report, and how long wstest may take.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "spec": HERE / "fuzzingclient.json",
        # Production limits (64 KiB frames and messages): cases 1-7 and 10 fit them.
        "flags": [],
        "sections": {1, 2, 3, 4, 5, 6, 7, 10},
        "timeout": 600,
    },
    "full": {
        "spec": HERE / "fuzzingclient-full.json",
        # 9.1.6/9.2.6 send 16 MiB in one frame and one message.
        # 12.* and 13.* need permessage-deflate, which is off by default.
        "flags": [
            "--max-message-size",
            str(16 * MIB),
            "--max-frame-size",
            str(16 * MIB),
            "--permessage-deflate",
            "true",
        ],
        "sections": {1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13},
        "timeout": 3600,
    },
}

#: Flags every run passes: no server pings in the middle of a case (they would be
#: extra frames in the test's traffic), listeners on loopback only.
COMMON_FLAGS = ["--conformance", "--ping-interval", "0"]

#: Environment variables of the server's settings; removed from the server's
#: environment so a developer's shell cannot change what is tested.
SETTING_PREFIXES = ("WS_", "HTTP_", "MARKETPLACE_WS_", "DATABASE_", "JWT_", "JWKS_")
SETTING_NAMES = ("ALLOWED_ORIGINS", "SHUTDOWN_TIMEOUT")


class RunError(Exception):
    """The run could not be done; the message says why."""


def say(line: str = "") -> None:
    print(line, flush=True)


def inCI() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# -- Python 2.7 -----------------------------------------------------------------------


def python2Environ() -> dict[str, str]:
    """The environment for Python 2.7 processes: nothing of this Python 3 venv."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_PYTHON_VERSION_WARNING"] = "1"
    return env


def isPython27(candidate: str) -> bool:
    try:
        done = subprocess.run(
            [candidate, "-c", "import sys; sys.stdout.write('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            env=python2Environ(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "2.7"


def pyenvCandidates() -> list[str]:
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"), "/root/.pyenv"]
    found: list[str] = []
    for root in dict.fromkeys(r for r in roots if r):
        found.extend(glob.glob(os.path.join(root, "versions", "2.7.*", "bin", "python")))

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(n) for n in re.findall(r"\d+", name))

    return sorted(set(found), key=version, reverse=True)


LOOKED_AT = (
    "$AUTOBAHN_PYTHON2, python2.7 and python2 on PATH, "
    "$PYENV_ROOT/versions/2.7.*/bin/python and ~/.pyenv/versions/2.7.*/bin/python"
)


def findPython2() -> str | None:
    explicit = os.environ.get("AUTOBAHN_PYTHON2")
    if explicit:
        if isPython27(explicit):
            return explicit
        raise RunError(f"AUTOBAHN_PYTHON2={explicit} is not a working Python 2.7 interpreter")
    candidates = [shutil.which(n) for n in ("python2.7", "python2")] + pyenvCandidates()
    for candidate in candidates:
        # A pyenv shim is on PATH even when 2.7 is not the selected version, and then
        # fails: every candidate is run, not just found.
        if candidate and isPython27(candidate):
            return candidate
    return None


def missingPython2() -> int:
    lines = [
        "autobahn: no Python 2.7 interpreter found, so the WebSocket conformance suite "
        "did NOT run.",
        f"autobahn: looked at {LOOKED_AT}.",
        "autobahn: the Autobahn testsuite (wstest) runs only on Python 2.7. Get one with",
        "autobahn:     pyenv install 2.7.18",
        "autobahn: or, where the distribution still has it (Debian 11, Ubuntu 22.04 and",
        "autobahn: older; not Debian 12 or later):",
        "autobahn:     apt-get install python2.7 python2.7-dev",
        "autobahn: or set AUTOBAHN_PYTHON2 to its path. A C compiler is needed too (wsaccel).",
    ]
    if inCI():
        lines.append("autobahn: CI is set: the conformance suite is required in CI; failing.")
    else:
        lines.append("autobahn: not skipping silently: exiting with status 3.")
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    say("autobahn: 0 passed, 1 failed")
    return 3


# -- the Python 2.7 virtualenv --------------------------------------------------------


def stampOf(python2: str) -> str:
    digest = hashlib.sha256()
    digest.update(REQUIREMENTS.read_bytes())
    digest.update(os.path.realpath(python2).encode())
    digest.update(VIRTUALENV.encode())
    return digest.hexdigest()


def runLogged(command: list[str], what: str, env: dict[str, str], timeout: float) -> None:
    try:
        done = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise RunError(f"{what} took more than {timeout:.0f} s") from e
    if done.returncode != 0:
        # pip's "location is ignored" notes for local index folders are noise.
        output = "\n".join(
            line for line in done.stdout.splitlines() if "is ignored: it is neither" not in line
        )
        raise RunError(f"{what} failed (exit {done.returncode}):\n{output[-6000:]}")


def ensureVenv(python2: str, venv: Path) -> Path:
    """Make or reuse the virtualenv with the pinned testsuite; return its wstest."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    stampFile = venv / ".marketplace-ws-autobahn"
    wstest = venv / "bin" / "wstest"
    stamp = stampOf(python2)
    lockPath = venv.parent / (venv.name + ".lock")
    with open(lockPath, "w") as lock:
        # tox -e autobahn and autobahn-full running at once share this virtualenv.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if wstest.exists() and stampFile.exists() and stampFile.read_text().strip() == stamp:
            say(f"autobahn: reusing {venv}")
            return wstest
        if venv.exists():
            if not (stampFile.exists() or (venv / "pyvenv.cfg").exists()):
                raise RunError(f"{venv} exists and is not a virtualenv made by this script")
            shutil.rmtree(venv)
        started = time.monotonic()
        say(f"autobahn: making a Python 2.7 virtualenv in {venv} with {python2}")
        env = python2Environ()
        virtualenv = [python2, "-m", "virtualenv"]
        probe = subprocess.run([*virtualenv, "--version"], capture_output=True, env=env, timeout=60)
        if probe.returncode != 0:
            # No virtualenv for 2.7: install the last one that supports it into a
            # folder beside the venv, not into the interpreter.
            bootstrap = venv.parent / (venv.name + "-virtualenv")
            if not (bootstrap / "virtualenv").is_dir():
                runLogged(
                    [
                        python2,
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--target",
                        str(bootstrap),
                        VIRTUALENV,
                    ],
                    f"installing {VIRTUALENV} for {python2} (it needs pip: "
                    f"'{python2} -m ensurepip' gives it)",
                    env,
                    300,
                )
            env = dict(env, PYTHONPATH=str(bootstrap))
        runLogged([*virtualenv, "--quiet", str(venv)], "virtualenv", env, 300)
        runLogged(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-r",
                str(REQUIREMENTS),
            ],
            f"pip install -r {REQUIREMENTS.relative_to(TOP)} (wsaccel needs gcc and the "
            "Python 2.7 headers)",
            python2Environ(),
            900,
        )
        if not wstest.exists():
            raise RunError(f"{wstest} is missing after the install")
        stampFile.write_text(stamp + "\n")
        say(f"autobahn: virtualenv ready in {time.monotonic() - started:.0f} s")
        return wstest


# -- the server -----------------------------------------------------------------------


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serverEnviron() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(SETTING_PREFIXES) or name in SETTING_NAMES:
            del env[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def startServer(port: int, flags: list[str], dataDir: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "twisted", "marketplace-ws",
        *COMMON_FLAGS,
        "--ws-endpoint", f"tcp:{port}:interface=127.0.0.1",
        "--http-endpoint", "tcp:0:interface=127.0.0.1",
        # Conformance mode needs no secrets, but development defaults are still made:
        # keep them out of the working tree.
        "--data-dir", str(dataDir),
        *flags,
    ]  # fmt: skip
    say("autobahn: server: " + " ".join(command[1:]))
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=serverEnviron(), cwd=dataDir,
        )  # fmt: skip


def logTail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_bytes().replace(b"\x1e", b"").decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def waitForServer(server: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RunError(
                f"the server exited with status {server.returncode} before accepting "
                f"connections; its log ({log}) ends:\n{logTail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RunError(f"the server did not accept connections within {timeout:.0f} s:\n{logTail(log)}")


def stopServer(server: subprocess.Popen[bytes], log: Path) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            say(f"autobahn: WARNING: the server ignored SIGTERM for 30 s; killing pid {server.pid}")
            server.kill()
            server.wait()
            return
    if server.returncode != 0:
        say(
            f"autobahn: WARNING: the server exited with status {server.returncode} after "
            f"SIGTERM; its log ({log}) ends:\n{logTail(log, 10)}"
        )


# -- the report -----------------------------------------------------------------------


def caseKey(caseId: str) -> tuple[int, ...]:
    return tuple(int(n) for n in caseId.split("."))


def outcome(result: dict[str, Any]) -> str:
    """The worse of behavior and behaviorClose."""
    states = [result.get("behavior", "MISSING"), result.get("behaviorClose", "MISSING")]
    return max(states, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))


def clearReport(outdir: Path) -> None:
    """Remove a previous run's report files (only those) so none is read by mistake."""
    if not outdir.is_dir():
        return
    for pattern in ("index.html", "index.json", "*_case_*.html", "*_case_*.json",
                    "server.log", "wstest.log", "spec.json"):  # fmt: skip
        for path in outdir.glob(pattern):
            path.unlink()


def failureDetail(outdir: Path, caseId: str, result: dict[str, Any]) -> list[str]:
    lines = [
        f"  {caseId}: behavior {result.get('behavior')}, close {result.get('behaviorClose')}, "
        f"remote close code {result.get('remoteCloseCode')}"
    ]
    try:
        case = json.loads((outdir / result["reportfile"]).read_text())
    except (OSError, KeyError, ValueError):
        return lines
    lines.append("    case: " + " ".join(str(case.get("description", "")).split())[:400])
    lines.append("    expected: " + " ".join(str(case.get("expectation", "")).split())[:300])
    lines.append(f"    result: {case.get('result')}")
    lines.append(f"    close: {case.get('resultClose')}")
    if result.get("behavior") not in PASSING:
        lines.append(f"    expected events: {json.dumps(case.get('expected'))[:300]}")
        lines.append(f"    received events: {json.dumps(case.get('received'))[:300]}")
    if case.get("remoteCloseReason"):
        lines.append(f"    server's close reason: {case['remoteCloseReason']!r}")
    if not case.get("wasClean"):
        lines.append(f"    not clean: {case.get('wasNotCleanReason')}")
    lines.append(f"    report: {outdir / result['reportfile'].replace('.json', '.html')}")
    return lines


def summarize(outdir: Path, sections: set[int]) -> tuple[int, int]:
    index = outdir / "index.json"
    try:
        agents = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"no readable report index {index}: {e}") from e
    results: dict[str, dict[str, Any]] = agents.get("marketplace-ws", {})
    if not results:
        raise RunError(f"{index} has no results for agent marketplace-ws")

    bySection: dict[int, Counter[str]] = {}
    failures: list[str] = []
    for caseId in sorted(results, key=caseKey):
        result = results[caseId]
        state = outcome(result)
        bySection.setdefault(caseKey(caseId)[0], Counter())[state] += 1
        if state not in PASSING:
            failures.extend(failureDetail(outdir, caseId, result))

    for section in sorted(bySection):
        counts = bySection[section]
        text = ", ".join(
            f"{counts[s]} {s}"
            for s in sorted(counts, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
        )
        say(f"{section}.*: {text}")
    missing = sorted(sections - set(bySection))
    if missing:
        failures.append("  sections with no result: " + ", ".join(f"{s}.*" for s in missing))
    if failures:
        say("autobahn: cases that did not pass (OK, NON-STRICT and INFORMATIONAL pass):")
        for line in failures:
            say(line)
    passed = sum(c[s] for c in bySection.values() for s in PASSING)
    failed = sum(sum(c.values()) for c in bySection.values()) - passed
    if missing and not failed:
        failed = len(missing)
    say(f"autobahn: HTML report {outdir / 'index.html'}")
    return passed, failed


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--cases", choices=sorted(PROFILES), default="quick")
    parser.add_argument(
        "--venv",
        type=Path,
        default=TOP / ".tox" / "autobahn-py27",
        help="the Python 2.7 virtualenv to make or reuse (%(default)s)",
    )
    parser.add_argument(
        "--outdir", type=Path, help="report folder (default: the spec's outdir, from the top)"
    )
    parser.add_argument("--timeout", type=float, help="seconds wstest may run")
    args = parser.parse_args(argv)
    profile = PROFILES[args.cases]
    started = time.monotonic()

    try:
        python2 = findPython2()
    except RunError as e:
        print(f"autobahn: {e}", file=sys.stderr, flush=True)
        return missingPython2()
    if python2 is None:
        return missingPython2()

    spec = json.loads(Path(profile["spec"]).read_text())
    outdir = args.outdir or Path(spec["outdir"])
    if not outdir.is_absolute():
        outdir = TOP / outdir
    outdir = outdir.resolve()

    try:
        wstest = ensureVenv(python2, args.venv.resolve())
        outdir.mkdir(parents=True, exist_ok=True)
        clearReport(outdir)
        port = freePort()
        spec["outdir"] = str(outdir)
        for server in spec["servers"]:
            server["url"] = f"ws://127.0.0.1:{port}"
        specFile = outdir / "spec.json"
        specFile.write_text(json.dumps(spec, indent=4) + "\n")

        serverLog = outdir / "server.log"
        wstestLog = outdir / "wstest.log"
        with tempfile.TemporaryDirectory(prefix="marketplace-ws-autobahn-") as dataDir:
            server = startServer(port, profile["flags"], Path(dataDir), serverLog)
            try:
                waitForServer(server, port, serverLog, 60)
                timeout = args.timeout or profile["timeout"]
                say(
                    f"autobahn: wstest -m fuzzingclient, cases {', '.join(spec['cases'])} "
                    f"(log: {wstestLog})"
                )
                caseStarted = time.monotonic()
                with open(wstestLog, "wb") as out:
                    suite = subprocess.Popen(
                        [str(wstest), "-m", "fuzzingclient", "-s", str(specFile)],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        env=dict(python2Environ(), PYTHONUNBUFFERED="1"), cwd=outdir,
                    )  # fmt: skip
                    try:
                        suite.wait(timeout=timeout)
                    except subprocess.TimeoutExpired as e:
                        suite.kill()
                        suite.wait()
                        raise RunError(
                            f"wstest ran longer than {timeout:.0f} s; its log ends:\n"
                            f"{logTail(wstestLog)}"
                        ) from e
                say(f"autobahn: suite ran in {time.monotonic() - caseStarted:.0f} s")
                if server.poll() is not None:
                    raise RunError(
                        f"the server exited during the suite (status {server.returncode}); "
                        f"its log ends:\n{logTail(serverLog)}"
                    )
            finally:
                stopServer(server, serverLog)
        if suite.returncode != 0:
            raise RunError(
                f"wstest exited with status {suite.returncode}; its log ends:\n{logTail(wstestLog)}"
            )
        passed, failed = summarize(outdir, profile["sections"])
    except RunError as e:
        say(f"autobahn: ERROR: {e}")
        say("autobahn: the run did not complete")
        say("autobahn: 0 passed, 1 failed")
        return 1

    say(f"autobahn: {args.cases} run took {time.monotonic() - started:.0f} s")
    say(f"autobahn: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
