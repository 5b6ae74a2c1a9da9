"""Assemble one language server from its settings: model, KV cache, scheduler, engine, provider, app.

`LanguageServer.build(settings)` loads everything and starts the engine thread; `.app` is the ASGI
app to serve (`.serve()` runs uvicorn on settings.host/port until SIGTERM/SIGINT, then drains: no
new connections, the requests in flight get `shutdown_grace_s` to finish, and those still running
then end with a 503 error instead of a cut connection); `await .aclose()` stops the engine and the
provider. Providers are looked up by mode with lazy imports, so the disaggregated one plugs in
without touching this.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass

from deepsplit.images import ImageLimits
from language_server.config import LanguageSettings
from language_server.mm.base import MultimodalProvider

log = logging.getLogger(__name__)
FLUSH_S = 2.0  # after the grace: time for the requests ended then to send their error

PROVIDERS = {
    "monolithic": "language_server.mm.monolithic:MonolithicProvider",
    "disaggregated": "language_server.mm.disaggregated:DisaggregatedProvider",
}


def make_provider(settings: LanguageSettings) -> MultimodalProvider:
    module, _, name = PROVIDERS[settings.mode].partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"--mode {settings.mode} is not available in this build: {e}") from e
    limits = ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        allow_http=settings.allow_http_images,
    )
    if settings.mode == "monolithic":
        return cls(
            settings.model,
            limits,
            dtype=settings.dtype,
            max_pixels=settings.max_pixels,
            max_batch_patches=settings.vision_max_batch_patches,
            cache_bytes=settings.vision_cache_bytes,
            timeout_s=settings.encode_timeout_s,
        )
    return cls(settings, limits)


@dataclass
class BuiltEngine:
    engine: object  # language_server.engine.engine.Engine (not started)
    cfg: object  # deepsplit ModelConfig
    preprocessor: object
    max_model_len: int
    grammars: object = None  # language_server.engine.grammar.Grammars


def build_engine(settings: LanguageSettings) -> BuiltEngine:
    """Load the language model and wire runner + scheduler + engine; the caller starts the engine."""
    import torch

    from deepsplit.model.build import load_language_model
    from deepsplit.model.processor import Preprocessor
    from language_server.engine.block_manager import BlockManager
    from language_server.engine.engine import Engine
    from language_server.engine.grammar import Grammars
    from language_server.engine.runner import ModelRunner
    from language_server.engine.scheduler import Scheduler
    from transfer import heap

    heap.keep_freed_heap(settings.malloc_keep_freed_bytes)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    lm, cfg = load_language_model(settings.model, dtype=settings.dtype)
    pre = Preprocessor.from_dir(settings.model, max_pixels=settings.max_pixels)
    dtype = lm.lm_head.weight.dtype
    num_blocks = ModelRunner.blocks_for_bytes(cfg, settings.kv_cache_bytes, settings.block_size, dtype)
    if num_blocks < 2:
        raise ValueError(f"kv_cache_bytes={settings.kv_cache_bytes} holds fewer than 2 blocks")
    capacity = num_blocks * settings.block_size
    max_len = min(settings.max_model_len or cfg.text.max_position_embeddings, capacity - 1)
    log.info(
        "KV cache: %d blocks x %d tokens (%d tokens); max_model_len %d",
        num_blocks,
        settings.block_size,
        capacity,
        max_len,
    )
    grammars = Grammars(pre.tokenizer, cfg.text.vocab_size)
    runner = ModelRunner(lm, cfg, num_blocks, settings.block_size, tuple(cfg.eos_token_ids), grammars)
    scheduler = Scheduler(
        BlockManager(num_blocks, settings.block_size, settings.enable_prefix_caching),
        settings.max_num_seqs,
        settings.max_num_batched_tokens,
    )
    engine = Engine(runner, scheduler, pre.tokenizer, cfg.eos_token_ids)
    return BuiltEngine(engine, cfg, pre, max_len, grammars)


@dataclass
class LanguageServer:
    settings: LanguageSettings
    engine: object
    serving: object
    app: object
    provider: MultimodalProvider | None

    @classmethod
    def build(cls, settings: LanguageSettings, provider: MultimodalProvider | None = None) -> LanguageServer:
        from language_server.api.app import build_app
        from language_server.api.metrics import Metrics
        from language_server.api.serving import Serving

        if provider is None:  # first: a mode that cannot start fails before the model loads
            provider = make_provider(settings)
        built = build_engine(settings)
        engine = built.engine
        metrics = Metrics(engine.stats, provider.buffer_usage if provider else (lambda: None))
        engine.on_step = lambda out, dt: metrics.step.observe(dt)
        serving = Serving(
            settings,
            engine,
            built.preprocessor,
            provider,
            metrics,
            built.max_model_len,
            built.cfg.text.vocab_size,
            built.grammars,
        )
        app = build_app(serving, settings)
        server = cls(settings, engine, serving, app, provider)
        app.router.on_shutdown.append(server.aclose)
        engine.start(settings.threads)
        return server

    def serve(self) -> None:
        import uvicorn

        grace = self.settings.shutdown_grace_s
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=self.settings.host,
                port=self.settings.port,
                log_level=self.settings.log_level.lower(),
                timeout_graceful_shutdown=grace + FLUSH_S,
            )
        )

        async def watch() -> None:  # the lifespan's startup: a task on the server's own loop
            self._drain = asyncio.get_running_loop().create_task(self._end_after_grace(server, grace))

        self.app.router.on_startup.append(watch)
        server.run()

    async def _end_after_grace(self, server, grace: float) -> None:
        """Once the server is told to exit (it stops accepting at once), give the requests in flight
        `grace` seconds, then end those still in the engine with a 503 (streams get an error event)."""
        while not server.should_exit:
            await asyncio.sleep(0.1)
        st = self.engine.stats()
        held = st["running"] + st["waiting"] + st["waiting_for_embeddings"]
        if held:
            log.info("shutting down: %d requests in flight get up to %.0f s to finish", held, grace)
        await asyncio.sleep(grace)
        self.engine.fail_all("the server is shutting down", 503)

    async def aclose(self) -> None:
        self.engine.stop()
        if self.provider is not None:
            await self.provider.close()
