"""EncodeService with a real transfer receiver in this process (ZMQ): a good request delivers its
rows into the room; a request the encoder refuses fails its room at once (the encoder abandons it),
so the language side never waits for rows that will not come and the blocks are back at once; a
receiver gone before the rows go makes the encoder answer at once, not at the deadline; a request
given up by its caller while its images wait for the vision tower never has them computed."""

from __future__ import annotations

import threading
import time

import pytest

from encode_server.config import EncodeSettings
from encode_server.metrics import EncodeMetrics
from encode_server.service import EncodeService
from tests.encode_server.conftest import gated_tower, room_request, wait_started
from tests.language_server.conftest import data_url, image_message, make_image
from transfer import BufferSpec, ReceiverSettings, RoomFailed, TransferReceiver


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = EncodeService(EncodeSettings(model=str(tiny_model_dir), max_images_per_request=2), EncodeMetrics())
    yield svc
    svc.close()


@pytest.fixture
def receiver(tiny_model_dir):
    from deepsplit.model.config import ModelConfig

    cfg = ModelConfig.from_dir(tiny_model_dir)
    spec = BufferSpec(
        hidden=cfg.text.hidden_size, num_deepstack=cfg.n_deepstack, block_size=64, num_blocks=32
    )
    rx = TransferReceiver(spec, ReceiverSettings(backend="zmq"))
    yield rx
    rx.close()


def ask(service, rx, messages, cancelled=None):
    desc, req = room_request(rx, messages)
    return desc, service.handle(req, cancelled)


def test_good_request_delivers_rows(service, receiver):
    desc, resp = ask(service, receiver, image_message("What?", [data_url(make_image(32, 48, 1))]))
    assert resp.status == "ok", resp.message
    got = receiver.wait_room(desc.room, 5)
    assert got.fill_ids.numel() == resp.num_rows and got.embeddings.shape[0] == resp.num_vision_rows
    got.release()
    assert receiver.stats()["blocks_free"] == 32


@pytest.mark.parametrize(
    "messages,status,words",
    [
        (image_message("What?", ["data:image/png;base64,bm90IGFuIGltYWdl"]), "bad_request", "image"),
        (image_message("What?", [data_url(make_image(8, 8, i)) for i in range(3)]), "bad_request", "limit"),
    ],
    ids=["not_an_image", "too_many_images"],
)
def test_refused_request_fails_its_room_at_once(service, receiver, messages, status, words):
    desc, resp = ask(service, receiver, messages)
    assert resp.status == status and words in resp.message, resp
    with pytest.raises(RoomFailed, match="encoder: bad_request"):
        receiver.wait_room(desc.room, 5)  # failed by the encoder's Abort, not by a deadline
    assert receiver.stats()["blocks_free"] == 32


def test_a_language_node_gone_fails_the_request_long_before_its_deadline(service, receiver):
    """The language node's receiver closes after handing out its descriptor (its process died): the
    encoder's send sees the connection closed and answers at once instead of holding its slot for the
    request's 20 s deadline."""
    desc, req = room_request(receiver, image_message("What?", [data_url(make_image(32, 48, 2))]))
    receiver.close()
    t = time.monotonic()
    resp = service.handle(req)
    took = time.monotonic() - t
    assert resp.status == "transfer_failed" and "receiver gone" in resp.message, resp
    assert took < 5, f"the encoder answered after {took:.1f}s: {resp.message}"


def test_transfer_settings_reach_the_sender(tiny_model_dir):
    settings = EncodeSettings(
        model=str(tiny_model_dir),
        mooncake_write_pieces=2,
        mooncake_min_piece_bytes=8192,
        mooncake_write_retries=0,
        link_timeout_s=3.5,
    )
    svc = EncodeService(settings, EncodeMetrics())
    try:
        s = svc.sender.settings
        assert (s.mooncake_write_pieces, s.mooncake_min_piece_bytes, s.mooncake_write_retries) == (2, 8192, 0)
        assert s.link_timeout_s == 3.5
    finally:
        svc.close()


def test_a_request_given_up_while_its_images_wait_is_never_computed(service, receiver):
    from encode_server.batcher import VisionBatcher

    tower, gate, seen = gated_tower(service.encoder.vision)  # busy with another image until `gate`
    own, service.encoder.batcher = service.encoder.batcher, VisionBatcher(tower, 1 << 30)
    try:
        p, g = service.encoder.pre.images_to_patches([make_image(32, 32, 5)])
        busy = service.encoder.batcher.submit(p, g[0])
        wait_started(seen)  # what comes next waits in the queue
        cancelled, out = threading.Event(), {}
        img = make_image(40, 40, 6)
        msgs = image_message("?", [data_url(img)])

        def given_up():
            out["desc"], out["resp"] = ask(service, receiver, msgs, cancelled)

        t = threading.Thread(target=given_up)
        t.start()
        time.sleep(0.5)  # its image is queued behind the busy one
        cancelled.set()
        t.join(5)
        assert not t.is_alive(), "still waiting for the vision tower"
        assert out["resp"].status == "cancelled", out["resp"]
        with pytest.raises(RoomFailed, match="encoder: cancelled"):
            receiver.wait_room(out["desc"].room, 5)  # its room is freed at once
        gate.set()
        busy.result(timeout=30)
        service.encoder.batcher.submit(p, g[0]).result(timeout=30)
        assert len(seen) == 2  # the busy image and the last one: never the given-up image
        assert receiver.stats()["blocks_free"] == 32
    finally:
        gate.set()
        service.encoder.batcher.close()
        service.encoder.batcher = own
