"""routes.yaml: the shipped table, every problem at once with its path, env substitution, and
the JSON Schema export."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from gateway.config import ConfigError, config_json_schema, load_config, parse_config
from gateway.config.types import Config, NodeRef, Tls
from gateway.config.validate import Converter
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


QUOTED = """\
listen: {host: 127.0.0.1, port: PORT}
retries: RETRIES
timeouts: {connect: CONNECT}
nodes: {a: {host: x}}
services: {s: {port: 7001, nodes: [a], websocket: WS}}
"""


def _quoted(port: str, retries: str, connect: str, ws: str, env: dict[str, str]) -> Config:
    text = QUOTED.replace("PORT", port).replace("RETRIES", retries)
    return parse_config(text.replace("CONNECT", connect).replace("WS", ws), env=env)


@pytest.mark.parametrize(
    ("port", "retries", "connect", "ws", "env"),
    [
        ("9000", "2", "0.25", "true", {}),  # plain
        ('"9000"', '"2"', '"0.25"', '"true"', {}),  # quoted: read as YAML reads them bare
        ('"${P}"', '"${R}"', '"${C}"', '"${W}"', {"P": "9000", "R": "2", "C": "0.25", "W": "true"}),
        ('"${P:-9000}"', '"${R:-2}"', '"${C:-0.25}"', '"${W:-true}"', {}),  # the defaults
    ],
)
def test_a_quoted_number_or_boolean_reads_as_its_substituted_form_does(
    port, retries, connect, ws, env
):
    config = _quoted(port, retries, connect, ws, env)
    assert config.listen.port == 9000
    assert config.retries == 2
    assert config.timeouts.connect == 0.25
    assert config.services["s"].websocket is True


@pytest.mark.parametrize(
    ("port", "env", "message"),
    [
        ('"9000/tcp"', {}, "listen.port (line 1): must be an integer, not the string '9000/tcp'"),
        ('"${P}"', {"P": "9000/tcp"}, "must be an integer, not the string '9000/tcp'"),
        ('"70000"', {}, "listen.port (line 1): must be at most 65535, not 70000"),
        ('"${P:-70000}"', {}, "listen.port (line 1): must be at most 65535, not 70000"),
        ('""', {}, "must be an integer, not the string ''"),
        ('"9000.5"', {}, "must be an integer, not a number"),
    ],
)
def test_a_quoted_value_that_is_not_a_number_gets_the_same_answer_either_way(port, env, message):
    with pytest.raises(ConfigError) as caught:
        _quoted(port, "1", "0.5", "false", env)
    assert message in str(caught.value)


def _schema_and_loader_agree(field: str, value: str) -> tuple[bool, bool]:
    """Whether the JSON Schema and the loader each accept ``value`` (a quoted string) for a
    port (int), retries (int), timeouts.connect (float) or a service's websocket (bool)."""
    service: dict[str, object] = {"port": 7001, "nodes": ["a"]}
    data: dict[str, object] = {"nodes": {"a": {"host": "x"}}, "services": {"s": service}}
    if field == "connect":
        data["timeouts"] = {"connect": value}
    elif field == "websocket":
        service["websocket"] = value
    else:
        service["port"] = value
    validator = jsonschema.Draft202012Validator(config_json_schema())
    by_schema = not list(validator.iter_errors(data))
    try:
        parse_config(yaml.safe_dump(data), env={})
    except ConfigError:
        return by_schema, False
    return by_schema, True


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("port", "7001", True),
        ("port", " 7001 ", True),
        ("port", "+7001", True),
        ("port", "7_001", True),
        ("port", "0x1B59", True),  # YAML 1.1, as PyYAML reads a bare 0x1B59
        ("port", "1:56:41", True),  # YAML 1.1 base 60: 7001
        ("port", "7001.0", False),  # a number, not an integer
        ("port", "7001/tcp", False),
        ("port", "seven", False),
        ("port", "", False),
        ("port", "${PORT:-7001}", True),
        ("connect", "0.25", True),
        ("connect", "2", True),
        ("connect", ".5", True),
        ("connect", "1.5e+1", True),
        ("connect", "soon", False),
        ("websocket", "true", True),
        ("websocket", "False", True),
        ("websocket", "yes", True),  # YAML 1.1 booleans, as a bare yes
        ("websocket", "off", True),
        ("websocket", "1", False),
        ("websocket", "nope", False),
    ],
)
def test_the_json_schema_takes_quoted_values_as_the_loader_does(field, value, accepted):
    # The loader reads a quoted number or boolean as YAML reads it bare; the schema takes the
    # strings PyYAML's own resolvers read so, and an editor then says what the loader says.
    assert _schema_and_loader_agree(field, value) == (accepted, accepted)


