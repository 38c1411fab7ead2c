"""The log lines' timestamps: UTC, milliseconds truncated (never rounded up into the next
second), the seconds part reused within a second and renewed at the next."""

from __future__ import annotations

import pytest

from gateway.logs import _Clock

T = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("created", "text"),
    [
        (T, "2023-11-14T22:13:20.000Z"),
        (T + 0.0015, "2023-11-14T22:13:20.001Z"),
        (T + 0.0429, "2023-11-14T22:13:20.042Z"),
        (T + 0.5004, "2023-11-14T22:13:20.500Z"),
        (T + 0.9994, "2023-11-14T22:13:20.999Z"),
        (T + 1.25, "2023-11-14T22:13:21.250Z"),
        (T + 86_400 * 365, "2024-11-13T22:13:20.000Z"),
    ],
)
def test_timestamps_are_utc_with_truncated_milliseconds(created: float, text: str) -> None:
    assert _Clock().format(created) == text


def test_one_clock_follows_the_seconds_as_they_pass() -> None:
    clock = _Clock()
    seen = [clock.format(T + step / 10) for step in range(25)]
    assert seen[9] == "2023-11-14T22:13:20.900Z"
    assert seen[10] == "2023-11-14T22:13:21.000Z"
    assert seen[24] == "2023-11-14T22:13:22.400Z"
    assert seen == sorted(seen)
