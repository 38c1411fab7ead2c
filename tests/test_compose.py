"""docker-compose.yml, without a Docker engine: valid against the Compose Specification's JSON
Schema (tests/data/compose-spec.json), and by the node standards' conventions (names, labels,
network, volumes, health checks, only the gateway's ports published); every variable it and
the image read is in .env.example, and the gateway it describes is the one routes.yaml gives
with those values."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import load_config

from .helpers import ROOT, SHIPPED, SHIPPED_ENV

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
HEALTHCHECK = {"interval": "30s", "timeout": "10s", "retries": 3, "start_period": "40s"}
# Compose's interpolation (the Compose Specification, "Interpolation"): $$, ${VAR},
# ${VAR:-default} / ${VAR-default}, ${VAR:?error} / ${VAR?error}, ${VAR:+alt} / ${VAR+alt}.
COMPOSE_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)"
)
ROUTES_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
# What the gateway's code reads from the environment besides routes.yaml (the command line's
# GATEWAY_CONFIG, GATEWAY_WORKERS, GATEWAY_LOG_LEVEL): found in the source, so that a new one
# must be added to .env.example too.
CODE_VAR = re.compile(r"""(?:environ\.get|getenv|environ\[)\(?\s*["']([A-Z][A-Z0-9_]*)["']""")
# Read by the code but set by the operating system, not by the stack: the user's runtime
# directory (where the pid file goes by default).
PLATFORM_VARS = {"XDG_RUNTIME_DIR"}
CLI_VARS = {
    name
    for path in (ROOT / "gateway").rglob("*.py")
    if "demo" not in path.relative_to(ROOT / "gateway").parts  # the demo's own, not the stack's
    for name in CODE_VAR.findall(path.read_text())
} - PLATFORM_VARS


def env_file(path: Path) -> dict[str, str]:
    """A file as `docker run --env-file` reads it: KEY=VALUE lines taken literally, # comments."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), line
            out[key] = value
    return out


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        unset = name not in env
        empty = unset or env[name] == ""
        missing = empty if op and op.startswith(":") else unset
        if op in (":-", "-"):
            return arg if missing else env[name]
        if op in (":?", "?"):
            if missing:
                raise ValueError(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return "" if missing else arg
        return env.get(name, "")

    return COMPOSE_VAR.sub(repl, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as `docker compose` sees it with .env made from .env.example."""
    env = {**env_file(ENV_EXAMPLE), "JWT_SECRET": SHIPPED_ENV["JWT_SECRET"]}
    data: dict[str, Any] = interpolate(raw, env)
    return data


def test_the_file_is_valid_by_the_compose_specification(raw, compose):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for data in (raw, compose):  # as written, and with the variables filled in
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert errors == []


def test_the_schema_rejects_what_compose_would():
    # The vendored schema is a real check, not one that takes anything.
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    assert list(validator.iter_errors({"services": {"gateway": {"imagee": "x"}}}))
    assert list(validator.iter_errors({"services": {"gateway": {"ports": {"80": 8080}}}}))
    assert list(validator.iter_errors({"services": {"gateway": {"networks": "daarion_net"}}}))


def test_services_follow_the_standards_naming_and_labels(compose):
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["container_name"] == f"daarion-{name}", name
        labels = service["labels"]
        assert labels["com.daarion.service"] == name
        assert {"com.daarion.service", "com.daarion.tier", "com.daarion.phase"} <= set(labels)
        assert all(isinstance(v, str) and v for v in labels.values())
        networks = service["networks"]
        assert list(networks) == ["daarion_net"], name
    assert services["gateway"]["labels"]["com.daarion.tier"] == "edge"
    # The monitoring pair runs only with --profile monitoring; gateway and redis always.
    assert "profiles" not in services["gateway"]
    assert "profiles" not in services["redis"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert compose["networks"] == {
        "daarion_net": {
            "name": "daarion_net",
            "driver": "bridge",
            "ipam": {"config": [{"subnet": "172.30.0.0/24"}]},
        }
    }


def test_the_image_labels_agree_with_the_compose_labels(compose):
    dockerfile = (ROOT / "Dockerfile").read_text()
    for key, value in compose["services"]["gateway"]["labels"].items():
        assert f'{key}="{value}"' in dockerfile


def test_volumes_are_named_service_data_and_mounted(compose):
    volumes = compose["volumes"]
    assert set(volumes) == {"redis_data", "gateway_data", "prometheus_data", "grafana_data"}
    for name, volume in volumes.items():
        assert volume == {"name": name}  # exactly <service>_data, no project prefix
        assert name.removesuffix("_data") in compose["services"]
    services = compose["services"]
    assert "redis_data:/data" in services["redis"]["volumes"]
    # ACME's account and certificates: the image's VOLUME, where ACME_STORAGE points.
    assert "gateway_data:/var/lib/daarion-gateway" in services["gateway"]["volumes"]
    assert 'VOLUME ["/var/lib/daarion-gateway"]' in (ROOT / "Dockerfile").read_text()
    storage = services["gateway"]["environment"]["ACME_STORAGE"]
    assert storage.startswith("/var/lib/daarion-gateway/")
    for service in services.values():  # every file a bind mount names is in the repository
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), mount


def test_only_the_gateway_publishes_ports_and_they_are_80_and_443(compose):
    published = {name: s["ports"] for name, s in compose["services"].items() if "ports" in s}
    assert published == {"gateway": ["80:8080", "443:8443"]}
    gateway = compose["services"]["gateway"]
    # The container ports are the listeners routes.yaml gets; the admin one is not published.
    environment = gateway["environment"]
    assert (environment["GATEWAY_PORT"], environment["GATEWAY_TLS_PORT"]) == ("8080", "8443")
    assert gateway["expose"] == [environment["GATEWAY_ADMIN_PORT"]]
    assert "EXPOSE 8080 8443" in (ROOT / "Dockerfile").read_text()


def test_health_checks_are_the_standards(compose):
    for name, service in compose["services"].items():
        check = service["healthcheck"]
        assert {k: check[k] for k in HEALTHCHECK} == HEALTHCHECK, name
        assert check["test"][0] == "CMD", name
    # The gateway's is the image's own HEALTHCHECK command.
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_check = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert image_check is not None
    assert compose["services"]["gateway"]["healthcheck"]["test"] == [
        "CMD",
        *json.loads(image_check.group(1)),
    ]
    assert compose["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_every_variable_read_is_in_env_example(raw):
    assert {"GATEWAY_CONFIG", "GATEWAY_WORKERS", "GATEWAY_LOG_LEVEL"} <= CLI_VARS  # found
    example = env_file(ENV_EXAMPLE)
    compose_vars = {m.group(1) or m.group(4) for m in COMPOSE_VAR.finditer(COMPOSE.read_text())}
    compose_vars.discard(None)
    routes_vars = set(ROUTES_VAR.findall(SHIPPED.read_text()))
    assert compose_vars - set(example) == set()
    assert routes_vars - set(example) == set()
    assert CLI_VARS - set(example) == set()
    # And nothing in it that nobody reads (a typo there would be silently ignored).
    assert set(example) - compose_vars - routes_vars - CLI_VARS == set()
    # The gateway container gets only variables the gateway reads.
    passed = set(raw["services"]["gateway"]["environment"])
    assert passed - routes_vars - CLI_VARS == set()
    # A secret has no value in the example: a copied .env must be filled in.
    assert example["JWT_SECRET"] == ""
    assert example["GRAFANA_ADMIN_PASSWORD"] == ""


def test_a_missing_secret_stops_compose_rather_than_starting_a_gateway(raw):
    env = env_file(ENV_EXAMPLE)  # JWT_SECRET= as in the example
    with pytest.raises(ValueError, match="JWT_SECRET"):
        interpolate(raw, env)


def test_env_example_works_with_docker_run_env_file():
    # `docker run --env-file .env`: the container's working directory is /, so the config
    # path must be the image's absolute one (a relative routes.yaml made the gateway exit 2).
    example = env_file(ENV_EXAMPLE)
    image_env = re.search(r"GATEWAY_CONFIG=(\S+)", (ROOT / "Dockerfile").read_text())
    assert image_env is not None
    assert example["GATEWAY_CONFIG"] == image_env.group(1)
    assert Path(example["GATEWAY_CONFIG"]).is_absolute()
    config = load_config(SHIPPED, env={**example, "JWT_SECRET": SHIPPED_ENV["JWT_SECRET"]})
    assert config.listen.port == int(example["GATEWAY_PORT"])
    assert config.redis is not None
    assert config.redis.url == example["REDIS_URL"]
    assert example["GATEWAY_WORKERS"] == "1"


def test_the_gateway_compose_describes_is_what_routes_yaml_gives(compose):
    services = compose["services"]
    env = {k: str(v) for k, v in services["gateway"]["environment"].items()}
    config = load_config(SHIPPED, env=env)
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 8080)
    assert config.tls is not None
    assert config.tls.listen.port == 8443
    assert config.admin.listen is not None
    assert (config.admin.listen.host, config.admin.listen.port) == ("0.0.0.0", 9101)
    # Prometheus's fixed address, alone, may read the admin endpoints.
    prometheus = services["prometheus"]["networks"]["daarion_net"]["ipv4_address"]
    assert f"{prometheus}/32" in config.admin.allow
    assert not any(cidr.endswith(("/8", "/12", "/16", "/24")) for cidr in config.admin.allow
                   if not cidr.startswith(("127.", "::1")))  # fmt: skip
    assert config.redis is not None
    assert config.redis.url == "redis://redis:6379/0"
    assert config.tls.acme is not None
    assert config.tls.acme.storage == env["ACME_STORAGE"]
    # depends_on waits for Redis to be healthy before the gateway starts.
    assert services["gateway"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert shlex.join(services["redis"]["command"]).startswith("redis-server")
