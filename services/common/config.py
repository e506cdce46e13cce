"""One typed config per service, and the one place their defaults live.

cli.py makes a flag and a TRIPTYCH_* environment variable for every field below
(`flags.py` reads the fields), so a default written here is the default everywhere.
A field's help text is `doc(...)` metadata; a plain field still gets a flag, with
its name as help. Flag `--foo-bar` <-> env `TRIPTYCH_FOO_BAR`; a field may rename
its flag with `flag=` (e.g. `--encoder` for encoder_addrs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DType = Literal["float32", "bfloat16", "float16"]

# `triptych up` and `triptych generate` meet on this port by default.
DEFAULT_PROCESSOR_PORT = 50051


def doc(text: str, flag: str | None = None, separator: str | None = None) -> dict[str, Any]:
    """Field metadata: the flag's help text, and optionally another flag name than the field's and, for a
    list, what separates its values in the environment (default ':', like PATH)."""
    return {"help": text, **({"flag": flag} if flag else {}), **({"separator": separator} if separator else {})}


# Help shared by the gRPC services (ServerConfig) and the HTTP front (FrontConfig).
_GRACE_HELP = doc("seconds in-flight requests get to finish after SIGTERM")
_DRAIN_HELP = doc(
    "seconds after SIGTERM during which health says NOT_SERVING but new requests are still served (for "
    "probes and load balancers to drain this replica); then new ones are refused and in-flight ones get "
    "--grace-s")
_METRICS_PORT_HELP = doc("port of the Prometheus metrics HTTP endpoint (/metrics, on --host); 0: no metrics endpoint")


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC server shares: address, message limits, keepalive, shutdown grace."""

    host: str = field(default="127.0.0.1", metadata=doc("address to listen on (0.0.0.0: all interfaces)"))
    port: int = field(default=0, metadata=doc("port to listen on; 0 picks a free one"))
    # A request carrying embeddings of many large images needs far more than gRPC's 4 MB.
    max_message_mib: int = field(default=256, metadata=doc("largest message sent or received, MiB"))
    keepalive_time_s: int = field(default=30, metadata=doc("seconds between keepalive pings"))
    keepalive_timeout_s: int = field(default=10, metadata=doc("seconds to wait for a keepalive ack"))
    grace_s: float = field(default=30.0, metadata=_GRACE_HELP)
    # A mesh or load balancer drains a backend once it sees health NOT_SERVING; if the listener closed at the
    # same instant, requests routed meanwhile would fail. 0 by default: a lone service (and `up`) stops at once.
    drain_s: float = field(default=0.0, metadata=_DRAIN_HELP)
    # Off by default: `up` and tests run several services on one host, where one default port would clash.
    metrics_port: int = field(default=0, metadata=_METRICS_PORT_HELP)
    # TLS (services/common/tls.py): a certificate and its key turn TLS on; a CA also requires client certificates.
    tls_cert: Path | None = field(default=None, metadata=doc(
        "PEM certificate chain this service presents; with --tls-key: serve TLS only"))
    tls_key: Path | None = field(default=None, metadata=doc("PEM private key of --tls-cert"))
    tls_ca: Path | None = field(default=None, metadata=doc(
        "PEM CA certificates that sign client certificates; set: mutual TLS, clients without one are refused"))
    # Kubernetes' own gRPC probe speaks no TLS: under mutual TLS it checks this port instead.
    health_port: int = field(default=0, metadata=doc(
        "port of a plaintext gRPC endpoint serving only grpc.health.v1 (for probes without a client "
        "certificate); 0: none"))
    # Traces also turn on when the standard OTEL_TRACES_EXPORTER names an exporter (services/common/tracing.py).
    otel: bool = field(default=False, metadata=doc(
        "OpenTelemetry traces, exported as the standard OTEL_* variables say (default OTLP to localhost:4317)"))

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


