"""The bad-input corpus: requests a client or an external router could send, and what each must get.

Each entry names the service that receives the request (the processor, or the encoder / the LLM
called directly as a disaggregated cluster's router would), how the request is built, and the exact
gRPC status code and google.rpc.ErrorInfo reason it must get. "OK" entries are unusual input that
must work (CMYK, 16-bit, alpha, palette, animated images...); where they carry a `Reference`, their
tokens must equal transformers' for that prompt and media. tests/reliability/test_corpus.py sends
every entry, then a good request, to the running services (one Nemotron-H Omni start: image, video
and audio). Media are made in code (bad_media.py), never downloaded.

An entry's `reason` is "" where the status carries no ErrorInfo: gRPC itself refused the message
(over --max-message-mib) before any Triptych code saw it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from google.protobuf.message import Message

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.api.triptych.llm.v1 import llm_pb2
from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.tensors import from_proto, to_proto
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.reference import NO_MEDIA, OtherMedia
from tests.reliability import bad_media as bad

Target = Literal["processor", "encoder", "llm"]
MAX_NEW_TOKENS = 4

# The limits the corpus's services run with (test_corpus.py passes these flags), small so that a request
# over each costs little to build. The good requests stay well inside them.
MAX_MEDIA_MIB = 1
MAX_MESSAGE_MIB = 4
MAX_IMAGE_PIXELS = 2_000_000
MAX_IMAGES = 4
MAX_VIDEO_SECONDS = 60
MAX_VIDEO_FRAMES = 8
MAX_VIDEO_PIXELS = 1_000_000
MAX_AUDIO_SECONDS = 20
MAX_AUDIOS = 2
MAX_ENCODER_ITEMS = 4
MAX_ITEM_PATCHES = 1024
# --grace-s 1: nothing is in flight when the module stops them; the default 30 s would be CI time.
_COMMON = ("--max-message-mib", str(MAX_MESSAGE_MIB), "--grace-s", "1")
_MEDIA = ("--max-media-mib", str(MAX_MEDIA_MIB), "--max-image-pixels", str(MAX_IMAGE_PIXELS))
PROCESSOR_FLAGS = (*_COMMON, *_MEDIA, "--max-images-per-request", str(MAX_IMAGES),
                   "--max-video-seconds", str(MAX_VIDEO_SECONDS), "--max-video-frames", str(MAX_VIDEO_FRAMES),
                   "--max-video-pixels", str(MAX_VIDEO_PIXELS),
                   "--max-audio-seconds", str(MAX_AUDIO_SECONDS), "--max-audios-per-request", str(MAX_AUDIOS),
                   # tensors: the router's view (Preprocess) carries every item's tensors, images included
                   "--encoder-input", "tensors")
ENCODER_FLAGS = (*_COMMON, *_MEDIA, "--max-items-per-request", str(MAX_ENCODER_ITEMS),
                 "--max-item-patches", str(MAX_ITEM_PATCHES))
LLM_FLAGS = _COMMON


@dataclass(frozen=True)
class Reference:
    """An OK entry's prompt and media (images, then videos and audios, then the text): its tokens must be
    transformers' first `num_tokens` greedy tokens for them."""

    prompt: str
    images: tuple[bytes, ...] = ()
    other: OtherMedia = NO_MEDIA
    num_tokens: int = MAX_NEW_TOKENS


# The good request, sent after every entry: an image and a clip, so a router's view of it (Preprocess, then
# Encode) has an image item [0] and an audio item [1] to break.
GOOD = Reference("What do you see and hear?", (image_bytes(64, 64, seed=11),),
                 OtherMedia(audios=(audio_bytes(seconds=1.0, seed=1),)))


@dataclass(frozen=True)
class Context:
    """What builders need of the running services; made once by test_corpus.py."""

    media_dir: Path  # the processor's --allowed-media-dir
    outside_dir: Path  # a directory it may not read
    fingerprint: str
    vocab_size: int
    max_context_tokens: int
    hidden_size: int
    encode_request: encoder_pb2.EncodeRequest  # Preprocess(GOOD).encode_request: [image, audio] tensors
    llm_request: llm_pb2.GenerateRequest  # Preprocess(GOOD).llm_request with the encoder's embeddings
    other_image_item: encoder_pb2.MediaItem  # another image's tensors (another size)
    good_tokens: list[int]  # transformers' tokens for GOOD


Build = Callable[[Context], Message | list[Message]]


@dataclass(frozen=True)
class Entry:
    name: str
    target: Target
    build: Build  # the request (a list of messages for a client-streaming RPC)
    code: str = "OK"  # grpc.StatusCode name
    reason: str = ""  # ErrorInfo.reason ("" when the status has none)
    rpc: str = ""  # default: Generate (processor, llm), Encode (encoder)
    reference: Reference | None = None  # OK entries: the tokens must equal transformers'
    why: str = field(default="", compare=False)  # what the entry guards, where the name does not say


# ---- request builders -------------------------------------------------------------------------
def part(kind: str = "image", **media) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(**{kind: processor_pb2.Media(**media)})


def text(value: str) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(text=value)


def chat(*parts: processor_pb2.ContentPart, role: str = "user", **sampling) -> processor_pb2.GenerateRequest:
    return processor_pb2.GenerateRequest(
        messages=[processor_pb2.ChatMessage(role=role, content=parts)],
        sampling=generation_pb2.SamplingParams(**{"max_new_tokens": MAX_NEW_TOKENS, **sampling}))


def with_media(kind: str, data: bytes | Callable[[], bytes], **options) -> Build:
    """A processor request with one `kind` part of these bytes (made when the entry runs), then a question."""
    return lambda ctx: chat(part(kind, data=data() if callable(data) else data, **options), text("What is it?"))


def image_url(path: Callable[[Context], str]) -> Build:
    return lambda ctx: chat(part(url=path(ctx)), text("What is it?"))


def ask(ref: Reference, rpc_sampling: dict | None = None) -> Build:
    """The processor request of a Reference."""
    media = [*(("video", v) for v in ref.other.videos), *(("audio", a) for a in ref.other.audios)]
    sampling = {"max_new_tokens": ref.num_tokens, **(rpc_sampling or {})}
    return lambda ctx: processor_pb2.GenerateRequest(messages=build_messages(ref.prompt, ref.images, media=media),
                                                     sampling=generation_pb2.SamplingParams(**sampling))


def streamed(build: Build) -> Build:
    """`build`'s Generate request as the same service's StreamGenerate request (same fields, same numbers)."""
    def convert(ctx: Context) -> Message:
        request = build(ctx)
        cls = (processor_pb2.StreamGenerateRequest if isinstance(request, processor_pb2.GenerateRequest)
               else llm_pb2.StreamGenerateRequest)
        return cls.FromString(request.SerializeToString())
    return convert


