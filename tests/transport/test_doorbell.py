"""Doorbell: ranks of one node wake each other through per-rank datagram sockets."""

from __future__ import annotations

import pytest

from amoe_transport.doorbell import Doorbell


@pytest.fixture
def bells():
    token = Doorbell.new_token()
    a, b = Doorbell(token, 0, {0, 1}), Doorbell(token, 1, {0, 1})
    yield a, b
    a.close()
    b.close()


def test_ring_wakes_the_sleeper_and_is_drained(bells):
    a, b = bells
    assert a.covers(2) and b.covers(2)
    a.ring(1)
    a.ring(1)
    assert a.rung == 2
    assert b.sleep(5.0) is True  # returns at once: a bell is pending
    assert b.woken == 1
    assert b.sleep(0.01) is False  # both bells were drained by the first wake-up
    assert b.woken == 1


def test_sleep_without_a_bell_times_out(bells):
    _, b = bells
    assert b.sleep(0.01) is False
    assert b.sleep(0.0) is False


def test_ringing_self_or_a_stranger_is_a_no_op(bells):
    a, _ = bells
    a.ring(0)   # itself: not a peer
    a.ring(7)   # not on this node
    assert a.rung == 0


def test_a_peer_that_is_gone_is_dropped():
    token = Doorbell.new_token()
    a = Doorbell(token, 0, {0, 1})  # rank 1 never binds its bell
    try:
        a.ring(1)
        assert a.rung == 0 and not a.covers(2)
    finally:
        a.close()


def test_jobs_do_not_ring_each_other():
    a = Doorbell(Doorbell.new_token(), 0, {0, 1})
    b = Doorbell(Doorbell.new_token(), 1, {0, 1})  # same rank numbers, another job's token
    try:
        a.ring(1)
        assert b.sleep(0.01) is False
    finally:
        a.close()
        b.close()
