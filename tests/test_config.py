"""routes.yaml: the shipped table, every problem at once with its path, env substitution, and
the JSON Schema export."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from gateway.config import ConfigError, config_json_schema, load_config, parse_config
from gateway.config.types import NodeRef
from gateway.snapshot import compile_snapshot

from .helpers import BROKEN, SHIPPED, SHIPPED_ENV

STANDARD_PORTS = {
    "city": 7001, "agents": 7002, "secondme": 7003, "microdao": 7004, "devtools": 8008,
    "swapper": 8890, "stt": 8895, "ocr": 8896, "search": 8897, "vector": 8898,
    "frontend": 8899, "router": 9102, "bot-gateway": 9300,
}  # fmt: skip


def test_shipped_routes_follow_the_standards_port_table():
    config = load_config(SHIPPED, env=SHIPPED_ENV)
    # auth-service is not in the standards' table: it is the one addition (its code's port).
    assert {name: s.port for name, s in config.services.items()} == {
        **STANDARD_PORTS,
        "auth": 7011,
    }
    for name, service in config.services.items():
        nodes = [
            ref.node if isinstance(ref, NodeRef) else tuple(r.node for r in ref)
            for ref in service.nodes
        ]
        if name in ("stt", "ocr", "search", "vector"):
            assert nodes == ["noda2", "noda1"], name
        else:
            assert nodes == ["noda1"], name
    assert config.listen.port == 8080


def test_node_hosts_and_ports_come_from_the_environment():
    config = load_config(
        SHIPPED,
        env={
            "NODA1_HOST": "10.0.0.1",
            "NODA2_HOST": "node2.local",
            "GATEWAY_PORT": "80",
            **SHIPPED_ENV,
        },
    )
    routes = compile_snapshot(config).routes
    assert [t.origin for t in routes["search"].targets] == [
        "http://node2.local:8897",
        "http://10.0.0.1:8897",
    ]
    assert config.listen.port == 80


def test_every_problem_is_reported_at_once_with_its_path_and_line():
    with pytest.raises(ConfigError) as caught:
        parse_config(BROKEN, "broken.yaml", env={})
    reported = {(p.path, p.line): p.message for p in caught.value.problems}
    expected_paths = {
        ("listen.port", 1),
        ("nodes.noda1.host", 3),
        ("nodes.noda2.host", 4),
        ("services.agents.wallpaper", 9),
        ("services.search.nodes[1]", 12),
        ("services.search.http_prefix", 13),
        ("services.city.port", 15),
        ("services.city.nodes", 16),
        ("services.city.timeouts.connect", 17),
        ("services.city.timeouts.response", 17),
        ("services.Bad_Name", 18),
        ("services.gateway", 19),
        ("services.dup", 21),
    }
    assert set(reported) == expected_paths
    assert reported[("services.search.nodes[1]", 12)].startswith("unknown node 'noda9'")
    assert "NODA1_HOST" in reported[("nodes.noda1.host", 3)]
    assert reported[("services.dup", 21)] == "duplicate key"
    assert "did you mean" not in reported[("services.agents.wallpaper", 9)]
    text = str(caught.value)
    assert "services.search.nodes[1] (line 12): unknown node 'noda9'" in text


def test_misspelt_keys_get_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        parse_config("nodes: {}\nservices: {a: {port: 1, nodes: [], http_prefx: /a}}\n", env={})
    messages = [str(p) for p in caught.value.problems]
    assert any("did you mean 'http_prefix'" in m for m in messages)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "the file is empty"),
        ("nodes: [\n", "invalid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("nodes: {}\n", "missing required key 'services'"),
        ("nodes: {a: {host: x}}\nservices: {s: {port: 0, nodes: [a]}}\n", "at least 1"),
        ("nodes: {a: {host: x}}\nservices: {s: {port: 1, nodes: [a, a]}}\n", "listed twice"),
        ("nodes: {a: {host: x}}\nservices: {s: {port: true, nodes: [a]}}\n", "integer"),
        (
            "nodes: {a: {host: x}}\nservices: {s: {port: 1, nodes: [a], ws_upstream_gone_code: "
            "1006}}\n",
            "ws_upstream_gone_code (line 2): must be one of 1011, 1014, 1001, 1012, 1013",
        ),
        (
            "nodes: {a: {host: x}}\nservices: {s: {port: 1, nodes: [a], routes: [{path: /ws/,"
            " to: /, websocket: true, ws_extensions: 1}]}}\n",
            "services.s.routes[0].ws_extensions (line 2): must be true or false",
        ),
    ],
)
def test_single_problems_have_clear_messages(text, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    assert fragment in str(caught.value)


def test_env_substitution_rules():
    text = """\
nodes: {a: {host: "${HOST:-fallback.local}"}, b: {host: "${EMPTY:-used-when-empty}"}}
services:
  s: {port: "${PORT}", nodes: [a, b], http_prefix: "/p$${literal}"}
"""
    with pytest.raises(ConfigError):  # the prefix holds "{" once "$$" became "$"
        parse_config(text, env={"PORT": "9000", "EMPTY": ""})
    config = parse_config(text.replace("/p$${literal}", "/p"), env={"PORT": "9000", "EMPTY": ""})
    assert config.nodes["a"].host == "fallback.local"
    assert config.nodes["b"].host == "used-when-empty"
    assert config.services["s"].port == 9000


def test_timeouts_layer_service_over_top_level_over_defaults():
    config = parse_config(
        """\
nodes: {a: {host: x}}
timeouts: {response: 60}
services:
  one: {port: 1, nodes: [a]}
  two: {port: 2, nodes: [a], timeouts: {connect: 0.25}}
""",
        env={},
    )
    routes = compile_snapshot(config).routes
    assert (routes["one"].connect_timeout, routes["one"].response_timeout) == (0.5, 60.0)
    assert (routes["two"].connect_timeout, routes["two"].response_timeout) == (0.25, 60.0)


def test_exported_json_schema_is_valid_and_agrees_with_the_loader():
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(yaml.safe_load(SHIPPED.read_text()))) == []
    assert list(validator.iter_errors(yaml.safe_load(BROKEN)))  # the broken one is rejected
    service = schema["properties"]["services"]["additionalProperties"]
    assert service["required"] == ["port", "nodes"]
    assert service["properties"]["port"]["anyOf"][0] == {
        "type": "integer", "minimum": 1, "maximum": 65535,
    }  # fmt: skip


def test_websocket_extensions_and_gone_code_layer_route_over_service():
    text = (
        "nodes: {a: {host: 127.0.0.3}}\n"
        "services:\n"
        "  city: {port: 1, nodes: [a], ws_upstream_gone_code: 1014, routes: [\n"
        "    {path: /ws/live/, to: /live/, websocket: true, name: live, ws_extensions: false,\n"
        "     ws_upstream_gone_code: 1012},\n"
        "    {path: /ws/chat/, to: /chat/, websocket: true, name: chat}]}\n"
        "  plain: {port: 2, nodes: [a], websocket: true}\n"
    )
    table = compile_snapshot(parse_config(text, env={})).table
    policies = {entry.id: entry.policy.ws for entry in table.entries if entry.websocket}
    found = {
        name: (ws.extensions, ws.upstream_gone_code)
        for name, ws in policies.items()
        if ws is not None
    }
    assert found == {"live": (False, 1012), "chat": (True, 1014), "plain": (True, 1011)}
