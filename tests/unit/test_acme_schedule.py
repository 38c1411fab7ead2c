"""When ACME renews and retries: ``renewal_delay``, ``retry_delay`` and ``covers``, pure
functions of their arguments (no clock, no files, no CA)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.certs import Pair
from gateway.edge.acme import DAY, covers, renewal_delay, retry_delay

ISSUED = 1_700_000_000.0  # any moment: the functions only compare times


def test_a_90_day_certificate_is_renewed_30_days_before_it_expires() -> None:
    expires = ISSUED + 90 * DAY
    assert renewal_delay(ISSUED, expires, 30, now=ISSUED) == 60 * DAY
    assert renewal_delay(ISSUED, expires, 30, now=ISSUED + 59 * DAY) == DAY
    assert renewal_delay(ISSUED, expires, 30, now=ISSUED + 60 * DAY) == 0
    assert renewal_delay(ISSUED, expires, 1, now=ISSUED) == 89 * DAY


def test_a_certificate_past_its_renewal_or_expiry_is_due_at_once() -> None:
    expires = ISSUED + 90 * DAY
    assert renewal_delay(ISSUED, expires, 30, now=ISSUED + 75 * DAY) == 0
    assert renewal_delay(ISSUED, expires, 30, now=expires + 365 * DAY) == 0


def test_a_certificate_shorter_than_the_window_is_renewed_at_its_midpoint() -> None:
    """Six-day certificates with the default 30-day window: due at day 3, not at once (which
    would order a new one, due at once too, again and again)."""
    expires = ISSUED + 6 * DAY
    assert renewal_delay(ISSUED, expires, 30, now=ISSUED) == 3 * DAY
    assert renewal_delay(ISSUED, expires, 3, now=ISSUED) == 3 * DAY  # the window is the half
    assert renewal_delay(ISSUED, expires, 2, now=ISSUED) == 4 * DAY  # the window, once it fits


@given(
    lifetime=st.floats(min_value=1.0, max_value=400 * DAY),
    renew_before_days=st.integers(min_value=1, max_value=365),
    elapsed=st.floats(min_value=0.0, max_value=800 * DAY),
)
def test_renewal_is_never_before_half_the_lifetime_nor_after_the_expiry(
    lifetime: float, renew_before_days: int, elapsed: float
) -> None:
    expires = ISSUED + lifetime
    now = ISSUED + elapsed
    delay = renewal_delay(ISSUED, expires, renew_before_days, now)
    assert delay >= 0
    due = max(ISSUED + lifetime / 2, expires - renew_before_days * DAY)
    if delay > 0:
        assert now + delay == pytest.approx(due, abs=1e-3)
        assert ISSUED + lifetime / 2 - 1e-3 <= now + delay <= expires
    else:
        assert now >= due - 1e-3


def test_retries_double_from_the_first_delay_up_to_the_most() -> None:
    middle = 0.5  # jitter 0.5: the nominal delay itself
    delays = [retry_delay(n, first=60, most=3600, jitter=middle) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert retry_delay(10_000, first=60, most=3600, jitter=middle) == 3600  # no overflow


@pytest.mark.parametrize(("jitter", "factor"), [(0.0, 0.75), (0.5, 1.0), (0.999, 1.2495)])
def test_jitter_spreads_a_retry_over_three_quarters_to_five_quarters(
    jitter: float, factor: float
) -> None:
    assert retry_delay(1, first=60, most=3600, jitter=jitter) == pytest.approx(60 * factor)
    assert retry_delay(20, first=60, most=3600, jitter=jitter) == pytest.approx(3600 * factor)


def pair(*names: str) -> Pair:
    return Pair(
        cert_path="chain.pem",
        key_path="key.pem",
        names=names,
        not_after=ISSUED + DAY,
        not_before=ISSUED,
        fingerprint="00",
    )


def test_a_certificate_covers_the_domains_when_it_names_each_of_them() -> None:
    assert covers(pair("a.test", "b.test"), ("a.test", "b.test"))
    assert covers(pair("b.test", "a.test", "c.test"), ("a.test",))
    assert covers(pair("*.a.test"), ("www.a.test",))
    assert not covers(pair("a.test"), ("a.test", "www.a.test"))
    assert not covers(pair("*.a.test"), ("a.test",))
    assert not covers(pair(), ("a.test",))
