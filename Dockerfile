# syntax=docker/dockerfile:1
# The DAARION gateway: docker build -t daarion-gateway . && docker run -p 80:8080 -p 443:8443 daarion-gateway
#
# The official python images are built with --enable-optimizations and --with-lto (PGO+LTO),
# which is worth about 20 % of throughput for this workload over a default CPython build.
#
# The image runs the locked versions (requirements/runtime.txt, checked by hash), the same ones
# CI tests; scripts/lock rewrites the lock files.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements/build.txt requirements/runtime.txt ./requirements/
# The pinned pip and build backend, then wheels of exactly the locked runtime set (a layer
# that only a lock change rebuilds).
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The gateway's own wheel, built with that backend; its dependencies are the locked wheels above.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL com.daarion.service="gateway" \
      com.daarion.tier="edge" \
      com.daarion.phase="mvp" \
      org.opencontainers.image.title="daarion-gateway" \
      org.opencontainers.image.description="The public entry of a DAARION node"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/daarion/routes.yaml
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /wheels /wheels
# Only those wheels, nothing resolved here; pip check confirms they satisfy the gateway's ranges.
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-index --no-deps /wheels/*.whl \
    && pip check && rm -rf /wheels
COPY routes.yaml /etc/daarion/routes.yaml
# ACME's account key and certificates (tls.acme.storage): a volume, so that a new container
# reuses them instead of ordering again (Let's Encrypt limits how often one may).
RUN install -d -o gateway -g gateway -m 0700 /var/lib/daarion-gateway/acme
VOLUME ["/var/lib/daarion-gateway"]
USER gateway
# Plain HTTP (ACME's http-01 challenges, redirects) and HTTPS; publish them as 80 and 443
# (-p 80:8080 -p 443:8443; GATEWAY_TLS=true turns HTTPS on: see .env.example).
EXPOSE 8080 8443
STOPSIGNAL SIGTERM
# The standards' health check: every 30 s, 10 s timeout, 3 retries, 40 s start period.
# (No curl in the slim image: the gateway's own command probes /health.)
HEALTHCHECK --interval=30s --timeout=10s --retries=3 --start-period=40s \
    CMD ["daarion-gateway", "healthcheck", "--timeout", "8"]
ENTRYPOINT ["daarion-gateway"]
CMD ["serve"]