def preprocessed(build: Build) -> Build:
    """`build`'s processor Generate request as a Preprocess request (what a router asks first)."""
    return lambda ctx: processor_pb2.PreprocessRequest.FromString(build(ctx).SerializeToString())


def sampling(**params) -> Build:
    return lambda ctx: chat(text("Hello there."), **params)


def encode(mutate: Callable[[encoder_pb2.EncodeRequest, Context], object]) -> Build:
    """The router's Encode request for GOOD, changed by `mutate` (in place)."""
    def build(ctx: Context) -> encoder_pb2.EncodeRequest:
        request = encoder_pb2.EncodeRequest()
        request.CopyFrom(ctx.encode_request)
        mutate(request, ctx)
        return request
    return build


def generate(mutate: Callable[[llm_pb2.GenerateRequest, Context], object]) -> Build:
    """The router's LLM request for GOOD (embeddings in), changed by `mutate` (in place)."""
    def build(ctx: Context) -> llm_pb2.GenerateRequest:
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(ctx.llm_request)
        mutate(request, ctx)
        return request
    return build


def chunked(mutate: Callable[[list[llm_pb2.ChunkedStreamGenerateRequest], Context], object]) -> Build:
    """GOOD's LLM request as a ChunkedStreamGenerate stream (the image's embeddings in two chunks), changed."""
    def build(ctx: Context) -> list[llm_pb2.ChunkedStreamGenerateRequest]:
        request = llm_pb2.StreamGenerateRequest(model_fingerprint=ctx.llm_request.model_fingerprint,
                                                prompt=ctx.llm_request.prompt, sampling=ctx.llm_request.sampling)
        emb = request.prompt.multimodal_inputs[0].embeddings
        data, half = emb.data, len(emb.data) // 2
        emb.ClearField("data")
        emb.chunked_id = 1
        messages = [llm_pb2.ChunkedStreamGenerateRequest(request=request, chunks=[
                        tensor_pb2.TensorChunk(chunked_id=1, offset_bytes=0, data=data[:half])]),
                    llm_pb2.ChunkedStreamGenerateRequest(chunks=[
                        tensor_pb2.TensorChunk(chunked_id=1, offset_bytes=half, data=data[half:])])]
        mutate(messages, ctx)
        return messages
    return build


def named(item, name: str) -> tensor_pb2.Tensor:
    """The tensor called `name` of an encoder MediaItem (or an LLM MultimodalInput's position inputs)."""
    tensors = item.tensors if hasattr(item, "tensors") else item.position_inputs
    return next(t.tensor for t in tensors if t.name == name)


def replace_tensor(proto: tensor_pb2.Tensor, value: torch.Tensor) -> None:
    proto.CopyFrom(to_proto(value))


def _image_emb(request: llm_pb2.GenerateRequest) -> tensor_pb2.Tensor:
    return request.prompt.multimodal_inputs[0].embeddings


def _poison(value: float) -> Callable[[llm_pb2.GenerateRequest, Context], None]:
    def mutate(request, ctx):
        emb = from_proto(_image_emb(request))
        emb[1, 2] = value
        replace_tensor(_image_emb(request), emb)
    return mutate


def _outside(ctx: Context) -> Path:
    path = ctx.outside_dir / "secret.png"
    path.write_bytes(GOOD.images[0])
    return path


def _link(ctx: Context, name: str, target: str | Path) -> str:
    link = ctx.media_dir / name
    if not link.is_symlink():
        link.symlink_to(target)
    return f"file://{link}"


def _in_media_dir(ctx: Context, name: str, data: bytes) -> str:
    path = ctx.media_dir / name
    path.write_bytes(data)
    return f"file://{path}"


def _fifo(ctx: Context) -> str:
    path = ctx.media_dir / "fifo.png"
    if not path.exists():
        os.mkfifo(path)
    return f"file://{path}"


def _sparse(ctx: Context) -> str:
    """A file over --max-media-mib that costs no disk (its size is checked before it is read)."""
    path = ctx.media_dir / "huge.png"
    with path.open("wb") as file:
        file.truncate((MAX_MEDIA_MIB << 20) + 1)
    return f"file://{path}"


def _grid(request: encoder_pb2.EncodeRequest, h: int, w: int) -> None:
    replace_tensor(named(request.items[0], "image_grid_hw"), torch.tensor([[h, w]]))


def _patches(request: encoder_pb2.EncodeRequest, rows: int, h: int, w: int) -> None:
    """Image item 0 as a grid of h x w patches with `rows` rows of zeros (a claim the tensors may not back)."""
    pixels = named(request.items[0], "pixel_values")
    replace_tensor(pixels, torch.zeros(rows, pixels.shape[1]))
    _grid(request, h, w)


def _only_image(request: encoder_pb2.EncodeRequest) -> None:
    del request.items[1:]


def _media_item(request: encoder_pb2.EncodeRequest, data: bytes) -> None:
    """Item 0 as a media-mode item: the compressed file, which the encoder decodes itself."""
    item = request.items[0]
    del item.tensors[:]
    item.media.data = data
    item.mm_hash = ""


def _video_claim(request: encoder_pb2.EncodeRequest, ctx: Context) -> None:
    """Item 0 as a video whose pixel tensor claims 1000 frames of 512x512 and holds no bytes."""
    claim = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1000, 3, 512, 512])
    request.items[0].CopyFrom(encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_VIDEO, tensors=[
        tensor_pb2.NamedTensor(name="pixel_values_videos", tensor=claim)]))


def _shape(proto: tensor_pb2.Tensor, *shape: int) -> None:
    del proto.shape[:]
    proto.shape.extend(shape)


def _range(index: int, **fields) -> Callable[[llm_pb2.GenerateRequest, Context], None]:
    def mutate(request, ctx):
        placeholder = request.prompt.multimodal_inputs[index].placeholder
        for name, value in fields.items():
            setattr(placeholder, name, value(placeholder) if callable(value) else value)
    return mutate


def _tokens(mutate_ids: Callable[[list[int], Context], list[int]]) -> Callable[[llm_pb2.GenerateRequest, Context], None]:
    def mutate(request, ctx):
        ids = mutate_ids(list(request.prompt.token_ids), ctx)
        del request.prompt.token_ids[:]
        request.prompt.token_ids.extend(ids)
    return mutate


def _llm_sampling(**params) -> Callable[[llm_pb2.GenerateRequest, Context], None]:
    def mutate(request, ctx):
        for name, value in params.items():
            if isinstance(value, list):
                getattr(request.sampling, name).extend(value)
            else:
                setattr(request.sampling, name, value(ctx) if callable(value) else value)
    return mutate


