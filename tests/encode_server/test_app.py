"""The encode server's HTTP face on a real uvicorn on loopback: a caller that hangs up on an encode
call (a language server that gave the request up) has it cancelled: the images still waiting for
the vision tower are never computed, and the room is freed at once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from encode_server.app import build_app
from encode_server.batcher import VisionBatcher
from encode_server.config import EncodeSettings
from encode_server.protocol import CONTENT_TYPE, encode
from tests.e2e.conftest import free_port
from tests.encode_server.conftest import gated_tower, room_request, wait_started
from tests.language_server.conftest import data_url, image_message, make_image
from transfer import BufferSpec, ReceiverSettings, RoomFailed, TransferReceiver


def test_a_caller_that_hangs_up_cancels_its_encode(tiny_model_dir):
    from deepsplit.model.config import ModelConfig

    app = build_app(EncodeSettings(model=str(tiny_model_dir), cache_bytes=0))
    enc = app.state.service.encoder
    tower, gate, seen = gated_tower(enc.vision)  # busy with another request's image until `gate`
    enc.batcher.close()
    enc.batcher = VisionBatcher(tower, 1 << 30)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    cfg = ModelConfig.from_dir(tiny_model_dir)
    spec = BufferSpec(hidden=cfg.text.hidden_size, num_deepstack=cfg.n_deepstack, block_size=64, num_blocks=8)
    rx = TransferReceiver(spec, ReceiverSettings(backend="zmq"))
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < end and serving.is_alive()
            time.sleep(0.05)
        p, g = enc.pre.images_to_patches([make_image(32, 32, 5)])
        busy = enc.batcher.submit(p, g[0])
        wait_started(seen)  # the next image waits in the queue
        desc, req = room_request(rx, image_message("?", [data_url(make_image(40, 40, 6))]))
        with pytest.raises(httpx.ReadTimeout):  # the caller gives up and closes its connection
            httpx.post(
                url + "/v1/encode", content=encode(req), headers={"content-type": CONTENT_TYPE}, timeout=1
            )
        with pytest.raises(RoomFailed, match="encoder: cancelled"):
            rx.wait_room(desc.room, 5)  # freed at once, long before the 20 s deadline
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'deepsplit_encode_requests_total{status="cancelled"} 1.0' in metrics
        gate.set()
        busy.result(timeout=30)
        enc.batcher.submit(p, g[0]).result(timeout=30)
        assert len(seen) == 2  # the busy image and the last one: never the given-up image
        assert rx.stats()["blocks_free"] == 8
    finally:
        gate.set()
        server.should_exit = True
        serving.join(15)
        rx.close()