_MODEL_HELP = doc("local Hugging Face checkpoint folder")
_DTYPE_HELP = doc("weights and embeddings dtype; all three services must agree")
_DEVICE_HELP = doc("torch device, e.g. cpu or cuda:0")
# The encoder and the LLM engine are the two torch processes of a host; torch's default (every core
# each) oversubscribes the CPU as soon as both work at once. `triptych up` splits the cores itself.
_TORCH_THREADS_HELP = doc("torch CPU threads of this service's torch process; 0: half the machine's cores "
                          "(at least 1), the share of one of the two torch services on a shared host")


_MAX_MEDIA_HELP = doc("encoded bytes of one media item, MiB")
_MAX_PIXELS_HELP = doc("decompression-bomb cap, width * height")
EncoderInput = Literal["tensors", "media"]


def torch_threads(configured: int) -> int:
    """A torch_threads field's value, 0 resolved to half of os.cpu_count() (at least 1)."""
    return configured if configured > 0 else max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class ClientConfig:
    """How `triptych generate` connects to a processor: TLS (mutual when it has a certificate), bearer token."""

    tls: bool = field(default=False, metadata=doc(
        "connect over TLS, checking the processor's certificate against --tls-ca (else the system's roots)"))
    tls_ca: Path | None = field(default=None, metadata=doc(
        "PEM CA that signed the processor's certificate; implies --tls"))
    tls_client_cert: Path | None = field(default=None, metadata=doc(
        "PEM certificate to present (a processor with --tls-ca requires one); implies --tls"))
    tls_client_key: Path | None = field(default=None, metadata=doc("PEM private key of --tls-client-cert"))
    auth_token_file: Path | None = field(default=None, metadata=doc(
        "file holding the processor's bearer token (else TRIPTYCH_AUTH_TOKEN, if set)"))


