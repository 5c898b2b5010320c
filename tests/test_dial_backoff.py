"""Discovery's redial schedule for members it could not reach."""

from __future__ import annotations

from peerlearn.backoff import Backoff
from peerlearn.node.swarm import DIAL_RETRY_FIRST, DIAL_RETRY_MAX


def test_failed_dials_wait_twice_as_long_each_time_up_to_a_cap() -> None:
    b = Backoff(DIAL_RETRY_FIRST, DIAL_RETRY_MAX)
    assert b.due("p", 0.0)
    waits = []
    now = 0.0
    for _ in range(10):
        b.failed("p", now)
        assert not b.due("p", now)
        retry_at = b.failures["p"][1]
        waits.append(retry_at - now)
        assert b.due("p", retry_at)
        now = retry_at
    assert waits[:3] == [DIAL_RETRY_FIRST, 2 * DIAL_RETRY_FIRST, 4 * DIAL_RETRY_FIRST]
    assert max(waits) == DIAL_RETRY_MAX
    assert b.unreachable == {"p"}


def test_a_reset_peer_is_dialled_at_once_and_no_longer_unreachable() -> None:
    b = Backoff(DIAL_RETRY_FIRST, DIAL_RETRY_MAX)
    b.failed("p", 0.0)
    b.failed("q", 0.0)
    b.reset("p")  # it reached us, or published new addresses
    assert b.due("p", 0.0)
    assert not b.due("q", 0.0)
    assert b.unreachable == {"q"}


def test_a_member_gone_for_days_is_still_redialled_at_the_cap() -> None:
    b = Backoff(DIAL_RETRY_FIRST, DIAL_RETRY_MAX)
    b.failures["p"] = (5000, 0.0)  # 2**4999 seconds would not even fit a float
    b.failed("p", 0.0)
    assert b.failures["p"] == (5001, DIAL_RETRY_MAX)
