"""infra/: Prometheus's config and alerts checked and unit-tested with promtool, Grafana's
provisioning consistent with the compose stack, and every PromQL expression of the alerts and
the dashboard naming only metrics, labels and label values that a real scrape of the gateway
contains (after traffic that makes each series: proxied requests, a 429, a failover, a
WebSocket session, a rejected reload, a certificate, and a scrape of serve --workers 2)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from .helpers import NODA1, NODA2, ROOT, free_port, routes, write_cert
from .promtool import promtool

INFRA = ROOT / "infra"
PROMETHEUS = INFRA / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = INFRA / "grafana" / "dashboards" / "daarion-gateway.json"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

# -- promtool ----------------------------------------------------------------------------------


def test_prometheus_config_is_valid_and_scrapes_the_admin_listener():
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "daarion-gateway"]
    admin_port = COMPOSE["services"]["gateway"]["environment"]["GATEWAY_ADMIN_PORT"]
    assert job["static_configs"] == [{"targets": [f"gateway:{admin_port}"]}]
    assert job["metrics_path"] == "/metrics"
    # compose mounts this directory where the config and its rule file are looked for.
    assert "./infra/prometheus:/etc/prometheus:ro" in COMPOSE["services"]["prometheus"]["volumes"]


def test_alert_rules_are_valid():
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def _alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_every_alert_is_unit_tested_firing_and_silent():
    assert {r["alert"] for r in _alerts()} == {
        "GatewayDown", "GatewayNodeOffline", "GatewayRedisDegraded", "GatewayHigh5xxRatio",
        "GatewayHighLatencyP99", "GatewayRateLimitBurst", "GatewayConfigReloadFailed",
        "GatewayCertificateExpiringSoon", "GatewayCertificateExpiryCritical",
        "GatewayWorkersMissing", "GatewayJwksUnavailable",
    }  # fmt: skip
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test["alert_rule_test"]:
                (fired if case["exp_alerts"] else silent).add(case["alertname"])
    names = {r["alert"] for r in _alerts()}
    assert fired >= names  # each alert is shown firing...
    assert silent >= names - {"GatewayCertificateExpiryCritical"}  # ...and not firing
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_the_unit_tests_can_fail(tmp_path):
    # A wrong expectation must make promtool fail: the tests are not ones that always pass.
    for path in RULE_TESTS:
        text = path.read_text().replace(
            "severity: warning, node: noda2", "severity: info, node: noda2"
        )
        broken = tmp_path / path.name
        broken.write_text(
            text.replace("rule_files:\n  - ../alerts.yml", f"rule_files:\n  - {ALERTS}")
        )
    result = promtool("test", "rules", *(tmp_path / p.name for p in RULE_TESTS))
    assert result.returncode == 1
    assert "GatewayNodeOffline" in result.stdout + result.stderr


# -- Grafana -----------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_stack():
    provisioning = INFRA / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service, its port
    providers = yaml.safe_load((provisioning / "dashboards" / "daarion.yml").read_text())
    (provider,) = providers["providers"]
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert f"./infra/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "daarion-gateway"
    titles = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert titles == {
        "Traffic", "Latency", "Rate limits", "Upstreams and nodes", "WebSocket", "The gateway",
    }  # fmt: skip
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


# -- PromQL names against a real scrape --------------------------------------------------------

TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)|(?P<range>\[[^\]]*\])"""
    r"""|(?P<num>(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?![A-Za-z_]))"""
    r"""|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])"""
)
AGGREGATORS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group",
}  # fmt: skip
FUNCTIONS = AGGREGATORS | {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "time",
    "absent", "absent_over_time", "max_over_time", "min_over_time", "avg_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "clamp_min", "clamp_max", "abs",
    "ceil", "floor", "round", "vector", "scalar", "changes", "resets", "timestamp",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}
# Series Prometheus itself makes, and the labels it adds to every scraped series.
SYNTHETIC = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance"}
# Labels whose values are a fixed set in the gateway's code (not config names, status codes or
# certificate names): a value written in an expression must be one a scrape shows.
FIXED_VALUES = {"result", "kind", "reason", "direction"}


class Selector:
    def __init__(self, metric: str | None) -> None:
        self.metric = metric
        self.matchers: list[tuple[str, str, str]] = []  # (label, op, value)


