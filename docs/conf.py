"""Sphinx configuration: the docs are plain reStructuredText, built by ``tox -e docs``."""

project = "marketplace-ws"
author = "the marketplace-ws engineers"
extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "marketplace-ws"
# Every warning fails the build (tox -e docs runs sphinx-build -W).
nitpicky = False