def _set(path: str, value) -> Callable[[Message, Context], None]:
    """Sets a dotted field path (indexes as numbers) of a request copy: "items.0.modality"."""
    def mutate(request, ctx):
        *parents, last = path.split(".")
        target = request
        for step in parents:
            target = target[int(step)] if step.isdigit() else getattr(target, step)
        setattr(target, last, value(ctx) if callable(value) else value)
    return mutate


def _embeddings(tensor: Callable[[Context], tensor_pb2.Tensor], width_px: int, height_px: int) -> Build:
    """A processor request whose image part is precomputed embeddings of an image of that size."""
    return lambda ctx: chat(part(embeddings=processor_pb2.MediaEmbeddings(
        embeddings=tensor(ctx), width_px=width_px, height_px=height_px)), text("hi"))


# ---- the media --------------------------------------------------------------------------------
GOOD_PNG = GOOD.images[0]
VIDEO = video_bytes(seconds=2.0, fps=8, width=64, height=48, seed=5)
AUDIO = GOOD.other.audios[0]
PNG_MAGIC, JPEG_MAGIC, GIF_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a"


def _image_ok(name: str, data: bytes, why: str = "") -> Entry:
    ref = Reference("Describe the picture.", (data,))
    return Entry(name, "processor", ask(ref), reference=ref, why=why)


def _refused(name: str, code: str, reason: str, build: Build, target: Target = "processor", **more) -> Entry:
    return Entry(name, target, build, code, reason, **more)


INVALID = "INVALID_ARGUMENT"

