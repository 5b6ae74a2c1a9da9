"""Engine-test fixtures: the vision tower in-process, to make a request's rows as an encoder would."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def vision(tiny_model_dir):
    from encode_server.encoder import Encoder

    enc = Encoder(str(tiny_model_dir), cache_bytes=0)
    yield enc
    enc.close()
