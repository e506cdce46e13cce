"""One typed config per service, built by cli.py from flags (defaults from TRIPTYCH_* env)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def env_default(name: str, fallback: str) -> str:
    """The value of TRIPTYCH_<NAME>, or `fallback`: every flag can come from the environment."""
    return os.environ.get(f"TRIPTYCH_{name.upper()}", fallback)


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC server shares: address, message limits, keepalive, shutdown grace."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port (tests)
    max_message_mib: int = 256  # a request carrying embeddings of many large images needs far more than 4 MB
    keepalive_time_s: int = 30
    keepalive_timeout_s: int = 10
    grace_s: float = 30.0  # in-flight requests get this long to finish after SIGTERM

    @property
    def listen_addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def options(self) -> list[tuple[str, int]]:
        max_bytes = self.max_message_mib << 20
        return [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_s * 1000),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_s * 1000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]


@dataclass(frozen=True)
class EncoderConfig:
    model: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    device: str = "cpu"
    max_items_per_request: int = 64
    max_item_patches: int = 65536  # patches (tower input rows) one media item may have; Qwen2-VL max_pixels default


@dataclass(frozen=True)
class LlmConfig:
    model: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    device: str = "cpu"
    max_running_requests: int = 8  # requests decoded in turn; more wait in the queue
    max_waiting_requests: int = 256  # beyond this a request is RESOURCE_EXHAUSTED
    default_max_new_tokens: int = 256


@dataclass(frozen=True)
class ProcessorConfig:
    model: Path
    encoder_addr: str
    llm_addr: str
    server: ServerConfig = field(default_factory=ServerConfig)
    allowed_media_dirs: tuple[Path, ...] = ()  # file:// URLs must resolve inside one of these
    max_media_mib: int = 32  # encoded bytes of one media item
    max_image_pixels: int = 50_000_000  # decompression-bomb cap (width * height)
    max_images_per_request: int = 32
    connect_timeout_s: float = 60.0  # how long start-up waits for the encoder and the LLM
    default_timeout_s: float = 600.0  # deadline for a request whose client set none
    preprocess_threads: int = 2