@dataclass(frozen=True)
class EncoderConfig:
    model: Path = field(metadata=_MODEL_HELP)
    server: ServerConfig = field(default_factory=ServerConfig)
    dtype: DType = field(default="float32", metadata=_DTYPE_HELP)
    device: str = field(default="cpu", metadata=_DEVICE_HELP)
    max_items_per_request: int = field(default=64, metadata=doc("media items in one Encode request"))
    # Checked before anything is allocated; 65536 is Qwen2-VL's max_pixels default, far above the others'.
    max_item_patches: int = field(default=65536, metadata=doc("patches (tower input rows) one media item may have"))
    torch_threads: int = field(default=0, metadata=_TORCH_THREADS_HELP)
    # Media-mode items (compressed bytes) are decoded here with the processor's limits and code.
    max_media_mib: int = field(default=32, metadata=_MAX_MEDIA_HELP)
    max_image_pixels: int = field(default=50_000_000, metadata=_MAX_PIXELS_HELP)
    # Cross-request batching (services/encoder/batcher.py). Off by default: on a CPU a batched forward
    # costs more per item than forwards alone (the bench Qwen2-VL and LLaVA towers), and end to end
    # (bench/throughput.py, c16, cache off) "auto" gave 365 output tok/s against 500 with "off": its
    # per-patch measure does not see that a batch holds every item until the last is done. On a GPU,
    # where one image leaves the device idle, set auto or always.
    batching: Literal["auto", "always", "off"] = field(default="off", metadata=doc(
        "items of concurrent calls in one tower forward: auto (where measured forwards show it costs less "
        "per item), always (up to the limits), off (one item per forward)"))
    # 0: no deliberate wait; a batch forms from the items that queued while the tower was busy.
    batch_wait_ms: float = field(default=0.0, metadata=doc(
        "how long a forward waits for more items after the first arrives, ms"))
    max_batch_items: int = field(default=32, metadata=doc("items in one tower forward"))
    max_batch_patches: int = field(default=16384, metadata=doc(
        "patches (tower input rows) in one tower forward; a larger item runs alone"))
    cache_mib: int = field(default=1024, metadata=doc(
        "embedding cache (by mm_hash) budget, MiB; 0: no cache (identical in-flight items still encode once)"))
    # Shared memory is used only for callers that ask (the processor's --embeddings-transport shm); these
    # bound what it may hold: regions nobody claimed are freed after the TTL, and a full budget answers inline.
    shm_max_mib: int = field(default=1024, metadata=doc(
        "unclaimed shared-memory embeddings held at once, MiB; beyond it replies go inline (0: never shm)"))
    shm_ttl_s: float = field(default=30.0, metadata=doc("seconds a shared-memory region waits for its reader"))
    # Triton (services/encoder/backends/triton.py): the towers run in a Triton Inference Server serving a
    # repository from `triptych export-triton`; this process keeps the checks, the cache and single flight.
    backend: Literal["torch", "triton"] = field(default="torch", metadata=doc(
        "where the towers run: torch (in this process) or triton (a Triton Inference Server at --triton-url)"))
    triton_url: str = field(default="127.0.0.1:8000", metadata=doc("Triton's HTTP (KServe v2) address HOST:PORT"))
    triton_model: str = field(default="triptych", metadata=doc(
        "name the Triton models were exported under (`export-triton --name`); one model per modality, NAME_image ..."))
    # Each worker holds one request in flight: Triton's dynamic batcher can only group concurrent requests.
    triton_workers: int = field(default=8, metadata=doc("Triton requests in flight at once (one thread each)"))
    # shm is for a co-located Triton only: it must open this host's /dev/shm (same host, same IPC namespace).
    triton_transport: Literal["http", "shm"] = field(default="http", metadata=doc(
        "how tensors go to Triton: http (binary tensors in the request body) or shm (system shared memory, "
        "for Triton on this host)"))
    triton_timeout_s: float = field(default=600.0, metadata=doc("seconds one Triton inference may take"))
    triton_start_timeout_s: float = field(default=120.0, metadata=doc(
        "how long start-up waits for Triton and its models to be ready"))
    # Admission (services/common/admission.py): without it every call queues for the parse threads and the
    # tower, and a burst holds every request's tensors at once; beyond it a call is refused before parsing.
    max_concurrent_encodes: int = field(default=256, metadata=doc(
        "Encode calls in flight at once; one more is RESOURCE_EXHAUSTED at once, with a retry hint (0: no limit)"))


@dataclass(frozen=True)
class LlmConfig:
    model: Path = field(metadata=_MODEL_HELP)
    server: ServerConfig = field(default_factory=ServerConfig)
    dtype: DType = field(default="float32", metadata=_DTYPE_HELP)
    device: str = field(default="cpu", metadata=_DEVICE_HELP)
    max_running_requests: int = field(default=32, metadata=doc(
        "requests decoded together, one forward per step; more wait in the queue"))
    max_waiting_requests: int = field(default=256, metadata=doc("queued requests; beyond this RESOURCE_EXHAUSTED"))
    # New requests are prefilled between decode steps, alone, until their prompts reach this many tokens
    # (at least one per step): it bounds how long running requests wait for newcomers.
    max_batch_tokens: int = field(default=512, metadata=doc("prompt tokens prefilled between two decode steps"))
    default_max_new_tokens: int = field(default=256, metadata=doc("max_new_tokens of a request that sets none"))
    torch_threads: int = field(default=0, metadata=_TORCH_THREADS_HELP)


