"""Settings of one language server (configs/language.yaml documents each); frozen, validated at start.

Loaded by `deepsplit.settings.load_settings` (YAML -> env DEEPSPLIT_LANGUAGE_* -> CLI flags). Derived
values are properties. It knows nothing of how the engine or the HTTP app use them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LanguageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="checkpoint directory (text weights + lm_head are loaded)")
    served_model_name: str | None = Field(
        None, description="name clients send as `model` (default: dir name)"
    )
    host: str = "127.0.0.1"
    port: int = Field(30000, ge=0, le=65535)
    api_key: str | None = Field(None, description="if set, requests need `Authorization: Bearer <key>`")
    mode: Literal["monolithic", "disaggregated"] = "monolithic"
    encoder_urls: list[str] = Field(default_factory=list, description="encode servers (disaggregated mode)")
    encoder_dns: list[str] = Field(
        default_factory=list,
        description="host:port names resolved periodically to encoders (headless Service)",
    )
    dns_interval_s: float = Field(10.0, gt=0, description="seconds between DNS refreshes")
    allow_encoder_registration: bool = Field(
        False, description="accept POST /v1/encoders/register from encoders (behind the API key)"
    )
    encoder_health_interval_s: float = Field(2.0, gt=0, description="seconds between encoder health probes")
    encode_attempts: int = Field(3, ge=1, description="encoders tried per request before a 503")
    encoder_probe_timeout_s: float = Field(
        5.0, gt=0, description="an encoder whose GET /health takes longer leaves the rotation"
    )
    encoder_stalled_probes: int = Field(
        2,
        ge=0,
        description="an encoder whose health probes time out this many times in a row is given up "
        "for the requests it holds too (retried on another encoder; a hung process keeps its "
        "connections open); 0: only new requests avoid it",
    )
    encoder_link_timeout_s: float = Field(
        10.0,
        ge=0,
        description="an encoder whose host stops answering mid-request (died, partitioned) is given up "
        "after about this long (TCP keepalive / TCP_USER_TIMEOUT) and the request retried elsewhere; "
        "0: the kernel's defaults",
    )
    # data plane (disaggregated mode): where encoders push rows
    transfer_backend: Literal["mooncake", "zmq"] | None = Field(
        None, description="mooncake | zmq (default: mooncake where it imports, else zmq)"
    )
    transfer_host: str = Field("127.0.0.1", description="address encoders reach this node's buffers at")
    transfer_port: int = Field(0, ge=0, le=65535, description="ZMQ control/data port (0: a free one)")
    mooncake_protocol: str = Field("tcp", description="tcp | rdma")
    mooncake_device: str = Field("", description="RDMA device names (empty for tcp)")
    mm_buffer_bytes: int = Field(256 * 2**20, ge=2**20, description="receive pool for vision rows, bytes")
    mm_block_size: int = Field(256, ge=1, description="rows per receive-pool block")
    mm_initial_rows: int = Field(1024, ge=1, description="rows a room gets before the encoder asks to resume")
    mm_grow_on_begin: bool = Field(
        True, description="grow a room at the encoder's handshake when blocks are free (else it resumes)"
    )
    transfer_ttl_s: float = Field(
        120.0, gt=0, description="a room not filled within this (encode queueing included) fails and is freed"
    )
    transfer_stale_write_guard_s: float = Field(
        600.0,
        gt=0,
        description="Mooncake: a failed room's blocks wait for its sender to report back, at most this",
    )
    malloc_keep_freed_bytes: int = Field(
        128 * 2**20,
        ge=0,
        description="glibc: freed heap kept per malloc arena for reuse instead of faulted in again "
        "(prefill activations, ZMQ receive buffers); 0: glibc's default",
    )
    dtype: str | None = Field(None, description="float32 | bfloat16 (default: the checkpoint's)")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch default)")
    # KV cache
    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_bytes: int = Field(256 * 2**20, ge=4096, description="memory for the paged KV cache")
    max_model_len: int | None = Field(None, ge=16, description="prompt + output limit (default: the model's)")
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the K/V of full blocks a request shares with an earlier one (the same tokens "
        "and images from the start); free cached blocks are evicted least recently used",
    )
    # scheduling
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(1024, ge=16, description="token budget of one engine step")
    max_waiting_requests: int = Field(256, ge=1, description="queued requests beyond this get 429")
    # requests
    default_max_tokens: int = Field(256, ge=1)
    max_choices_per_request: int = Field(
        16, ge=1, description="most choices one request may ask (n, times the prompts of a completion)"
    )
    max_logprobs: int = Field(
        20, ge=0, description="most alternatives a request may ask per token (top_logprobs, logprobs)"
    )
    max_images_per_request: int = Field(8, ge=0)
    max_request_bytes: int = Field(32 * 2**20, ge=1024, description="larger bodies get 413")
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded size limit (decompression bombs)")
    allow_http_images: bool = False
    max_pixels: int | None = Field(None, ge=1024, description="image resize budget (default: checkpoint's)")
    # monolithic vision
    vision_max_batch_patches: int = Field(16384, ge=1)
    vision_cache_bytes: int = Field(64 * 2**20, ge=0)
    encode_timeout_s: float = Field(120.0, gt=0)
    shutdown_grace_s: float = Field(
        60.0,
        ge=0,
        description="after SIGTERM/SIGINT: no new connections, and the requests in flight get this long "
        "to finish before they end with a 503 (keep it under the pod's termination grace)",
    )
    # debugging
    debug_endpoints: bool = Field(False, description="expose GET /debug/engine (scheduler state)")
    log_level: str = "info"

    @property
    def backend(self) -> str:
        if self.transfer_backend:
            return self.transfer_backend
        try:
            import mooncake.engine  # noqa: F401
        except ImportError:
            return "zmq"
        return "mooncake"

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return self.served_model_name or Path(self.model).resolve().name