def test_a_choice_from_the_environment_keeps_its_text():
    # "${V:-1.3}" was once read as the number 1.3, which no choice of min_version is.
    tls = Converter({}, {}).convert(Tls, {"min_version": "${V:-1.3}"}, ("tls",))
    assert tls.min_version == "1.3"
    assert Converter({"V": "1.2"}, {}).convert(Tls, {"min_version": "${V}"}).min_version == "1.2"


INDENTED = """\
nodes:
  noda1: {host: 127.0.0.1}
services:
  city:
    port: 7001
   nodes: [noda1]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            INDENTED,
            "services (line 6): invalid YAML at line 6, column 4: this line's indentation lines "
            "up with no block above it: the keys of services start at column 3, the keys of "
            "services.city start at column 5",
        ),
        (
            INDENTED.replace("   nodes", "      nodes"),
            "services.city (line 6): invalid YAML at line 6, column 12: a ':' where the parser "
            "was reading the rest of a value: a line indented deeper than the key above it",
        ),
        (
            "services:\n  city:\n    nodes:\n      - noda1\n     - noda2\n",
            "services.city (line 5): invalid YAML at line 5, column 6: this line's indentation "
            "lines up with no block above it: the keys of services.city start at column 5, the "
            "items of services.city.nodes start at column 7",
        ),
        (
            "nodes:\n\tnoda1: {host: a}\n",
            "nodes (line 2): invalid YAML at line 2, column 1: a "
            "tab character: YAML indents with spaces only",
        ),
        ('nodes: {a: {host: "x}}\n', "a quoted string that is never closed (opened at line 1)"),
        ("nodes: [a, b\n", "a [ or { that is never closed (opened at line 1)"),
    ],
)
def test_a_yaml_mistake_is_explained_with_its_line_column_and_path(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "r.yaml", env={})
    assert len(caught.value.problems) == 1
    assert expected in str(caught.value.problems[0])
    assert "(the parser says: " in str(caught.value.problems[0])  # its own words, last


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


@pytest.mark.parametrize(
    ("value", "shown"), [(".nan", "nan"), ('".nan"', "nan"), (".inf", "inf"), ("-.inf", "-inf")]
)
def test_a_number_that_is_not_finite_is_refused(value, shown):
    """NaN passes every comparison, so a range check alone let ``.nan`` through."""
    text = f"nodes: {{a: {{host: x}}}}\ntimeouts: {{connect: {value}}}\n"
    text += "services: {s: {port: 1, nodes: [a]}}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    assert [str(p) for p in caught.value.problems] == [
        f"timeouts.connect (line 2): must be a finite number, not {shown}"
    ]


CROSS_BASE = "nodes: {noda1: {host: 127.0.0.3}}\nservices: {city: {port: 7001, nodes: [noda1]}}\n"


@pytest.mark.parametrize(
    ("text", "env", "path", "said"),
    [
        # The literal forms the raw-text checks always saw...
        ('cors: {origins: ["*"], credentials: true}\n', {}, "cors.origins", "'*' cannot go"),
        # Any site can send Origin: null (a sandboxed iframe): with credentials, as '*'.
        ('cors: {origins: ["https://a.example", "null"], credentials: true}\n', {},
         "cors.origins", "'null' cannot go"),
        # ...and the same values through ${VAR}, which they did not (each passed `check`).
        ('cors: {origins: ["${ORIGIN}"], credentials: true}\n', {"ORIGIN": "*"},
         "cors.origins", "'*' cannot go"),
        ('cors: {origins: ["*"], credentials: "${CREDENTIALS}"}\n', {"CREDENTIALS": "true"},
         "cors.origins", "'*' cannot go"),
        ('auth: {providers: {daarion: {algorithms: ["${JWT_ALG:-HS256}"], '
         'jwks_file: keys.json}}}\n', {}, "auth.providers.daarion", "HS* tokens need a secret"),
    ],
    ids=["literal-star", "literal-null", "star-from-env", "credentials-from-env",
         "algorithm-from-env"],
)  # fmt: skip
def test_cross_checks_see_the_values_after_substitution(text, env, path, said):
    with pytest.raises(ConfigError) as caught:
        parse_config(CROSS_BASE + text, "routes.yaml", env=env)
    found = [p for p in caught.value.problems if p.path == path and said in p.message]
    assert len(found) == 1, caught.value.problems  # reported, and once


@pytest.mark.parametrize(
    ("text", "env", "path", "said"),
    [
        ('redis: {url: "redis://127.0.0.1:notaport/0"}\n', {}, "redis.url", "Port could not"),
        ('redis: {url: "redis://127.0.0.1:99999"}\n', {}, "redis.url", "out of range"),
        ('redis: {url: "redis://127.0.0.1:6379/abc"}\n', {}, "redis.url", "must be a number"),
        ('redis: {url: "${REDIS_URL}"}\n', {"REDIS_URL": "127.0.0.1:6379"}, "redis.url",
         "unknown scheme"),
        ('redis: {url: "redis+sentinel://h:26379/"}\n', {}, "redis.url", "names the master"),
        ('services: {city: {port: 1, nodes: [noda1], routes: [{path: "${P:-/x/}", to: /a}]}}\n',
         {}, "services.city.routes[0].to", "must end with / exactly when path does"),
        ("security_headers: {frame_options: \"DENY\\nX-Evil: 1\"}\n", {},
         "security_headers.frame_options", "is not a header value"),
        ('auth: {providers: {sso: {algorithms: [ES256], jwks_url: "http://[x/keys"}}}\n', {},
         "auth.providers.sso.jwks_url", "not a URL"),
        ("rate_limits: {1: {rate: 1r/s}, api: {rate: 1r/s}}\n", {}, "rate_limits.1", ""),
    ],
    ids=["port", "port-range", "db", "no-scheme-from-env", "sentinel-master", "path-from-env",
         "header-line-break", "jwks-url", "number-key"],
)  # fmt: skip
def test_what_start_or_a_request_would_fail_on_is_refused_with_its_path(text, env, path, said):
    # Each of these passed `check` and then crashed the start (or, reloaded, every worker
    # that tried it), failed every answer, or crashed the check itself with a traceback.
    with pytest.raises(ConfigError) as caught:
        parse_config(_cross(text), "routes.yaml", env=env)
    found = [p for p in caught.value.problems if p.path == path and said in p.message]
    assert len(found) == 1, caught.value.problems


def _cross(text: str) -> str:
    """``CROSS_BASE`` and ``text``, whose services (when it has some) replace the base's."""
    return (CROSS_BASE.partition("services:")[0] if "services:" in text else CROSS_BASE) + text


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("services: {city: {port: 1, nodes: [\"${PRIMARY:-noda1}\"]}}\n", {}),
        ("default_rate_limit: \"${ZONE:-api}\"\nrate_limits: {api: {rate: 1r/s}}\n", {}),
        ('redis: {url: "${REDIS_URL}"}\n', {"REDIS_URL": "redis+sentinel://a:26379,b/m/1"}),
    ],
    ids=["node-from-env", "zone-from-env", "redis-from-env"],
)  # fmt: skip
def test_names_and_urls_from_the_environment_are_checked_as_written_out(text, env):
    parse_config(_cross(text), "routes.yaml", env=env)


