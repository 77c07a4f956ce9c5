# syntax=docker/dockerfile:1
#
# marketplace-ws: the real-time WebSocket server of the marketplace.
#
#     docker build -t marketplace-ws .
#     docker run --rm -p 8080:8080 -p 8081:8081 \
#         -e DATABASE_URL=... -e JWT_SECRET=... -e HTTP_API_SECRET=... \
#         --stop-timeout 20 marketplace-ws
#
# The builder stage builds the wheel and installs it into a venv with
# deploy/install.sh; the runtime stage copies only that venv. .ci/check-dockerfile runs
# the same install script, the plugin-cache step and the CMD and HEALTHCHECK below in
# a clean venv on the CI machine (no Docker engine there), so what CI proves is what
# this file does. Keep the venv's path in $VENV only: the check relocates it.
#
# No secret is baked in: DATABASE_URL, JWT_SECRET, HTTP_API_SECRET and REDIS_URL come
# from the platform at run time; without them the server refuses to start (exit 78).
#
# Ports: 8080 WebSocket clients (the public one), 8081 the HTTP API for the Next.js
# backend plus /health, /ready and /metrics (keep it on a private network). The image
# does not read PORT: set WS_PORT / HTTP_PORT, and point the platform's PORT (where
# it has one) at the port its health check should reach; see render.yaml and
# railway.toml.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ENV VENV=/opt/marketplace-ws/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# .dockerignore lets in only what the wheel is built from.
COPY . .
RUN sh deploy/install.sh "$VENV"


FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV VENV=/opt/marketplace-ws/venv
COPY --from=builder $VENV $VENV
ENV PATH="$VENV/bin:$PATH" \
    MARKETPLACE_WS_ENV=production \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Written again after the copy, as root, so the cache is newer than the plugin files
# whatever timestamps COPY gave them: the server, running as a user who cannot write
# here, must find it fresh or it would try (and log a failure) at every start.
RUN python -I -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && test -s "$(python -I -c 'import os, twisted.plugins as p; print(os.path.join(p.__path__[0], "dropin.cache"))')"
# A fixed numeric id, so orchestrators can check runAsNonRoot; it owns nothing, the
# venv stays root's and read-only to it.
RUN groupadd --system --gid 10001 marketplace-ws \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin marketplace-ws
WORKDIR /opt/marketplace-ws
USER 10001:10001

EXPOSE 8080 8081
# Liveness from inside the container, on the HTTP port. Slim images have no curl, and
# ProxyHandler({}) keeps an HTTP(S)_PROXY in the environment from capturing a loopback
# request.
# With TLS_CERT set the listeners speak TLS: the check then uses https, without
# verifying (it asks 127.0.0.1, which the certificate does not name).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-I", "-c", "import os, ssl, urllib.request as u; e = os.environ.get; u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ssl._create_unverified_context())).open('%s://127.0.0.1:%s/health' % ('https' if e('TLS_CERT') else 'http', e('HTTP_PORT') or '8081'), timeout=4)"]
# On SIGTERM the server stops accepting, closes WebSockets with 1001 and exits 0 within
# SHUTDOWN_TIMEOUT (10 s): give it more than that (docker stop -t 20,
# stop_grace_period: 20s in Compose).
STOPSIGNAL SIGTERM
CMD ["twist", "marketplace-ws"]
