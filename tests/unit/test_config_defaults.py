"""The built-in defaults are written once: what the loader uses is what the JSON Schema and
its descriptions say."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.config import (
    DEFAULT_EJECTION,
    DEFAULT_HEALTH,
    DEFAULT_LIMITS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUTS,
    config_json_schema,
    parse_config,
    service_settings,
)

MINIMAL = "nodes: {noda1: {host: 127.0.0.1}}\nservices: {city: {port: 7001, nodes: [noda1]}}\n"


def _properties(schema: dict[str, Any], key: str) -> dict[str, Any]:
    properties: dict[str, Any] = schema["properties"][key]["properties"]
    return properties


@pytest.mark.parametrize(
    ("key", "defaults"),
    [
        ("timeouts", DEFAULT_TIMEOUTS),
        ("health", DEFAULT_HEALTH),
        ("ejection", DEFAULT_EJECTION),
        ("limits", DEFAULT_LIMITS),
    ],
)
def test_the_schema_shows_the_defaults_the_loader_uses(key: str, defaults: Any) -> None:
    properties = _properties(config_json_schema(), key)
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        assert properties[field.name]["default"] == value, field.name
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str):
            shown = value
        else:
            shown = f"{value:g}"
        assert f"(default {shown})" in properties[field.name]["description"], field.name


def test_the_connect_timeout_default_is_half_a_second_everywhere() -> None:
    # The exported schema once said 1 s while the code used 0.5 s.
    schema = config_json_schema()
    assert _properties(schema, "timeouts")["connect"]["default"] == 0.5
    config = parse_config(MINIMAL)
    timeouts, health, ejection, retries = service_settings(config, config.services["city"])
    assert timeouts == DEFAULT_TIMEOUTS
    assert timeouts.connect == 0.5
    assert (health, ejection, retries) == (DEFAULT_HEALTH, DEFAULT_EJECTION, DEFAULT_RETRIES)
    assert schema["properties"]["retries"]["default"] == DEFAULT_RETRIES == 1