def test_the_readmes_config_reference_example_is_a_valid_config():
    # A newcomer copies it first: it named a node (noda2b) it did not define.
    from .helpers import ROOT  # noqa: PLC0415 - only this test reads the README

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Config reference") :]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(example, "README.md", env={})
    assert {"agents", "search", "vector", "city"} <= set(config.services)


def test_a_key_with_a_bad_name_still_has_its_values_checked():
    # The name's problem hid those of everything under it until the name was fixed.
    text = (
        "nodes: {noda1: {host: 127.0.0.3}, Noda2: {host: 'http://10.0.0.1:80'}}\n"
        "services: {city: {port: 7001, nodes: [noda1]}, City: {port: 0, nodes: [noda1]}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    paths = {p.path for p in caught.value.problems}
    assert {"nodes.Noda2", "nodes.Noda2.host", "services.City", "services.City.port"} <= paths


def test_a_merged_key_may_be_overridden_but_a_written_one_not_repeated():
    base = "nodes: {noda1: {host: 127.0.0.3}}\n"
    services = parse_config(
        base
        + "services:\n  city: &d {port: 7001, nodes: [noda1]}\n  agents: {<<: *d, port: 7002}\n",
        env={},
    ).services
    assert (services["city"].port, services["agents"].port) == (7001, 7002)
    nested = base + (  # an anchor defined inside a merge, used later
        "services:\n  city: {<<: &d {<<: {port: 7001, nodes: [noda1]}, port: 7003}}\n  agents: *d\n"
    )
    assert parse_config(nested, env={}).services["agents"].port == 7003
    with pytest.raises(ConfigError, match=r"services.agents.port \(line 4\): duplicate key"):
        parse_config(
            base + "services:\n  agents: {port: 7002, nodes: [noda1],\n    port: 7003}\n", env={}
        )
