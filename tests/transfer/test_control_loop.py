"""The receiver's control thread sleeps until there is work: a message, an API thread's wake-up, a
room's deadline, a quarantine's end. These tests stretch its longest sleep to 30 s, so anything it
failed to plan for would come 30 s late instead of within the few seconds allowed here."""

from __future__ import annotations

import time

import pytest

from tests.transfer.conftest import wait_until
from tests.transfer.test_malformed import answer, dealer
from transfer import RoomFailed
from transfer import messages as m
from transfer import receiver as receiver_module


@pytest.fixture(autouse=True)
def long_sleeps(monkeypatch):
    monkeypatch.setattr(receiver_module, "MAX_SLEEP_S", 30.0)


def test_an_idle_receiver_does_not_poll(make_receiver):
    rx = make_receiver("zmq", room_ttl_s=60)
    calls = []
    rx._housekeep = lambda now, real=rx._housekeep: (calls.append(now), real(now))
    rx.open_room(16)
    time.sleep(0.5)
    assert len(calls) <= 2, f"{len(calls)} housekeeping rounds in 0.5 s of idling (polling?)"


def test_an_abort_wakes_the_thread_to_tell_the_sender(make_receiver):
    rx = make_receiver("zmq", room_ttl_s=60)
    d = rx.open_room(16)
    s = dealer(rx.control)
    s.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    rx.abort(d.room, "client went away")
    msg = answer(s, 5000)
    assert isinstance(msg, m.Abort) and msg.reason == "client went away"
    s.close()


def test_a_room_opened_while_the_thread_sleeps_still_expires_on_time(make_receiver):
    rx = make_receiver("zmq", room_ttl_s=0.3)
    d = rx.open_room(16)
    with pytest.raises(RoomFailed, match="deadline"):
        rx.wait_room(d.room, 5)
    assert rx.allocator.num_used == 0


def test_a_quarantine_ends_on_time_while_the_thread_sleeps(make_receiver):
    rx = make_receiver("mooncake", room_ttl_s=60, stale_write_guard_s=0.3)
    d = rx.open_room(16)
    s = dealer(rx.control)
    s.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    rx.abort(d.room)  # the claimant may be writing: its blocks wait out the guard
    assert rx.stats()["blocks_quarantined"] == len(d.block_ids)
    wait_until(lambda: rx.allocator.num_used == 0, timeout=5, what="the quarantine to end")
    s.close()