@dataclass(frozen=True)
class ProcessorConfig:
    model: Path = field(metadata=_MODEL_HELP)
    # Addresses hold ':', so the environment's list is comma-separated.
    encoder_addrs: tuple[str, ...] = field(metadata=doc(
        "encoder address HOST:PORT, one replica each (repeatable); a host name is a replica per address it "
        "resolves to (env: a list separated by ',')", flag="--encoder", separator=","))
    llm_addr: str = field(metadata=doc("LLM address HOST:PORT", flag="--llm"))
    server: ServerConfig = field(default_factory=ServerConfig)
    # The processor loads no weights, but reports (and checks) the dtype embeddings travel in.
    dtype: DType = field(default="float32", metadata=_DTYPE_HELP)
    allowed_media_dirs: tuple[Path, ...] = field(default=(), metadata=doc(
        "directory whose files file:// URLs may name (repeatable; env: a list separated by ':')",
        flag="--allowed-media-dir"))
    max_media_mib: int = field(default=32, metadata=_MAX_MEDIA_HELP)
    max_image_pixels: int = field(default=50_000_000, metadata=_MAX_PIXELS_HELP)
    max_images_per_request: int = field(default=32, metadata=doc("images in one request"))
    # Video: frames are chosen by the model's own video processor at this rate, then only they are decoded.
    video_fps: float = field(default=2.0, metadata=doc("frames per second sampled from a video (a request's "
                                                       "video_options may ask otherwise)"))
    max_video_frames: int = field(default=32, metadata=doc("frames sampled from one video, at most"))
    max_video_seconds: float = field(default=3600.0, metadata=doc("duration of one video, seconds"))
    max_video_pixels: int = field(default=1 << 27, metadata=doc(
        "sampled frames x width x height of one video (the decoded frames' memory is 3 bytes each)"))
    max_videos_per_request: int = field(default=4, metadata=doc("videos in one request"))
    # EVS, as vLLM's --video-pruning-rate: the encoder drops the video tokens that change least between frames.
    video_pruning_rate: float = field(default=0.0, metadata=doc(
        "share of a video's tokens dropped by EVS (efficient video sampling), in [0, 1); 0: the checkpoint's own "
        "rate where it has one, else off (a request's video_options.pruning_rate may ask otherwise)"))
    max_audio_seconds: float = field(default=600.0, metadata=doc("duration of one audio clip, seconds"))
    max_audios_per_request: int = field(default=8, metadata=doc("audio clips in one request"))
    connect_timeout_s: float = field(default=60.0, metadata=doc("how long start-up waits for encoder and LLM"))
    encoder_resolve_interval_s: float = field(default=30.0, metadata=doc(
        "seconds between resolutions of --encoder host names (replicas come and go with DNS); 0: only at start"))
    default_timeout_s: float = field(default=600.0, metadata=doc("deadline of a request whose client set none"))
    preprocess_threads: int = field(default=2, metadata=doc("threads decoding media and running the HF processor"))
    # Admission (services/common/admission.py): checked before any media is read, so an overloaded processor
    # refuses in well under a millisecond instead of queueing decoded media without bound.
    max_concurrent_requests: int = field(default=256, metadata=doc(
        "Generate, StreamGenerate and Preprocess calls in flight at once; one more is RESOURCE_EXHAUSTED at once, "
        "with a retry hint (0: no limit)"))
    # shm: the encoder hands the LLM its embeddings through shared memory, for an encoder and an LLM on one
    # host (one user, one PID namespace); a region the LLM cannot open is encoded again inline.
    embeddings_transport: Literal["inline", "shm"] = field(default="inline", metadata=doc(
        "how embeddings go from encoder to LLM: inline (in messages, chunked when large) or shm (shared "
        "memory, for an encoder and an LLM on one host)"))
    # Off by default: bench/local_encoder.py measures when encoding small items here beats the trip to the encoder.
    local_encode_max_patches: int = field(default=0, metadata=doc(
        "encode media items of at most this many patches (tower input rows) in the processor itself, the rest "
        "in the encoder service; 0: off (the processor then loads no weights)"))
    # Media by default: about the file's size on the wire instead of 14-140x it, and less time per image
    # (docs/contract.md "Encoder inputs", measured with bench/wire.py). Tensors keep pixel work off the
    # encoder's host, for a fast tower whose host CPU is the bottleneck.
    encoder_input: EncoderInput = field(default="media", metadata=doc(
        "what the processor sends the encoder per item: tensors (the HF processor's outputs) or media "
        "(the compressed file; the encoder runs the HF processor)"))
    # The processor as a client of the encoder and the LLM (their --tls-cert / --tls-ca).
    tls_upstream_ca: Path | None = field(default=None, metadata=doc(
        "PEM CA certificates that sign the encoder's and LLM's certificates; set: connect to them over TLS"))
    tls_client_cert: Path | None = field(default=None, metadata=doc(
        "PEM certificate the processor presents to the encoder and LLM (mutual TLS; implies TLS to them)"))
    tls_client_key: Path | None = field(default=None, metadata=doc("PEM private key of --tls-client-cert"))
    # A file, not the token itself: a flag's value is visible in `ps` and in --help (TRIPTYCH_AUTH_TOKEN also works).
    auth_token_file: Path | None = field(default=None, metadata=doc(
        "file holding the bearer token every call but health checks must send (authorization: Bearer ...); "
        "unset: no token required"))