ENTRIES: list[Entry] = [
    # ---- images: broken bytes ----------------------------------------------------------------
    _refused("image-truncated-png", INVALID, "IMAGE_DECODE_FAILED", with_media("image", bad.truncated(GOOD_PNG))),
    _refused("image-truncated-jpeg", INVALID, "IMAGE_DECODE_FAILED", with_media("image", bad.truncated(bad.jpeg()))),
    _refused("image-corrupt-png", INVALID, "IMAGE_DECODE_FAILED", with_media("image", bad.corrupt(GOOD_PNG))),
    _refused("image-zero-bytes", INVALID, "MEDIA_EMPTY", with_media("image", b"")),
    _refused("image-png-signature-only", INVALID, "IMAGE_FORMAT_UNSUPPORTED", with_media("image", PNG_MAGIC)),
    _refused("image-not-an-image", INVALID, "IMAGE_FORMAT_UNSUPPORTED",
             with_media("image", b"%PDF-1.4 this is not an image")),
    _refused("image-jpeg-with-png-magic", INVALID, "IMAGE_FORMAT_UNSUPPORTED",
             with_media("image", bad.wrong_magic(bad.jpeg(), PNG_MAGIC))),
    _refused("image-png-with-jpeg-magic", INVALID, "IMAGE_DECODE_FAILED",
             with_media("image", bad.wrong_magic(GOOD_PNG, JPEG_MAGIC)), why="identified as JPEG, corrupt as one"),
    _refused("image-png-with-gif-magic", INVALID, "IMAGE_FORMAT_UNSUPPORTED",
             with_media("image", bad.wrong_magic(GOOD_PNG, GIF_MAGIC))),
    _refused("image-ppm-format", INVALID, "IMAGE_FORMAT_UNSUPPORTED",
             with_media("image", image_bytes(32, 32, fmt="PPM"))),
    # ---- images: bombs (the size is refused from the header, before any pixel is decoded) ------
    _refused("image-png-declares-100000x100000", INVALID, "IMAGE_TOO_LARGE",
             with_media("image", lambda: bad.png_declaring(100_000, 100_000))),
    _refused("image-png-declares-2000x1500", INVALID, "IMAGE_TOO_LARGE",
             with_media("image", lambda: bad.png_declaring(2000, 1500)), why="just over the pixel cap"),
    _refused("image-gif-declares-65535x65535", INVALID, "IMAGE_TOO_LARGE",
             with_media("image", lambda: bad.gif_declaring(65535, 65535))),
    _refused("image-png-bomb-20000x20000", INVALID, "IMAGE_TOO_LARGE",
             with_media("image", lambda: bad.png_bomb(20_000)), why="48 KB of valid zlib, 400 Mpx"),
    _refused("image-png-bomb-2048x2048", INVALID, "IMAGE_TOO_LARGE", with_media("image", lambda: bad.flat_bomb("PNG", 2048))),
    _refused("image-gif-bomb-2048x2048", INVALID, "IMAGE_TOO_LARGE", with_media("image", lambda: bad.flat_bomb("GIF", 2048))),
    _refused("image-webp-bomb-2048x2048", INVALID, "IMAGE_TOO_LARGE",
             with_media("image", lambda: bad.flat_bomb("WEBP", 2048))),
    # ---- images: unusual but valid -- each must work, token-exact ------------------------------
    _image_ok("image-cmyk-jpeg", bad.mode_image("CMYK", "JPEG")),
    _image_ok("image-16bit-grey-png", bad.mode_image("I;16")),
    _image_ok("image-rgba-png", bad.mode_image("RGBA"), why="transparency onto white, as transformers"),
    _image_ok("image-grey-alpha-png", bad.mode_image("LA")),
    _image_ok("image-palette-png", bad.mode_image("P")),
    _image_ok("image-palette-transparency-png", bad.palette_with_transparency()),
    _image_ok("image-1bit-png", bad.mode_image("1")),
    _image_ok("image-grey-jpeg", bad.mode_image("L", "JPEG")),
    _image_ok("image-animated-gif", bad.animated("GIF"), why="the first frame, as PIL opens it"),
    _image_ok("image-animated-png", bad.animated("PNG")),
    _image_ok("image-animated-webp", bad.animated("WEBP")),
    _image_ok("image-1x1", image_bytes(1, 1, seed=45)),
    _image_ok("image-1000x3", image_bytes(1000, 3, seed=46), why="extreme aspect ratio"),
    _refused("image-2000x1", INVALID, "PROCESSOR_REJECTED", with_media("image", image_bytes(2000, 1, seed=46)),
             why="the HF image processor divides by zero on it (transformers fails too)"),
    # ---- file:// URLs --------------------------------------------------------------------------
    _refused("url-dotdot-escape", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: f"file://{ctx.media_dir}/../{_outside(ctx).relative_to(ctx.media_dir.parent)}")),
    _refused("url-percent-encoded-dotdot", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: f"file://{ctx.media_dir}/%2e%2e/{_outside(ctx).relative_to(ctx.media_dir.parent)}")),
    _refused("url-absolute-outside", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: f"file://{_outside(ctx)}")),
    _refused("url-etc-passwd", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED", image_url(lambda ctx: "file:///etc/passwd")),
    _refused("url-proc-self-environ", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: "file:///proc/self/environ")),
    _refused("url-symlink-out", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: _link(ctx, "link.png", _outside(ctx)))),
    _refused("url-symlink-to-proc", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: _link(ctx, "mem.png", "/proc/self/mem"))),
    _refused("url-symlink-to-dev-zero", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             image_url(lambda ctx: _link(ctx, "zero.png", "/dev/zero"))),
    _refused("url-missing-file", "NOT_FOUND", "MEDIA_FILE_NOT_FOUND",
             image_url(lambda ctx: f"file://{ctx.media_dir}/nope.png")),
    _refused("url-directory", "NOT_FOUND", "MEDIA_FILE_NOT_FOUND", image_url(lambda ctx: f"file://{ctx.media_dir}")),
    _refused("url-fifo", "NOT_FOUND", "MEDIA_FILE_NOT_FOUND", image_url(_fifo), why="never opened: no hang"),
    _refused("url-file-over-media-limit", INVALID, "MEDIA_TOO_LARGE", image_url(_sparse)),
    _refused("url-https", INVALID, "MEDIA_URL_SCHEME_UNSUPPORTED", image_url(lambda ctx: "https://example.com/cat.png")),
    _refused("url-file-on-remote-host", INVALID, "MEDIA_URL_INVALID", image_url(lambda ctx: "file://evil.example/x.png")),
    _refused("url-relative-path", INVALID, "MEDIA_URL_INVALID", image_url(lambda ctx: "images/cat.png")),
    Entry("url-allowed-file", "processor", image_url(lambda ctx: _in_media_dir(ctx, "good.png", GOOD_PNG)),
          reference=Reference("What is it?", (GOOD_PNG,))),
    # ---- messages and text -------------------------------------------------------------------
    _refused("messages-empty", INVALID, "MESSAGES_EMPTY", lambda ctx: processor_pb2.GenerateRequest()),
    _refused("role-unknown", INVALID, "ROLE_INVALID", lambda ctx: chat(text("x"), role="robot")),
    _refused("content-part-empty", INVALID, "CONTENT_EMPTY", lambda ctx: chat(processor_pb2.ContentPart())),
    _refused("media-without-source", INVALID, "MEDIA_MISSING", lambda ctx: chat(part(), text("hi"))),
    _refused("reserved-token-in-text", INVALID, "RESERVED_TOKEN_IN_TEXT", lambda ctx: chat(text("look <image> here"))),
    Entry("prompt-empty-text", "processor", ask(Reference("")), reference=Reference("")),
    _refused("prompt-one-mebibyte", INVALID, "PROMPT_TOO_LONG", lambda ctx: chat(text("word " * (1 << 18)))),
    _refused("prompt-longer-than-context", INVALID, "PROMPT_TOO_LONG",
             lambda ctx: chat(text("word " * (ctx.max_context_tokens + 10)))),
    _refused("message-over-max-message-mib", "RESOURCE_EXHAUSTED", "",
             with_media("image", lambda: bytes((MAX_MESSAGE_MIB << 20) + 1))),
    _refused("image-over-max-media-mib", INVALID, "MEDIA_TOO_LARGE",
             with_media("image", lambda: PNG_MAGIC + bytes(MAX_MEDIA_MIB << 20))),
    _refused("uuid-shared-by-two-different-images", INVALID, "MM_HASH_CONFLICT", lambda ctx: chat(
        part(data=GOOD_PNG, uuid="same"), part(data=image_bytes(96, 64, seed=12), uuid="same"), text("Compare.")),
        why="one uuid names one media: two images under it would share embeddings"),
    Entry("uuid-shared-by-the-same-image-twice", "processor", lambda ctx: chat(
        part(data=GOOD_PNG, uuid="same"), part(data=GOOD_PNG, uuid="same"), text("Compare.")),
          reference=Reference("Compare.", (GOOD_PNG, GOOD_PNG))),
    _refused("too-many-images", INVALID, "TOO_MANY_IMAGES",
             lambda ctx: chat(*[part(data=GOOD_PNG)] * (MAX_IMAGES + 1), text("Compare."))),
    # ---- sampling (the processor checks them before any media work) ---------------------------
    *[_refused(f"sampling-{name}", INVALID, "SAMPLING_PARAM_INVALID", sampling(**params)) for name, params in {
        "max-new-tokens-negative": {"max_new_tokens": -5},
        "temperature-nan": {"temperature": float("nan")},
        "temperature-inf": {"temperature": float("inf")},
        "temperature-negative": {"temperature": -1.0},
        "top-p-over-1": {"top_p": 1.5},
        "top-k-negative": {"top_k": -3},
        "min-p-nan": {"min_p": float("nan")},
        "repetition-penalty-zero": {"repetition_penalty": 0.0},
        "presence-penalty-over-2": {"presence_penalty": 3.0},
        "top-logprobs-21": {"logprobs": True, "top_logprobs": 21},
        "top-logprobs-without-logprobs": {"top_logprobs": 2},
        "stop-strings-17": {"stop": ["x"] * 17},
        "stop-token-id-out-of-vocabulary": {"stop_token_ids": [1 << 40]},
    }.items()],
    Entry("sampling-max-new-tokens-int32-max", "processor",
          lambda ctx: ask(GOOD, {"max_new_tokens": 2**31 - 1, "stop_token_ids": [ctx.good_tokens[0]]})(ctx),
          reference=Reference(GOOD.prompt, GOOD.images, GOOD.other, num_tokens=1),
          why="capped by the context, not allocated: stops at its first token"),
    Entry("sampling-seed-uint64-max", "processor", sampling(temperature=1.0, seed=2**64 - 1)),
    # ---- video ---------------------------------------------------------------------------------
    _refused("video-avi-without-frames", INVALID, "VIDEO_DECODE_FAILED", with_media("video", bad.video_without_frames)),
    _refused("video-mp4-without-frames", INVALID, "VIDEO_DECODE_FAILED",
             with_media("video", lambda: bad.video_without_frames("mp4", "libx264"))),
    _refused("video-truncated", INVALID, "VIDEO_DECODE_FAILED", with_media("video", bad.truncated(VIDEO))),
    _refused("video-not-a-video", INVALID, "VIDEO_DECODE_FAILED", with_media("video", b"\x00\x00\x00\x18ftypmp42" * 4)),
    _refused("video-audio-only-file", INVALID, "VIDEO_DECODE_FAILED", with_media("video", AUDIO)),
    _refused("video-one-frame-per-1000-s", INVALID, "VIDEO_TOO_LONG",
             with_media("video", lambda: bad.video(3, rate=Fraction(1, 1000))), why="absurd fps, absurd duration"),
    _refused("video-too-long", INVALID, "VIDEO_TOO_LONG",
             with_media("video", lambda: bad.video(MAX_VIDEO_SECONDS + 4, rate=1, size=(16, 16)))),
    _refused("video-sampled-frames-over-max-video-pixels", INVALID, "VIDEO_TOO_LARGE",
             with_media("video", lambda: bad.video(8, rate=2, size=(640, 480), flat=True))),
    _refused("video-frames-over-pixel-cap", INVALID, "VIDEO_TOO_LARGE",
             with_media("video", lambda: bad.video(1, size=(1600, 1600), flat=True))),
    _refused("video-options-fps-nan", INVALID, "VIDEO_OPTIONS_INVALID",
             with_media("video", VIDEO, video_options=processor_pb2.VideoOptions(fps=float("nan")))),
    _refused("video-options-fps-negative", INVALID, "VIDEO_OPTIONS_INVALID",
             with_media("video", VIDEO, video_options=processor_pb2.VideoOptions(fps=-2))),
    _refused("video-options-max-frames-negative", INVALID, "VIDEO_OPTIONS_INVALID",
             with_media("video", VIDEO, video_options=processor_pb2.VideoOptions(max_frames=-1))),
    _refused("video-options-pruning-rate-1.5", INVALID, "VIDEO_PRUNING_RATE_INVALID",
             with_media("video", VIDEO, video_options=processor_pb2.VideoOptions(pruning_rate=1.5))),
    _refused("video-frames-empty", INVALID, "VIDEO_DECODE_FAILED",
             lambda ctx: chat(part("video", frames=processor_pb2.VideoFrames()), text("hi"))),
    _refused("video-frames-of-two-sizes", INVALID, "VIDEO_DECODE_FAILED", lambda ctx: chat(part("video", frames=(
        processor_pb2.VideoFrames(frames=[image_bytes(32, 32), image_bytes(48, 32)]))), text("hi"))),
    _refused("video-frames-over-max-frames", INVALID, "VIDEO_TOO_LARGE", lambda ctx: chat(part("video", frames=(
        processor_pb2.VideoFrames(frames=[image_bytes(16, 16)] * (MAX_VIDEO_FRAMES + 1)))), text("hi"))),
    _refused("video-frames-fps-inf", INVALID, "VIDEO_OPTIONS_INVALID", lambda ctx: chat(part("video", frames=(
        processor_pb2.VideoFrames(frames=[image_bytes(16, 16)] * 2, fps=float("inf")))), text("hi"))),
    _refused("video-frames-one-corrupt", INVALID, "IMAGE_DECODE_FAILED", lambda ctx: chat(part("video", frames=(
        processor_pb2.VideoFrames(frames=[image_bytes(16, 16), bad.truncated(image_bytes(16, 16))]))), text("hi"))),
    _refused("video-two-in-one-prompt", INVALID, "TOO_MANY_MEDIA_ITEMS",
             lambda ctx: chat(part("video", data=VIDEO), part("video", data=VIDEO), text("Compare."))),
    _refused("video-embeddings-part", INVALID, "MEDIA_MISSING",
             lambda ctx: chat(part("video", embeddings=processor_pb2.MediaEmbeddings()), text("hi"))),
    Entry("video-100000-fps", "processor", with_media("video", lambda: bad.video(3, rate=100_000)),
          why="three frames in 30 us: sampled, not refused"),
    Entry("video-good", "processor", ask(Reference("What happens?", (), OtherMedia(videos=(VIDEO,), sample_in_loader=True))),
          reference=Reference("What happens?", (), OtherMedia(videos=(VIDEO,), sample_in_loader=True))),
    # ---- audio ---------------------------------------------------------------------------------
    _refused("audio-zero-samples", INVALID, "AUDIO_TOO_SHORT", with_media("audio", bad.wav(0))),
    _refused("audio-one-sample", INVALID, "AUDIO_TOO_SHORT", with_media("audio", bad.wav(1))),
    _refused("audio-not-audio", INVALID, "AUDIO_DECODE_FAILED", with_media("audio", b"RIFF\x00\x00WAVEfmt ")),
    _refused("audio-video-only-file", INVALID, "AUDIO_DECODE_FAILED", with_media("audio", lambda: bad.video(4))),
    _refused("audio-nan-samples", INVALID, "AUDIO_DECODE_FAILED",
             with_media("audio", bad.float_wav(np.array([0.1, float("nan")] * 800)))),
    _refused("audio-inf-samples", INVALID, "AUDIO_DECODE_FAILED",
             with_media("audio", bad.float_wav(np.array([0.1, float("inf")] * 800)))),
    _refused("audio-too-long", INVALID, "AUDIO_TOO_LONG",
             with_media("audio", lambda: bad.wav(16000 * (MAX_AUDIO_SECONDS + 1)))),
    _refused("audio-too-many-clips", INVALID, "TOO_MANY_MEDIA_ITEMS",
             lambda ctx: chat(*[part("audio", data=AUDIO)] * (MAX_AUDIOS + 1), text("hi"))),
    Entry("audio-header-declares-4-gib", "processor", with_media("audio", bad.wav_declaring(0xFFFFFF00)),
          reference=Reference("What is it?", (), OtherMedia(audios=(bad.wav(1600),))),
          why="the samples decoded count, not the header"),
    # ---- the processor's other RPCs refuse as Generate does ------------------------------------
    _refused("stream-image-truncated", INVALID, "IMAGE_DECODE_FAILED",
             streamed(with_media("image", bad.truncated(GOOD_PNG))), rpc="StreamGenerate"),
    _refused("stream-temperature-nan", INVALID, "SAMPLING_PARAM_INVALID",
             streamed(sampling(temperature=float("nan"))), rpc="StreamGenerate"),
    Entry("stream-good", "processor", streamed(ask(GOOD)), rpc="StreamGenerate", reference=GOOD),
    _refused("preprocess-url-escape", "PERMISSION_DENIED", "MEDIA_PATH_NOT_ALLOWED",
             preprocessed(image_url(lambda ctx: "file:///proc/self/environ")), rpc="Preprocess"),
    _refused("preprocess-image-bomb", INVALID, "IMAGE_TOO_LARGE",
             preprocessed(with_media("image", lambda: bad.png_bomb(20_000))), rpc="Preprocess"),
    _refused("preprocess-audio-one-sample", INVALID, "AUDIO_TOO_SHORT",
             preprocessed(with_media("audio", bad.wav(1))), rpc="Preprocess"),
    # ---- precomputed embeddings sent to the processor -----------------------------------------
    *[_refused(f"embeddings-{name}", INVALID, reason, _embeddings(emb, w, h)) for name, reason, emb, w, h in [
        ("no-image-size", "EMBEDDINGS_IMAGE_SIZE_MISSING", lambda ctx: to_proto(torch.zeros(4, ctx.hidden_size)), 0, 0),
        ("image-size-over-cap", "IMAGE_TOO_LARGE", lambda ctx: to_proto(torch.zeros(4, ctx.hidden_size)), 4000, 4000),
        ("wrong-hidden-size", "EMBEDDING_SHAPE_MISMATCH", lambda ctx: to_proto(torch.zeros(4, ctx.hidden_size + 1)), 64, 64),
        ("wrong-row-count", "EMBEDDING_SHAPE_MISMATCH", lambda ctx: to_proto(torch.zeros(3, ctx.hidden_size)), 64, 64),
        ("bfloat16", "EMBEDDING_DTYPE_MISMATCH",
         lambda ctx: to_proto(torch.zeros(4, ctx.hidden_size, dtype=torch.bfloat16)), 64, 64),
        ("nan", "EMBEDDING_NOT_FINITE", lambda ctx: to_proto(torch.full((4, ctx.hidden_size), float("nan"))), 64, 64),
        ("bytes-short-of-shape", "TENSOR_SIZE_MISMATCH", lambda ctx: tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[4, ctx.hidden_size], data=bytes(12)), 64, 64),
    ]],
    # ---- the encoder, called directly -----------------------------------------------------------
    _refused("encoder-fingerprint-mismatch", "FAILED_PRECONDITION", "MODEL_FINGERPRINT_MISMATCH",
             encode(_set("model_fingerprint", "0123456789abcdef")), "encoder"),
    _refused("encoder-modality-unknown-enum", INVALID, "MODALITY_INVALID", encode(_set("items.0.modality", 99)), "encoder"),
    _refused("encoder-modality-unspecified", INVALID, "MODALITY_INVALID", encode(_set("items.0.modality", 0)), "encoder"),
    _refused("encoder-tensor-bytes-short-of-shape", INVALID, "TENSOR_SIZE_MISMATCH", encode(
        lambda r, ctx: setattr(named(r.items[0], "pixel_values"), "data", named(r.items[0], "pixel_values").data[:-4])),
        "encoder"),
    _refused("encoder-tensor-dtype-unknown-enum", INVALID, "TENSOR_DTYPE_UNSUPPORTED",
             encode(lambda r, ctx: setattr(named(r.items[0], "pixel_values"), "dtype", 99)), "encoder"),
    _refused("encoder-tensor-negative-dim", INVALID, "TENSOR_SHAPE_INVALID",
             encode(lambda r, ctx: _shape(named(r.items[0], "pixel_values"), -1, 768)), "encoder"),
    _refused("encoder-tensor-shape-product-overflows-int64", INVALID, "TENSOR_SIZE_MISMATCH",
             encode(lambda r, ctx: (_shape(named(r.items[0], "pixel_values"), 2**32, 2**32),
                                   named(r.items[0], "pixel_values").ClearField("data"))), "encoder",
             why="2^64 elements wrap to 0 in int64: must not pass as an empty tensor"),
    _refused("encoder-pixels-as-int64", INVALID, "ENCODER_INPUT_INVALID", encode(lambda r, ctx: replace_tensor(
        named(r.items[0], "pixel_values"), from_proto(named(r.items[0], "pixel_values")).long())), "encoder"),
    _refused("encoder-grid-as-float", INVALID, "ENCODER_INPUT_INVALID", encode(lambda r, ctx: replace_tensor(
        named(r.items[0], "image_grid_hw"), from_proto(named(r.items[0], "image_grid_hw")).float())), "encoder"),
    _refused("encoder-grid-claims-100000x100000", INVALID, "ENCODER_INPUT_INVALID",
             encode(lambda r, ctx: _grid(r, 100_000, 100_000)), "encoder", why="a claim never sizes an allocation"),
    _refused("encoder-grid-zero", INVALID, "ENCODER_INPUT_INVALID", encode(lambda r, ctx: _grid(r, 0, 0)), "encoder"),
    _refused("encoder-grid-odd", INVALID, "ENCODER_INPUT_INVALID",
             encode(lambda r, ctx: _patches(r, 9, 3, 3)), "encoder", why="not a multiple of the pixel shuffle"),
    _refused("encoder-item-over-max-item-patches", INVALID, "ITEM_TOO_LARGE",
             encode(lambda r, ctx: _patches(r, 34 * 32, 34, 32)), "encoder"),
    _refused("encoder-tensor-missing", INVALID, "ENCODER_INPUT_INVALID",
             encode(lambda r, ctx: r.items[0].tensors.pop()), "encoder"),
    _refused("encoder-tensor-unexpected", INVALID, "ENCODER_INPUT_INVALID", encode(lambda r, ctx: r.items[0].tensors.add(
        name="extra", tensor=to_proto(torch.zeros(1)))), "encoder"),
    _refused("encoder-tensor-name-twice", INVALID, "TENSOR_NAME_DUPLICATE",
             encode(lambda r, ctx: r.items[0].tensors.append(r.items[0].tensors[0])), "encoder"),
    _refused("encoder-pixels-nan", INVALID, "ENCODER_INPUT_NOT_FINITE", encode(lambda r, ctx: replace_tensor(
        named(r.items[0], "pixel_values"), from_proto(named(r.items[0], "pixel_values")) * float("nan"))), "encoder",
             why="else NaN embeddings come back as an answer"),
    _refused("encoder-audio-features-inf", INVALID, "ENCODER_INPUT_NOT_FINITE", encode(lambda r, ctx: replace_tensor(
        named(r.items[1], "input_features"), from_proto(named(r.items[1], "input_features")) + float("inf"))),
        "encoder"),
    _refused("encoder-audio-mask-all-ones", INVALID, "ENCODER_INPUT_INVALID", encode(lambda r, ctx: replace_tensor(
        named(r.items[1], "input_features_mask"), torch.ones_like(from_proto(named(r.items[1], "input_features_mask"))))),
        "encoder"),
    _refused("encoder-audio-tensors-on-image-item", INVALID, "ENCODER_INPUT_INVALID",
             encode(lambda r, ctx: r.items[0].CopyFrom(encoder_pb2.MediaItem(
                 modality=r.items[0].modality, tensors=r.items[1].tensors))), "encoder"),
    _refused("encoder-video-claims-1000-frames", INVALID, "TENSOR_SIZE_MISMATCH", encode(_video_claim), "encoder",
             why="refused from the shape and byte count, nothing allocated"),
    _refused("encoder-too-many-items", INVALID, "TOO_MANY_ITEMS",
             encode(lambda r, ctx: r.items.extend([r.items[0]] * MAX_ENCODER_ITEMS)), "encoder"),
    _refused("encoder-reference-without-mm-hash", INVALID, "ENCODER_INPUT_INVALID",
             encode(lambda r, ctx: r.items[0].CopyFrom(encoder_pb2.MediaItem(modality=r.items[0].modality))), "encoder"),
    _refused("encoder-reference-not-cached", "NOT_FOUND", "EMBEDDING_NOT_CACHED",
             encode(lambda r, ctx: r.items[0].CopyFrom(encoder_pb2.MediaItem(
                 modality=r.items[0].modality, mm_hash="never-encoded"))), "encoder"),
    _refused("encoder-mm-hash-of-other-tensors", INVALID, "MM_HASH_CONFLICT",
             encode(lambda r, ctx: (r.items[0].ClearField("tensors"), r.items[0].tensors.extend(
                 ctx.other_image_item.tensors))), "encoder",
             why="the good image's mm_hash (cached) over another image's tensors"),
    _refused("encoder-tensors-and-media", INVALID, "MEDIA_ITEM_INPUTS_CONFLICT",
             encode(lambda r, ctx: setattr(r.items[0].media, "data", GOOD_PNG)), "encoder"),
    _refused("encoder-media-audio", INVALID, "MEDIA_MODALITY_UNSUPPORTED",
             encode(lambda r, ctx: (r.items[1].ClearField("tensors"), setattr(r.items[1].media, "data", AUDIO))), "encoder"),
    _refused("encoder-media-truncated", INVALID, "IMAGE_DECODE_FAILED",
             encode(lambda r, ctx: _media_item(r, bad.truncated(GOOD_PNG))), "encoder"),
    _refused("encoder-media-2000x1", INVALID, "PROCESSOR_REJECTED",
             encode(lambda r, ctx: _media_item(r, image_bytes(2000, 1, seed=46))), "encoder"),
    _refused("encoder-media-empty", INVALID, "MEDIA_EMPTY", encode(lambda r, ctx: _media_item(r, b"")), "encoder"),
    _refused("encoder-media-bomb", INVALID, "IMAGE_TOO_LARGE",
             encode(lambda r, ctx: _media_item(r, bad.png_bomb(20_000))), "encoder"),
    _refused("encoder-media-over-max-media-mib", INVALID, "MEDIA_TOO_LARGE",
             encode(lambda r, ctx: _media_item(r, PNG_MAGIC + bytes(MAX_MEDIA_MIB << 20))), "encoder"),
    _refused("encoder-video-pruning-rate-2", INVALID, "VIDEO_PRUNING_RATE_INVALID",
             encode(lambda r, ctx: setattr(r.items[0].video_pruning, "rate", 2.0)), "encoder"),
    _refused("encoder-video-pruning-on-image", INVALID, "VIDEO_PRUNING_UNSUPPORTED",
             encode(lambda r, ctx: setattr(r.items[0].video_pruning, "rate", 0.5)), "encoder"),
    Entry("encoder-transport-unknown-enum", "encoder", encode(_set("embeddings_transport", 99)),
          why="an unknown transport answers inline, the form every caller reads"),
    _refused("encoder-message-over-max-message-mib", "RESOURCE_EXHAUSTED", "",
             encode(lambda r, ctx: _media_item(r, bytes((MAX_MESSAGE_MIB << 20) + 1))), "encoder"),
    # ---- the LLM, called directly ---------------------------------------------------------------
    _refused("llm-fingerprint-mismatch", "FAILED_PRECONDITION", "MODEL_FINGERPRINT_MISMATCH",
             generate(_set("model_fingerprint", "0123456789abcdef")), "llm"),
    _refused("llm-token-ids-empty", INVALID, "PROMPT_EMPTY", generate(lambda r, ctx: r.ClearField("prompt")), "llm"),
    _refused("llm-token-id-negative", INVALID, "TOKEN_ID_OUT_OF_RANGE",
             generate(_tokens(lambda ids, ctx: [-1, *ids])), "llm"),
    _refused("llm-token-id-vocab-size", INVALID, "TOKEN_ID_OUT_OF_RANGE",
             generate(_tokens(lambda ids, ctx: [*ids, ctx.vocab_size])), "llm"),
    _refused("llm-token-id-2-pow-62", INVALID, "TOKEN_ID_OUT_OF_RANGE", generate(_tokens(lambda ids, ctx: [*ids, 2**62])),
             "llm"),
    _refused("llm-prompt-fills-context", INVALID, "PROMPT_TOO_LONG", generate(lambda r, ctx: (
        r.prompt.ClearField("multimodal_inputs"), _tokens(lambda ids, c: [1] * c.max_context_tokens)(r, ctx))), "llm"),
    _refused("llm-embeddings-bytes-short-of-shape", INVALID, "TENSOR_SIZE_MISMATCH",
             generate(lambda r, ctx: setattr(_image_emb(r), "data", _image_emb(r).data[:-4])), "llm"),
    _refused("llm-embeddings-wrong-hidden-size", INVALID, "EMBEDDING_SHAPE_MISMATCH", generate(
        lambda r, ctx: replace_tensor(_image_emb(r), from_proto(_image_emb(r))[:, :-1])), "llm"),
    _refused("llm-embeddings-one-row-short", INVALID, "EMBEDDING_SHAPE_MISMATCH", generate(
        lambda r, ctx: replace_tensor(_image_emb(r), from_proto(_image_emb(r))[:-1])), "llm"),
    _refused("llm-embeddings-bfloat16", INVALID, "EMBEDDING_DTYPE_MISMATCH", generate(
        lambda r, ctx: replace_tensor(_image_emb(r), from_proto(_image_emb(r)).bfloat16())), "llm"),
    _refused("llm-embeddings-int32-bytes", INVALID, "EMBEDDING_DTYPE_MISMATCH",
             generate(lambda r, ctx: setattr(_image_emb(r), "dtype", tensor_pb2.DATA_TYPE_INT32)), "llm",
             why="same byte count, another dtype: no silent reinterpretation"),
    _refused("llm-embeddings-dtype-unknown-enum", INVALID, "TENSOR_DTYPE_UNSUPPORTED",
             generate(lambda r, ctx: setattr(_image_emb(r), "dtype", 99)), "llm"),
    _refused("llm-embeddings-nan", INVALID, "EMBEDDING_NOT_FINITE", generate(_poison(float("nan"))), "llm"),
    _refused("llm-embeddings-inf", INVALID, "EMBEDDING_NOT_FINITE", generate(_poison(float("-inf"))), "llm"),
    _refused("llm-embeddings-missing-for-an-item", INVALID, "PLACEHOLDER_COUNT_MISMATCH",
             generate(lambda r, ctx: r.prompt.multimodal_inputs.pop()), "llm"),
    _refused("llm-embeddings-unset", INVALID, "EMBEDDING_SHAPE_MISMATCH",
             generate(lambda r, ctx: r.prompt.multimodal_inputs[0].ClearField("embeddings")), "llm"),
    _refused("llm-range-shifted-left", INVALID, "PLACEHOLDER_RANGE_INVALID",
             generate(_range(0, offset=lambda p: p.offset - 1)), "llm"),
    _refused("llm-range-past-the-end", INVALID, "PLACEHOLDER_RANGE_INVALID",
             generate(_range(0, offset=lambda p: 10**6)), "llm"),
    _refused("llm-range-negative-offset", INVALID, "PLACEHOLDER_RANGE_INVALID", generate(_range(0, offset=-5)), "llm"),
    _refused("llm-range-length-zero", INVALID, "PLACEHOLDER_RANGE_INVALID", generate(_range(0, length=0)), "llm"),
    _refused("llm-range-length-2-pow-62", INVALID, "PLACEHOLDER_RANGE_INVALID", generate(_range(0, length=2**62)), "llm"),
    _refused("llm-range-twice", INVALID, "PLACEHOLDER_RANGE_INVALID",
             generate(lambda r, ctx: r.prompt.multimodal_inputs.append(r.prompt.multimodal_inputs[0])), "llm"),
    _refused("llm-range-audio-on-image-tokens", INVALID, "PLACEHOLDER_RANGE_INVALID",
             generate(_range(0, modality=tensor_pb2.MODALITY_AUDIO)), "llm"),
    _refused("llm-modality-unknown-enum", INVALID, "MODALITY_INVALID", generate(_range(0, modality=99)), "llm"),
    _refused("llm-position-input-unexpected", INVALID, "POSITION_INPUT_INVALID", generate(
        lambda r, ctx: r.prompt.multimodal_inputs[0].position_inputs.add(name="image_grid_thw",
                                                                         tensor=to_proto(torch.tensor([[1, 8, 8]])))),
        "llm"),
    _refused("llm-deepstack-on-a-model-without", INVALID, "DEEPSTACK_COUNT_MISMATCH", generate(
        lambda r, ctx: r.prompt.multimodal_inputs[0].deepstack_embeddings.append(_image_emb(r))), "llm"),
    _refused("llm-kept-token-indexes-on-image", INVALID, "VIDEO_PRUNING_UNSUPPORTED",
             generate(lambda r, ctx: r.prompt.multimodal_inputs[0].kept_token_indexes.extend([0, 1])), "llm"),
    _refused("llm-embeddings-in-chunks-of-unary-call", INVALID, "TENSOR_LOCATION_UNSUPPORTED",
             generate(lambda r, ctx: setattr(_image_emb(r), "chunked_id", 7)), "llm"),
    _refused("llm-embeddings-shm-handle-forged", INVALID, "SHM_HANDLE_INVALID", generate(
        lambda r, ctx: (_image_emb(r).ClearField("data"), _image_emb(r).shm.CopyFrom(
            tensor_pb2.SharedMemoryHandle(host_id="x", pid=1, fd=0, token="../x")))),
        "llm", why="never opens what a forged pid/fd names"),
    _refused("llm-stop-strings", INVALID, "STOP_STRINGS_UNSUPPORTED",
             generate(_llm_sampling(stop=["."])), "llm"),
    _refused("llm-temperature-nan", INVALID, "SAMPLING_PARAM_INVALID",
             generate(_llm_sampling(temperature=float("nan"))), "llm"),
    _refused("llm-max-new-tokens-negative", INVALID, "SAMPLING_PARAM_INVALID",
             generate(_llm_sampling(max_new_tokens=-1)), "llm"),
    _refused("llm-stop-token-id-out-of-vocabulary", INVALID, "SAMPLING_PARAM_INVALID",
             generate(_llm_sampling(stop_token_ids=[-1])), "llm"),
    _refused("llm-stream-embeddings-nan", INVALID, "EMBEDDING_NOT_FINITE", streamed(generate(_poison(float("nan")))),
             "llm", rpc="StreamGenerate"),
    _refused("llm-stream-token-id-vocab-size", INVALID, "TOKEN_ID_OUT_OF_RANGE",
             streamed(generate(_tokens(lambda ids, ctx: [*ids, ctx.vocab_size]))), "llm", rpc="StreamGenerate"),
    Entry("llm-stream-good", "llm", streamed(generate(lambda r, ctx: None)), rpc="StreamGenerate", reference=GOOD),
    _refused("llm-message-over-max-message-mib", "RESOURCE_EXHAUSTED", "", generate(
        lambda r, ctx: setattr(_image_emb(r), "data", bytes((MAX_MESSAGE_MIB << 20) + 1))), "llm"),
    Entry("llm-max-new-tokens-int32-max", "llm", generate(lambda r, ctx: (
        setattr(r.sampling, "max_new_tokens", 2**31 - 1), r.sampling.stop_token_ids.append(ctx.good_tokens[0]))),
        reference=Reference(GOOD.prompt, GOOD.images, GOOD.other, num_tokens=1)),
    _refused("llm-chunks-incomplete", INVALID, "TENSOR_CHUNKS_INCOMPLETE",
             chunked(lambda messages, ctx: messages.pop()), "llm", rpc="ChunkedStreamGenerate"),
    _refused("llm-chunk-offset-gap", INVALID, "TENSOR_CHUNK_INVALID",
             chunked(lambda messages, ctx: setattr(messages[1].chunks[0], "offset_bytes", 8)), "llm",
             rpc="ChunkedStreamGenerate"),
    _refused("llm-chunk-of-undeclared-tensor", INVALID, "TENSOR_CHUNK_INVALID",
             chunked(lambda messages, ctx: setattr(messages[1].chunks[0], "chunked_id", 99)), "llm",
             rpc="ChunkedStreamGenerate"),
    _refused("llm-chunk-runs-past-its-tensor", INVALID, "TENSOR_CHUNK_INVALID",
             chunked(lambda messages, ctx: setattr(messages[1].chunks[0], "data", messages[1].chunks[0].data + bytes(4))),
             "llm", rpc="ChunkedStreamGenerate"),
    _refused("llm-chunked-tensor-claims-huge-shape", INVALID, "EMBEDDING_SHAPE_MISMATCH",
             chunked(lambda messages, ctx: _shape(messages[0].request.prompt.multimodal_inputs[0].embeddings, 10**6,
                                                  ctx.hidden_size)), "llm", rpc="ChunkedStreamGenerate",
             why="checked before any chunk is kept"),
    _refused("llm-chunked-stream-without-request", INVALID, "TENSOR_CHUNK_INVALID",
             chunked(lambda messages, ctx: messages.pop(0)), "llm", rpc="ChunkedStreamGenerate"),
]


def summary() -> str:
    """The corpus as a markdown table: entries per target, code and reason (docs/reliability/corpus.md)."""
    counts: dict[tuple[str, str, str], list[str]] = {}
    for entry in ENTRIES:
        counts.setdefault((entry.target, entry.code, entry.reason or "-"), []).append(entry.name)
    rows = [f"| {target} | {code} | {reason} | {len(names)} |" for (target, code, reason), names in sorted(counts.items())]
    return "\n".join([f"{len(ENTRIES)} entries.", "", "| target | code | reason | entries |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    print(summary())