def parse(expr: str) -> tuple[list[Selector], set[str]]:
    """The series selectors of a PromQL expression and the labels its by/without/on/ignoring/
    group_* clauses name. Raises on a token or function it does not know."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        assert m is not None, f"cannot read {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "ws":
            tokens.append((kind, m.group()))
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "id" and text in GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "id":
                    grouping.add(tokens[i][1])
                i += 1
        elif kind == "id" and following == "(" and text not in KEYWORDS:
            assert text in FUNCTIONS, f"unknown function {text!r} in {expr!r}"
        elif kind == "id" and text in AGGREGATORS and following in ("by", "without"):
            pass  # sum by (...) (...): the aggregation, its clause comes next
        elif (kind == "id" and text not in KEYWORDS) or text == "{":
            selector = Selector(text if kind == "id" else None)
            selectors.append(selector)
            if text != "{" and following == "{":
                i += 1
            if tokens[i][1] == "{":
                i += 1
                while tokens[i][1] != "}":
                    label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2][1]
                    assert op in ("=", "!=", "=~", "!~"), f"bad matcher in {expr!r}"
                    selector.matchers.append((label, op, value[1:-1]))
                    i += 3
                    if tokens[i][1] == ",":
                        i += 1
        i += 1
    return selectors, grouping


def test_the_parser_reads_what_it_must():
    selectors, grouping = parse(
        'histogram_quantile(0.99, sum by (service, le) (rate(x_bucket{service=~"a|b",'
        ' status!="5.."}[5m]))) > 1 and on(node) group_left(zone) up == 0 or absent(y)'
    )
    assert [(s.metric, s.matchers) for s in selectors] == [
        ("x_bucket", [("service", "=~", "a|b"), ("status", "!=", "5..")]),
        ("up", []),
        ("y", []),
    ]
    assert grouping == {"service", "le", "node", "zone"}
    with pytest.raises(AssertionError, match="unknown function"):
        parse("rat(x[5m])")


def _grafana(expr: str) -> str:
    """A dashboard expression as Grafana sends it (its variables filled in)."""
    return expr.replace("$__rate_interval", "1m").replace("$service", ".*")


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert, dashboard query and promtool input series."""
    found = [(f"alerts.yml {r['alert']}", r["expr"]) for r in _alerts()]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"dashboard {panel['title']!r}", _grafana(target["expr"])))
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for series in test["input_series"]:
                found.append((f"{path.name} {test['name']!r}", series["series"]))
    return found


def label_values_queries() -> list[tuple[str, str]]:
    """(metric, label) of the dashboard's label_values() variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
            assert m is not None, variable
            out.append((m.group(1), m.group(2)))
    return out


SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? \S+$")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:\\.|[^"\\])*)"')


def series_of(scrape: str) -> dict[str, dict[str, set[str]]]:
    """metric name -> label name -> the values seen, from Prometheus text."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for line in scrape.splitlines():
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m is not None, line
        labels = out[m.group(1)]
        for name, value in LABEL.findall(m.group(2) or ""):
            labels[name].add(value)
    return out


