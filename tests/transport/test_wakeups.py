"""How the base transport wakes receivers and waits to be woken (logic only, a scripted backend)."""

import time

from amoe_transport import Message, Transport


class Scripted(Transport):
    """Messages show up at chosen poll counts; _idle records its sleeps and says whether a
    wake-up cut them short (the backend's bell)."""

    def __init__(self, arrive_at_poll: int | None, woken: list[bool], bell_covers_all: bool) -> None:
        super().__init__()
        self.rank, self.size = 0, 3
        self.arrive_at_poll, self.woken, self.bell = arrive_at_poll, list(woken), bell_covers_all
        self.polls, self.sleeps, self.events = 0, [], []

    def isend(self, dst, tag, header, tensors=()):
        self.events.append(("send", dst))
        self._notify(dst)

    def _wake(self, dst):
        self.events.append(("wake", dst))

    def _woken_by_all(self):
        return self.bell

    def _sleep_cap(self, max_sleep):
        return 0.02 if self.bell else max_sleep

    def _idle(self, seconds):
        self.sleeps.append(seconds)
        if self.woken and self.woken.pop(0):
            return True
        time.sleep(seconds)
        return False

    def _progress(self, max_recv):
        self.polls += 1
        if self.polls == self.arrive_at_poll:
            self._inbox.append(Message(1, 5, {}))

    def pending_sends(self):
        return 0

    def close(self):
        self._closed = True


def test_alltoallv_wakes_receivers_after_the_last_send():
    t = Scripted(None, [], True)
    t.alltoallv(4, {1: ({}, []), 2: ({}, [])})
    assert t.events == [("send", 1), ("send", 2), ("wake", 1), ("wake", 2)]
    t.events.clear()
    t.isend(2, 4, {})  # a single send wakes at once
    assert t.events == [("send", 2), ("wake", 2)]


def test_a_rank_every_peer_wakes_sleeps_until_woken():
    """No back-off from 16 µs: one sleep to the cap, and the message that trails its bell is
    found by the short spin, with no second sleep."""
    t = Scripted(arrive_at_poll=4, woken=[True], bell_covers_all=True)
    got = t.wait(1.0, max_sleep=0.002)
    assert [m.src for m in got] == [1]
    assert t.sleeps == [0.02]


def test_without_wakeups_the_back_off_starts_short():
    t = Scripted(arrive_at_poll=4, woken=[], bell_covers_all=False)
    got = t.wait(1.0, max_sleep=0.002)
    assert [m.src for m in got] == [1]
    assert t.sleeps == [16e-6, 32e-6, 64e-6]


def test_a_wake_up_without_a_message_backs_off_from_short_again():
    t = Scripted(arrive_at_poll=None, woken=[True, False], bell_covers_all=True)
    assert t.wait(0.05, max_sleep=0.002) == []
    assert t.sleeps[0] == 0.02 and t.sleeps[1] == 16e-6 and t.sleeps[2] == 32e-6
