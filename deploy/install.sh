#!/bin/sh
# Install marketplace-ws from this source tree into a new virtual environment:
#
#     deploy/install.sh VENV
#
# Run from the top of the source tree (the Docker build context). It builds the wheel
# (never an editable install: that is what `pip install .` users get too), installs it
# with its dependencies into VENV, and writes Twisted's plugin cache, so a server run
# later by a user who cannot write to VENV never tries to.
#
# The Dockerfile's builder stage runs exactly this script, and .ci/check-dockerfile runs
# it in a fresh venv on the CI machine: the two cannot drift apart.
set -eu

venv=${1:?usage: deploy/install.sh VENV}
if [ -e "$venv" ]; then
    # pip would keep an installed marketplace-ws of the same version, and a half-updated
    # venv under a running server is worse than a new one: install beside it and switch.
    echo "install.sh: $venv exists; install into a new directory (then point a symlink at it)" >&2
    exit 1
fi
python=${PYTHON:-python3}
dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT

"$python" -m venv "$venv"
# The wheel is built in pip's isolated build environment (setuptools from
# pyproject.toml), so the venv itself gets no build tools.
"$venv/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$dist" .
"$venv/bin/python" -m pip install --quiet "$dist"/marketplace_ws-*.whl

# twisted/plugins/dropin.cache is written next to the plugin the first time anything
# lists plugins (`twist` does, at every start), and rewritten whenever a plugin file is
# newer than it. Write it now, as the owner of VENV. -I keeps the current directory off
# sys.path: run from a source tree, it would add that tree's twisted/plugins too.
"$venv/bin/python" -I -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
"$venv/bin/python" -I - <<'PY'
import pickle
from pathlib import Path

import twisted.plugins

# Every plugin directory must have a cache at least as new as its modules, holding
# our plugin: otherwise the server's first start would try to rewrite it.
for directory in map(Path, twisted.plugins.__path__):
    modules = [p for p in directory.glob("*.py") if p.name != "__init__.py"]
    if not modules:
        continue
    cache = directory / "dropin.cache"
    newest = max(p.stat().st_mtime for p in modules)
    if not cache.is_file() or cache.stat().st_mtime <= newest:
        raise SystemExit(f"install.sh: {cache} is missing or older than the plugins beside it")
    if (directory / "marketplace_ws_plugin.py").exists():
        with cache.open("rb") as f:
            if "marketplace_ws_plugin" not in pickle.load(f):
                raise SystemExit(f"install.sh: {cache} does not list marketplace_ws_plugin")
        print(f"install.sh: plugin cache {cache}")
PY