async def _ws_echo(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.Response(text="ok")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


async def _traffic_scrape(upstream, gateway, tmp_path: Path) -> str:
    """A single-process gateway after traffic that makes every series the files name."""
    city = await upstream(NODA1, _ws_echo)
    search_fallback = await upstream(NODA1)
    plain = await upstream("127.0.0.4")  # a node the gateway expects to speak TLS: it does not
    ca = trustme.CA()
    cert = write_cert(ca, tmp_path / "tls", "gateway.test")
    text = routes(
        {
            "city": f"{{port: {city.port}, nodes: [noda1], websocket: true, auth: optional, "
            "rate_limit: tight}",
            # Not probed: its requests find noda2 down (retries on noda1, failovers, an
            # ejection once `fall` requests have failed there).
            "search": f"{{port: {free_port(NODA2)}, nodes: [noda2, {{node: noda1, port: "
            f"{search_fallback.port}}}], health: {{enabled: false}}}}",
            "dead": f"{{port: {free_port(NODA1)}, nodes: [noda1]}}",
            "secure": f"{{port: {plain.port}, nodes: [noda3]}}",
        },
        probes=True,
        noda1=NODA1,
        noda2=NODA2,
        noda3="{host: 127.0.0.4, tls: {}}",
    )
    text = text.replace(
        "nodes:\n",
        "health: {interval: 0.2, unhealthy_interval: 0.2, timeout: 0.5, rise: 1, fall: 1}\n"
        "redis: {url: 'memory://'}\n"
        "rate_limits: {tight: {rate: 1r/m, burst: 3}}\n"
        f"tls: {{listen: {{host: 127.0.0.1, port: 8443}}, certificates: [{cert.yaml()}],"
        " redirect_http: false}\n"
        "admin: {listen: {host: 127.0.0.1, port: 9101}}\n"  # both on free ports in the fixture
        "auth: {providers: {t: {algorithms: [HS256], secret: "
        "a-test-secret-of-at-least-32-bytes-long}}}\n"
        "nodes:\n",
        1,
    )
    config = tmp_path / "routes.yaml"
    config.write_text(text)
    gw = await gateway(text, str(config))
    async with aiohttp.ClientSession() as client:
        async with client.ws_connect(gw.url + "/ws/city/rooms/general") as ws:
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
        statuses: dict[str, list[int]] = defaultdict(list)
        paths = ["/api/city/rooms"] * 4 + ["/api/search/q"] * 3 + ["/api/dead/x", "/api/secure/x"]
        for path in paths:
            async with client.get(gw.url + path) as r:
                statuses[path].append(r.status)
        assert 429 in statuses["/api/city/rooms"]  # over the burst of 3 (with the session's)
        assert statuses["/api/search/q"] == [200, 200, 200]  # from noda1, the fallback
        assert statuses["/api/dead/x"][0] in (502, 503)  # refused, or already probed down
        assert statuses["/api/secure/x"][0] in (502, 503)  # a TLS failure, the same ways
        await asyncio.sleep(1.0)  # health probes fail on the dead service meanwhile
        # A certificate renewed on disk, then a reload of a broken file: one certificate load
        # that replaces one, one rejected config.
        write_cert(ca, tmp_path / "tls", "gateway.test")
        config.write_text(text + "  broken: {port: 1, nodes: [noda9]}\n")
        assert gw.gateway.reload() is False
        async with client.get(gw.admin_url + "/metrics") as r:
            assert r.status == 200
            return await r.text()


def _workers_scrape(tmp_path: Path) -> str:
    """A real serve --workers 2 scrape (its series carry `worker`, and it says how many
    workers answered)."""
    port = free_port()
    config = tmp_path / "workers.yaml"
    cert = write_cert(trustme.CA(), tmp_path / "workers-tls", "gateway.test")
    tls = (
        f"tls: {{listen: {{host: 127.0.0.1, port: {free_port()}}}, "
        f"certificates: [{cert.yaml()}], redirect_http: false}}\n"
    )
    config.write_text(tls + routes({"city": "{port: 1, nodes: [noda1]}"}, noda1=NODA1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return asyncio.run(_scrape_when_both_answer(f"http://127.0.0.1:{port}/metrics"))
    finally:
        proc.terminate()
        proc.wait(30)


async def _scrape_when_both_answer(url: str) -> str:
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            try:
                async with client.get(url) as r:
                    text = await r.text()
                if "gateway_workers_reporting 2.0" in text:
                    return text
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("serve --workers 2 never answered with both workers")


@pytest.fixture
async def scraped(upstream, gateway, tmp_path) -> dict[str, dict[str, set[str]]]:
    traffic = await _traffic_scrape(upstream, gateway, tmp_path)
    workers = await asyncio.to_thread(_workers_scrape, tmp_path)
    known = series_of(traffic)
    for name, labels in series_of(workers).items():
        known[name].update()  # a metric without labels is known too
        for label, values in labels.items():
            known[name][label] |= values
    for name, synthetic in SYNTHETIC.items():
        for label in synthetic:
            known[name][label].add("")
    return known


async def test_every_expression_names_only_what_a_real_scrape_contains(scraped):
    problems = []
    for where, expr in expressions():
        selectors, grouping = parse(expr)
        used = set()
        for selector in selectors:
            assert selector.metric is not None, f"{where}: a selector without a metric name"
            if selector.metric not in scraped:
                problems.append(f"{where}: no metric {selector.metric!r} in the scrape")
                continue
            labels = scraped[selector.metric]
            used |= set(labels)
            for label, op, value in selector.matchers:
                if label not in labels and label not in TARGET_LABELS:
                    problems.append(f"{where}: {selector.metric} has no label {label!r}")
                elif op == "=" and label in FIXED_VALUES and value not in labels[label]:
                    problems.append(
                        f"{where}: {selector.metric}{{{label}={value!r}}}: never seen "
                        f"(seen: {sorted(labels[label])})"
                    )
                elif op in ("=~", "!~"):
                    re.compile(value)  # a valid regular expression
        for label in grouping - used - TARGET_LABELS:
            problems.append(f"{where}: groups by {label!r}, a label none of its metrics has")
    for metric, label in label_values_queries():
        if label not in scraped.get(metric, {}):
            problems.append(f"dashboard variable: label_values({metric}, {label})")
    assert problems == [], "\n".join(problems)
    # The check has teeth: what it would say about a misspelt name or label.
    assert "gateway_node_upp" not in scraped
    assert "nod" not in scraped["gateway_node_up"]
    assert {"worker"} <= set(scraped["gateway_node_up"])
    assert "gateway_workers_reporting" in scraped
