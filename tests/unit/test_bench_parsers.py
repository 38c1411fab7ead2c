"""The benchmark harnesses' output parsers (bench/lib), against real output captured on
127.0.0.1 and kept in bench/samples/ (bench/samples/README.md says how each was made):
wrk 4.1 (with and without --latency, socket errors, non-2xx answers, every unit it prints),
bench/pyloadgen.py, bench/wsclient.py, the gateway's /metrics and nginx's TLS log."""

from __future__ import annotations

import dataclasses
import math
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.lib import load, servers, tls
from bench.lib.load import Echo, Flooded, Load, Opened, Spread
from bench.lib.tls import TlsLog

SAMPLES = Path(__file__).resolve().parents[2] / "bench" / "samples"
KIB, MIB, GIB = 1024.0, 1024.0**2, 1024.0**3
NO_ERRORS = {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def flat(value: object, prefix: str = "") -> dict[str, object]:
    """A dataclass (or dict) as one flat dict, nested fields under dotted keys: what
    pytest.approx can compare."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    found: dict[str, object] = {}
    for key, item in value.items():
        found.update(flat(item, f"{prefix}{key}."))
    return found


def near(expected: object) -> object:
    """``expected`` (flattened) with its floats compared approximately, to compare with
    ``flat(got)``: wrk prints two decimals, which binary floats do not hold exactly."""
    return pytest.approx(flat(expected))


# -- wrk -----------------------------------------------------------------------------------


def test_wrk_with_latency_microseconds_and_thousands() -> None:
    got = load.parse_wrk(sample("wrk-latency.txt"))
    assert got.requests == 294530
    assert got.seconds == pytest.approx(2.10)
    assert got.rps == pytest.approx(140181.36)
    assert got.percentiles_ms == pytest.approx({50: 0.170, 75: 0.198, 90: 0.333, 99: 0.445})
    assert (got.p50_ms, got.p99_ms) == pytest.approx((0.170, 0.445))
    assert got.non2xx == 0
    assert got.socket_errors == NO_ERRORS
    assert (got.threads, got.connections) == (1, 50)
    assert flat(got.latency_ms) == near(Spread(0.21255, 0.17105, 3.94, 98.31))
    assert flat(got.thread_rps) == near(Spread(140_920.0, 3_290.0, 145_350.0, 71.43))
    assert got.read_bytes == pytest.approx(46.34 * MIB)
    assert got.transfer_bytes_per_s == pytest.approx(22.06 * MIB)


def test_wrk_without_latency_has_no_percentiles() -> None:
    got = load.parse_wrk(sample("wrk-no-latency.txt"))
    assert (got.requests, got.rps) == pytest.approx((282063, 140839.61))
    assert got.seconds == pytest.approx(2.00)
    assert got.percentiles_ms == {}
    assert flat(got.latency_ms) == near(Spread(0.21148, 0.18739, 5.57, 98.80))
    with pytest.raises(ValueError, match="--latency"):
        _ = got.p99_ms


def test_wrk_two_threads_milliseconds_and_gigabytes() -> None:
    got = load.parse_wrk(sample("wrk-2-threads-1MiB.txt"))
    assert (got.threads, got.connections, got.requests) == (2, 20, 5381)
    assert got.percentiles_ms == pytest.approx({50: 7.63, 75: 7.80, 90: 8.22, 99: 16.42})
    assert flat(got.latency_ms) == near(Spread(6.84, 2.69, 32.97, 81.35))
    # Req/Sec below 850 has no suffix: 118.82 is the standard deviation, 1.34k the average
    assert flat(got.thread_rps) == near(Spread(1_340.0, 118.82, 1_770.0, 82.50))
    assert got.read_bytes == pytest.approx(5.26 * GIB)
    assert got.transfer_bytes_per_s == pytest.approx(2.61 * GIB)
    assert got.rps == pytest.approx(2667.27)


def test_wrk_non2xx() -> None:
    got = load.parse_wrk(sample("wrk-503.txt"))
    assert (got.requests, got.non2xx) == (286212, 286212)
    assert got.socket_errors == NO_ERRORS
    assert got.rps == pytest.approx(136325.57)  # nine digits: no space after the colon
    assert got.p99_ms == pytest.approx(0.622)


def test_wrk_seconds_latencies_and_timeouts() -> None:
    # wrk pads one-letter units with a space: "1.25s " in the latency distribution
    got = load.parse_wrk(sample("wrk-timeouts.txt"))
    assert (got.requests, got.seconds) == pytest.approx((17, 4.01))
    assert got.percentiles_ms == pytest.approx({50: 1250.0, 75: 1750.0, 90: 2000.0, 99: 2000.0})
    assert flat(got.latency_ms) == near(Spread(1100.0, 718.65, 2000.0, 60.0))
    assert flat(got.thread_rps) == near(Spread(4.41, 1.73, 10.0, 94.12))
    assert got.socket_errors == {**NO_ERRORS, "timeout": 7}
    assert got.read_bytes == pytest.approx(4.08 * KIB)
    assert got.transfer_bytes_per_s == pytest.approx(1.02 * KIB)


def test_wrk_minutes() -> None:
    got = load.parse_wrk(sample("wrk-61s.txt"))
    assert got.seconds == pytest.approx(61.2)  # "1.02m"
    assert (got.requests, got.rps) == pytest.approx((245, 4.02))
    assert got.p50_ms == pytest.approx(500.14)
    assert got.read_bytes == pytest.approx(58.86 * KIB)
    assert got.transfer_bytes_per_s == pytest.approx(0.96 * KIB)  # K from 870 bytes on


def test_wrk_read_errors_and_nothing_measured() -> None:
    got = load.parse_wrk(sample("wrk-read-errors.txt"))
    assert (got.requests, got.rps, got.read_bytes) == (0, 0.0, 0.0)
    assert got.socket_errors == {**NO_ERRORS, "read": 43816}
    assert got.latency_ms == Spread(0.0, 0.0, 0.0, None)  # "-nan%"
    assert got.thread_rps == Spread(0.0, 0.0, 0.0, None)
    assert got.percentiles_ms == {50: 0.0, 75: 0.0, 90: 0.0, 99: 0.0}


@pytest.mark.parametrize(
    ("name", "errors"),
    [
        ("wrk-connect-errors.txt", {**NO_ERRORS, "connect": 15}),
        ("wrk-backend-killed.txt", {**NO_ERRORS, "read": 10, "write": 57084}),
    ],
)
def test_wrk_socket_errors(name: str, errors: dict[str, int]) -> None:
    assert load.parse_wrk(sample(name)).socket_errors == errors


def test_wrk_with_a_lua_done_report() -> None:
    """bench/failover.py's script prints its counts after wrk's summary: they are not read."""
    got = load.parse_wrk(sample("wrk-failover-lua.txt"))
    assert (got.requests, got.seconds, got.rps) == pytest.approx((130187, 22.02, 5912.00))
    assert got.percentiles_ms == pytest.approx({50: 7.97, 75: 8.41, 90: 9.78, 99: 26.33})
    assert flat(got.thread_rps) == near(Spread(5_940.0, 533.21, 6_970.0, 70.00))
    assert got.read_bytes == pytest.approx(21.85 * MIB)
    assert got.transfer_bytes_per_s == pytest.approx(0.99 * MIB)  # M from 870 KiB on
    assert got.socket_errors == NO_ERRORS


def test_wrk_that_could_not_connect_is_an_error() -> None:
    with pytest.raises(ValueError, match="requests in"):
        load.parse_wrk(sample("wrk-refused.txt"))


def test_wrk_summary_is_the_whole_parse() -> None:
    """Every field of one sample, so that a field added to Load is also tested."""
    assert flat(load.parse_wrk(sample("wrk-backend-killed.txt"))) == near(
        Load(
            requests=111416,
            seconds=2.10,
            rps=53063.40,
            percentiles_ms={50: 0.064, 75: 0.081, 90: 0.087, 99: 0.152},
            non2xx=0,
            socket_errors={"connect": 0, "read": 10, "write": 57084, "timeout": 0},
            threads=1,
            connections=10,
            latency_ms=Spread(0.06708, 0.09219, 3.20, 99.09),
            thread_rps=Spread(102_000.0, 35_890.0, 138_980.0, 81.82),
            read_bytes=17.53 * MIB,
            transfer_bytes_per_s=8.35 * MIB,
        )
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [("285.00us", 0.285), ("3.94ms", 3.94), ("1.25s", 1250.0), ("1.02m", 61_200.0), ("2h", 7.2e6)],
)
def test_wrk_durations(text: str, ms: float) -> None:
    assert load.wrk_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize(
    ("text", "count"), [("4.41", 4.41), ("0.90k", 900.0), ("140.92k", 140_920.0), ("1.20M", 1.2e6)]
)
def test_wrk_counts(text: str, count: float) -> None:
    assert load.wrk_count(text) == pytest.approx(count)


@pytest.mark.parametrize(
    ("text", "size"), [("0.00B", 0.0), ("4.08KB", 4.08 * KIB), ("46.34MB", 46.34 * MIB)]
)
def test_wrk_sizes(text: str, size: float) -> None:
    assert load.wrk_bytes(text) == pytest.approx(size)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (load.wrk_ms, "12"),
        (load.wrk_ms, "1.2ks"),
        (load.wrk_ms, "-nan"),
        (load.wrk_count, "1.2kB"),
        (load.wrk_bytes, "12K"),
        (load.wrk_bytes, "1.2kB"),  # sizes are binary: K, not k
    ],
)
def test_wrk_units_reject(parse: Callable[[str], float], text: str) -> None:
    with pytest.raises(ValueError, match="not a wrk"):
        parse(text)


def test_wrk_command() -> None:
    url = "http://127.0.0.1:8080/api/search/"
    assert load.wrk_command("/usr/bin/wrk", url, 50, 8) == [
        "/usr/bin/wrk", "-t1", "-c50", "-d8s", "--latency", url,
    ]  # fmt: skip
    pin = ["taskset", "-c", "1"]
    assert load.wrk_command("wrk", url, 4, 2, script=Path("/w/count.lua"), pin=pin) == [
        *pin, "wrk", "-t1", "-c4", "-d2s", "--latency", "-s", "/w/count.lua", url,
    ]  # fmt: skip
    https = "https://127.0.0.1:8443/api/search/"
    assert load.wrk_command("wrk", https, 50, 8, headers=["Connection: close"]) == [
        "wrk", "-t1", "-c50", "-d8s", "--latency", "-H", "Connection: close", https,
    ]  # fmt: skip


def test_wrk_over_https_with_connection_close() -> None:
    got = load.parse_wrk(sample("wrk-https-close.txt"))
    assert (got.threads, got.connections, got.requests) == (1, 50, 2820)
    assert got.rps == pytest.approx(1404.34)
    assert got.percentiles_ms == pytest.approx({50: 2.10, 75: 2.53, 90: 3.70, 99: 19.54})
    assert got.socket_errors == NO_ERRORS  # wrk counts no error for the server's close
    assert got.read_bytes == pytest.approx(564.55 * KIB)


# -- nginx's TLS log (bench/https.py) ------------------------------------------------------


def test_nginx_tls_log() -> None:
    got = tls.parse_tls_log(sample("nginx-tls-log.txt"))
    assert got == TlsLog(
        requests=10,
        resumed=6,
        negotiated={
            "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519": 8,
            "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256 X25519": 2,
        },
    )


@pytest.mark.parametrize(
    "line", ["TLSv1.3 TLS_AES_256_GCM_SHA384 X25519", "- - - -", "TLSv1.3 A X25519 r extra"]
)
def test_nginx_tls_log_other_lines(line: str) -> None:
    with pytest.raises(ValueError, match="TLS log"):
        tls.parse_tls_log(line)


# -- pyloadgen -----------------------------------------------------------------------------


def test_pyloadgen() -> None:
    assert load.parse_pyloadgen(sample("pyloadgen.txt")) == Load(
        requests=49030,
        seconds=1.001233931999991,
        rps=48969.57487453635,
        percentiles_ms={
            50: 0.0733289999743647,
            75: 0.09711500001685636,
            90: 0.13992699996379088,
            99: 4.146016000049713,
        },
        non2xx=0,
        socket_errors=NO_ERRORS,
    )


def test_pyloadgen_non2xx_and_timeouts() -> None:
    got = load.parse_pyloadgen(sample("pyloadgen-503.txt"))
    assert (got.requests, got.non2xx, got.p99_ms) == (20314, 20314, 3.175164000026598)
    got = load.parse_pyloadgen(sample("pyloadgen-timeouts.txt"))
    assert (got.requests, got.rps) == (6, 3.999342998597154)
    assert got.socket_errors == {**NO_ERRORS, "timeout": 4}
    assert got.p50_ms == 250.72019100002763
    assert got.latency_ms is None  # wrk's extras: pyloadgen has none
    assert got.read_bytes is None


def test_pyloadgen_without_answers() -> None:
    got = load.parse_pyloadgen(sample("pyloadgen-read-errors.txt"))
    assert (got.requests, got.rps) == (0, 0.0)
    assert got.socket_errors == {**NO_ERRORS, "read": 3209}
    assert math.isnan(got.p50_ms)
    assert math.isnan(got.p99_ms)


def test_pyloadgen_reads_its_last_line() -> None:
    text = "a warning on stdout\n" + sample("pyloadgen.txt")
    assert load.parse_pyloadgen(text).requests == 49030


# -- wsclient ------------------------------------------------------------------------------


def test_wsclient_echo() -> None:
    events = load.parse_events(sample("wsclient-echo.txt"))
    assert [e["event"] for e in events] == ["start", "stop", "closed"]
    echo = load.parse_echo(events[1], events[2])
    assert echo == Echo(
        echoed=127069, seconds=1.0002142380000123, cpu_seconds=0.990457028, errors=0
    )
    assert echo.rate == pytest.approx(127041.79, abs=0.01)


def test_wsclient_echo_with_errors() -> None:
    _, stop, closed = load.parse_events(sample("wsclient-echo-backend-killed.txt"))
    assert closed["errors"] == {"unexpected CLOSED": 2}
    assert load.parse_echo(stop, closed) == Echo(
        echoed=83535, seconds=1.5008702559999847, cpu_seconds=0.8183534149999999, errors=2
    )
    undrained = {**closed, "undrained": 3}
    assert load.parse_echo(stop, undrained).errors == 5


def test_wsclient_hold() -> None:
    events = load.parse_events(sample("wsclient-hold.txt"))
    assert [e["event"] for e in events] == ["ready", "open", "stats", "closed", "error"]
    assert load.parse_opened(events[1]) == Opened(
        opened=5, failed=0, seconds=0.003659752999965349, failures={}
    )
    assert events[2]["open"] == 5
    assert events[3]["codes"] == {"1000": 5}
    assert events[4]["message"] == "unknown command 'bogus'"


def test_wsclient_hold_refused() -> None:
    _, opened = load.parse_events(sample("wsclient-hold-refused.txt"))
    got = load.parse_opened(opened)
    assert (got.opened, got.failed, got.seconds) == (0, 3, 0.0018420950000290759)
    assert got.failures == {
        "ClientConnectorError: Cannot connect to host 127.0.0.1:36387 ssl:default "
        "[Connect call failed ('127.0.": 3
    }


def test_flooder_answered_and_reopened() -> None:
    """bench/flooder.py on http.server: idle and partial heads held, slow POSTs answered 501
    at once (counted, reopened), an unknown command, then the final counts."""
    events = load.parse_events(sample("flooder-http-server.txt"))
    assert [e["event"] for e in events] == ["opened", "stats", "error", "closed"]
    opened = load.parse_flooder(events[0])
    assert opened == Flooded(
        open={"idle": 3, "partial": 3, "slow": 1},
        opened={"idle": 3, "partial": 3, "slow": 5},
        connect_failed={},
        closed_by_server={"idle": 0, "partial": 0, "slow": 4},
        answered={"501": 4},
        body_bytes=0,
        sources=("127.0.0.10", "127.0.0.12", 3),
        seconds=1.032,
        cpu_seconds=0.056,
    )
    assert (opened.open_total, opened.reopened) == (7, 4)
    closed = load.parse_flooder(events[3])
    assert (closed.open_total, closed.reopened, closed.answered) == (0, 11, {"501": 11})
    assert events[2]["message"] == "unknown command 'bogus'"


def test_flooder_refused() -> None:
    opened, closed = map(load.parse_flooder, load.parse_events(sample("flooder-refused.txt")))
    assert (opened.open_total, opened.connect_failed) == (0, {"ConnectionRefusedError": 3})
    assert closed.connect_failed == {"ConnectionRefusedError": 9}
    assert closed.sources == ("127.0.0.10", "127.0.0.10", 1)


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_wsclient_stream_in_pieces(size: int) -> None:
    """Lines split anywhere by the pipe come out whole, in order; the rest waits."""
    data = sample("wsclient-hold.txt").encode()
    events, rest = [], b""
    for start in range(0, len(data), size):
        got, rest = load.split_events(rest + data[start : start + size])
        events += got
    assert rest == b""
    assert events == load.parse_events(data.decode())
    assert load.split_events(b'{"event":"start"}\n{"event":"st') == (
        [{"event": "start"}],
        b'{"event":"st',
    )


@pytest.mark.parametrize("line", [b"[1, 2]", b'{"echoed": 1}', b'{"event": 3}', b"not json"])
def test_wsclient_not_an_event(line: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's own error is a ValueError too
        load.parse_event(line)


def test_wsclient_process_events(tmp_path: Path) -> None:
    """WsClient reads a real process's stdout: the events it waits for, skipping others; an
    error event or the end of its output is a RuntimeError."""
    command = [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"]
    client = load.WsClient(command, tmp_path / "client.err", stdin=True)
    try:
        client.send(sample("wsclient-hold.txt").rstrip("\n"))
        assert client.proc.stdin is not None
        client.proc.stdin.close()
        assert client.expect("stats", timeout=10)["rss_kib"] == 38316  # ready, open skipped
        with pytest.raises(RuntimeError, match=r"client error.*bogus"):
            client.expect("quit", timeout=10)  # closed skipped, then the error
        with pytest.raises(RuntimeError, match="client exited"):
            client.expect("quit", timeout=10)
    finally:
        client.finish(timeout=5)
    assert client.proc.returncode == 0


# -- the gateway's /metrics ----------------------------------------------------------------


def test_metrics_of_two_workers() -> None:
    samples = servers.parse_metrics(sample("metrics-2-workers.txt"))
    assert len(samples) == 63  # 113 lines, 50 of them # HELP and # TYPE
    total = servers.total
    assert total(samples, "http_requests_total", service="bench") == 40.0
    assert total(samples, "http_requests_total", status="503", worker="1") == 8.0
    assert total(samples, "gateway_workers_reporting") == 2.0
    assert total(samples, "gateway_health_checks_total", result="fail") is None
    assert servers.total_by(samples, "http_requests_total", "status") == {"200": 20.0, "503": 20.0}
    assert servers.total_by(samples, "active_connections", "worker") == {}  # zeros left out
    up = servers.select(samples, "gateway_node_up", node="bench")
    assert [(s.labels["worker"], s.value) for s in up] == [("0", 1.0), ("1", 1.0)]
    build = servers.select(samples, "gateway_build_info")[0]
    assert build.labels == {"version": "0.1.0", "worker": "0"}
    created = servers.select(samples, "http_requests_created", status="503", worker="0")
    assert created[0].value == pytest.approx(1.7961137700193202e9)


def test_metrics_label_values_with_quotes() -> None:
    text = 'm{a="x\\"y",b="1,2"} 3\nm 4 1700000000\n# TYPE m counter\n'
    assert servers.parse_metrics(text) == [
        servers.Sample("m", {"a": 'x\\"y', "b": "1,2"}, 3.0),
        servers.Sample("m", {}, 4.0),
    ]


# -- answers over HTTP (run.py's check before --suite auth loads) --------------------------

# The gateway's 401 to a request with `Origin: https://app.daarion.space` and no token, from
# bench/variants/auth.yaml on 127.0.0.1 (its request id shortened).
REFUSED = (
    b"HTTP/1.1 401 Unauthorized\r\n"
    b"X-Request-ID: 2accbd2f01382090\r\n"
    b"Cache-Control: no-store\r\n"
    b"Server: daarion-gateway\r\n"
    b'WWW-Authenticate: Bearer realm="daarion"\r\n'
    b"Content-Type: application/json\r\n"
    b"Access-Control-Allow-Origin: https://app.daarion.space\r\n"
    b"Access-Control-Allow-Credentials: true\r\n"
    b"Access-Control-Expose-Headers: X-Request-ID, RateLimit, RateLimit-Policy, Retry-After\r\n"
    b"Vary: Origin\r\n"
    b"Content-Length: 47\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":"missing_token","message":"a bearer token is needed"}'
)


def test_answer_headers() -> None:
    status, head, body = servers.split_answer(REFUSED)
    assert status == 401
    assert body.startswith(b'{"error":"missing_token"')
    values = servers.header_values
    assert values(head, "access-control-allow-origin") == ["https://app.daarion.space"]
    assert values(head, "WWW-Authenticate") == ['Bearer realm="daarion"']
    assert values(head, "Access-Control-Expose-Headers") == [
        "X-Request-ID, RateLimit, RateLimit-Policy, Retry-After"
    ]
    assert values(head, "Access-Control-Allow-Methods") == []
    assert values(head, "HTTP/1.1 401 Unauthorized") == []  # the status line is no header


def test_answer_headers_repeated_and_spaced() -> None:
    head = b"HTTP/1.1 200 OK\r\nVary: Origin\r\nvary :Accept-Encoding \r\nX-Empty:\r\nbroken line"
    assert servers.header_values(head, "Vary") == ["Origin", "Accept-Encoding"]
    assert servers.header_values(head, "x-empty") == [""]
    assert servers.header_values(head, "broken line") == []
    assert servers.header_values(b"", "Vary") == []


# -- bodies (run.py's check of every shape before loading) ---------------------------------


def test_dechunk() -> None:
    # nginx's chunked answer (bench/run.py's backend, /chunked: SSI drops its Content-Length).
    assert servers.dechunk(b'b\r\n{"ok":true}\r\n0\r\n\r\n') == b'{"ok":true}'
    assert servers.dechunk(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n") == b"abcde"
    assert servers.dechunk(b"0\r\n\r\n") == b""
    assert servers.dechunk(b"A\r\n0123456789\r\n0\r\n\r\n") == b"0123456789"
    for broken in (b"", b"b\r\n{}", b"3\r\nabcd\r\n0\r\n\r\n", b"zz\r\nab\r\n", b"3\r\nabc\r\n"):
        assert servers.dechunk(broken) is None


def test_request_over_sends_the_body_with_its_length() -> None:
    ours, theirs = socket.socketpair()
    got = bytearray()

    def server() -> None:
        with theirs:
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 5:
                got.extend(theirs.recv(65536))
            theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=server)
    thread.start()
    with ours:
        answer = servers.request_over(ours, "POST", "/up", headers=["X-A: 1"], body=b"hello")
    thread.join(5)
    assert bytes(got) == (
        b"POST /up HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello"
    )
    assert servers.split_answer(answer) == (200, b"HTTP/1.1 200 OK\r\nContent-Length: 2", b"ok")