@dataclass(frozen=True)
class FrontConfig:
    """The OpenAI-compatible HTTP front (services/front/): its own process, a client of one processor."""

    processor_addr: str = field(default=f"127.0.0.1:{DEFAULT_PROCESSOR_PORT}", metadata=doc(
        "processor address HOST:PORT the front sends every request to", flag="--processor"))
    host: str = field(default="127.0.0.1", metadata=doc("address to listen on (0.0.0.0: all interfaces)"))
    # vLLM's and most OpenAI-compatible servers' port.
    port: int = field(default=8000, metadata=doc("HTTP port to listen on; 0 picks a free one"))
    served_model_name: str | None = field(default=None, metadata=doc(
        "the model name clients send (and GET /v1/models lists); default: the processor's --model as given"))
    max_message_mib: int = field(default=256, metadata=doc("largest message sent or received, MiB"))
    connect_timeout_s: float = field(default=60.0, metadata=doc("how long start-up waits for the processor"))
    grace_s: float = field(default=30.0, metadata=_GRACE_HELP)
    # As ServerConfig.drain_s, with GET /health/ready as the health a load balancer checks.
    drain_s: float = field(default=0.0, metadata=_DRAIN_HELP)
    metrics_port: int = field(default=0, metadata=_METRICS_PORT_HELP)
    # HTTPS for the front's clients (uvicorn's ssl): the same flags as the gRPC services' TLS.
    tls_cert: Path | None = field(default=None, metadata=doc(
        "PEM certificate chain the front presents; with --tls-key: serve HTTPS only"))
    tls_key: Path | None = field(default=None, metadata=doc("PEM private key of --tls-cert"))
    tls_ca: Path | None = field(default=None, metadata=doc(
        "PEM CA certificates that sign client certificates; set: HTTPS clients must present one"))
    auth_token_file: Path | None = field(default=None, metadata=doc(
        "file holding the bearer token every request but /health and /health/ready must send "
        "(Authorization: Bearer ..., OpenAI's api_key); unset: TRIPTYCH_AUTH_TOKEN if set, else none required"))
    # The front as the processor's client (the processor's --tls-cert / --tls-ca / --auth-token-file).
    tls_upstream_ca: Path | None = field(default=None, metadata=doc(
        "PEM CA certificates that sign the processor's certificate; set: connect to it over TLS"))
    tls_client_cert: Path | None = field(default=None, metadata=doc(
        "PEM certificate the front presents to the processor (mutual TLS; implies TLS to it)"))
    tls_client_key: Path | None = field(default=None, metadata=doc("PEM private key of --tls-client-cert"))
    upstream_auth_token_file: Path | None = field(default=None, metadata=doc(
        "file holding the bearer token the front sends the processor (its --auth-token-file; else "
        "TRIPTYCH_AUTH_TOKEN, if set)"))
