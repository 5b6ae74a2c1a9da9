"""Settings of one encode server (configs/encode.yaml documents each); frozen, validated at start."""

from __future__ import annotations

from copy import copy

from pydantic import BaseModel, ConfigDict, Field

from transfer import SenderSettings


class EncodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="checkpoint directory (only model.visual.* weights are loaded)")
    host: str = "127.0.0.1"
    port: int = Field(30001, ge=0, le=65535)
    dtype: str | None = Field(None, description="float32 | bfloat16 (default: the checkpoint's)")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch default)")
    malloc_keep_freed_bytes: int = Field(
        128 * 2**20,
        ge=0,
        description="glibc: freed heap kept per malloc arena for reuse instead of faulted in again "
        "(vision activations); 0: glibc's default",
    )
    max_batch_patches: int = Field(16384, ge=1, description="patch budget of one batched vision forward")
    cache_bytes: int = Field(256 * 2**20, ge=0, description="embedding cache size (LRU by bytes); 0 disables")
    max_pixels: int | None = Field(
        None, ge=1024, description="resize budget per image (default: the checkpoint's)"
    )
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="decoded size limit (decompression-bomb guard)"
    )
    max_images_per_request: int = Field(16, ge=1)
    allow_http_images: bool = False
    max_concurrent_requests: int = Field(64, ge=1, description="beyond this, encode requests get 503")
    transfer_deadline_s: float = Field(30.0, gt=0)
    claim_ahead: bool = Field(
        False,
        description="Mooncake: claim the room once the prompt's rows are known, so the handshake "
        "travels during the vision forward (one round trip less per request; a room aborted during "
        "that forward keeps its blocks until this encoder reaches its send)",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="after SIGTERM/SIGINT: no new connections, and the encodes in flight get this long "
        "to finish before their calls are cut (the language server retries them elsewhere)",
    )
    health_progress_s: float = Field(
        30.0,
        gt=0,
        description="GET /health runs a real encode only if none ran this recently (and must finish within it)",
    )
    transfer_host: str = Field(
        "127.0.0.1", description="address this node's Mooncake engine binds/advertises"
    )
    mooncake_protocol: str = Field("tcp", description="Mooncake transport: tcp | rdma")
    mooncake_device: str = Field("", description="RDMA device names for Mooncake (empty for tcp)")
    # the sender's own settings, defaults and bounds included (passed through unchanged)
    mooncake_write_pieces: int = copy(SenderSettings.model_fields["mooncake_write_pieces"])
    mooncake_min_piece_bytes: int = copy(SenderSettings.model_fields["mooncake_min_piece_bytes"])
    mooncake_write_retries: int = copy(SenderSettings.model_fields["mooncake_write_retries"])
    link_timeout_s: float = copy(SenderSettings.model_fields["link_timeout_s"])
    register_with: list[str] = Field(
        default_factory=list, description="language servers to announce this encoder to (self-registration)"
    )
    advertise_url: str | None = Field(
        None, description="URL language servers reach us at (default http://host:port)"
    )
    register_ttl_s: float = Field(15.0, gt=0, description="registration lifetime; renewed every third of it")
    register_api_key: str | None = Field(
        None, description="Bearer key of the language servers, if they need one"
    )
    log_level: str = "info"
