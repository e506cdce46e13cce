"""ProcessorService: chat messages with media in, text out, via the encoder and the LLM."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from services.common import metrics, tracing
from services.common.admission import Admission
from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.api.triptych.llm.v1 import llm_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.config import ProcessorConfig
from services.common.errors import Internal, InvalidArgument, TriptychError
from services.common.sampling_params import check_params, invalid_param
from services.common.tensors import slice_rows, to_named
from services.common.tls import ClientTLS
from services.models import evs
from services.models.base import VIDEO, ProcessedItem, ProcessedPrompt
from services.models.checkpoint import Checkpoint, modality_to_proto
from services.processor.embeds import EmbeddingSpec, check_rows
from services.processor.local_encoder import LocalEncoder
from services.processor.media import MediaReader, RequestMedia
from services.processor.pool import EncoderPool
from services.processor.router import LlmClient, check_embedding_dtypes
from services.processor.text import TextStream

log = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A request after media decoding and the HF processor: what goes to the encoder and the LLM."""

    prompt_text: str
    processed: ProcessedPrompt
    mm_hashes: list[str]  # one per item, in prompt order; the same image twice has the same hash
    # Items that never go to the encoder service: sent as embeddings by the caller (mm_hash -> them),
    # and those the processor's local encoder takes.
    precomputed: dict[str, encoder_pb2.ItemEmbeddings] = field(default_factory=dict)
    local: frozenset[str] = frozenset()
    # Each item's file bytes as received (media mode sends them); None for an item sent as embeddings.
    media: list[bytes | None] = field(default_factory=list)
    # EVS: the prompt before pruning, kept when a pruned video has a run per frame group, whose runs are
    # laid out again once the encoder has chosen (evs.frame_runs); None otherwise.
    unpruned: ProcessedPrompt | None = None

    @property
    def all_items(self) -> dict[str, ProcessedItem]:
        """mm_hash -> the first item with it, each hash once."""
        unique: dict[str, ProcessedItem] = {}
        for item, h in zip(self.processed.items, self.mm_hashes, strict=True):
            unique.setdefault(h, item)
        return unique

    @property
    def unique_items(self) -> dict[str, ProcessedItem]:
        """What the encoder service is asked for, each hash once."""
        return {h: item for h, item in self.all_items.items() if h not in self.precomputed and h not in self.local}

    @property
    def unique_files(self) -> dict[str, bytes]:
        """mm_hash -> the file of the first item with it (items of the same hash decode to the same pixels)."""
        files: dict[str, bytes] = {}
        for h, data in zip(self.mm_hashes, self.media, strict=True):
            if data is not None:
                files.setdefault(h, data)
        return files


def _max_text_bytes(tokenizer, max_context_tokens: int) -> int:
    """The most normalized text bytes a prompt that fits the context can hold: context x the longest token
    string (UTF-8 bytes; a byte-level BPE or SentencePiece token stands for at most that many). Longer text
    is refused before tokenizing it, which holds ~300 bytes per token (a 1 MiB prompt cost the processor
    ~350 MiB and 6 s on the tiny Nemotron-H Omni)."""
    longest = max((len(token.encode()) for token in tokenizer.get_vocab()), default=1)
    return max_context_tokens * longest


def _check_same_hash_same_item(hashes: list[str], items: list[ProcessedItem]) -> None:
    """Items of one mm_hash are encoded once and share its rows: a caller's uuid on two media that differ
    (another placeholder count) would hand the second the first's rows, which the LLM refused as a
    TENSOR_SIZE_MISMATCH of its own (or, at an equal count, answered with the wrong image)."""
    first: dict[str, ProcessedItem] = {}
    for index, (h, item) in enumerate(zip(hashes, items, strict=True)):
        seen = first.setdefault(h, item)
        if (seen.modality, seen.length) != (item.modality, item.length):
            raise InvalidArgument(f"media item {index} has the mm_hash (uuid) {h!r} of an earlier item but is another "
                                  f"{item.modality} ({item.length} placeholder tokens, not {seen.length}); give each "
                                  "media its own uuid", reason="MM_HASH_CONFLICT", metadata={"mmHash": h})


class ProcessorServicer(processor_pb2_grpc.ProcessorServiceServicer):
    def __init__(self, checkpoint: Checkpoint, cfg: ProcessorConfig):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.cfg = cfg
        self.hf_processor = self.family.load_processor(checkpoint.path)
        self.tokenizer = self.hf_processor.tokenizer
        evs.check_rate(cfg.video_pruning_rate, "--video-pruning-rate")
        if cfg.video_pruning_rate and VIDEO in self.family.modalities and not self.family.supports_video_pruning:
            raise InvalidArgument(f"--video-pruning-rate {cfg.video_pruning_rate}: the {self.family.name} model has "
                                  "no video pruning (EVS); start with 0", reason="VIDEO_PRUNING_UNSUPPORTED",
                                  metadata={"family": self.family.name})
        self.reserved_tokens = [self.family.placeholder_token(m) for m in self.family.modalities]
        self.max_text_bytes = _max_text_bytes(self.tokenizer, self.family.max_context_tokens)
        self.embedding_spec = EmbeddingSpec(
            family_name=self.family.name, hidden_size=self.family.hidden_size, dtype=checkpoint.dtype,
            num_deepstack_layers=self.family.num_deepstack_layers, fingerprint=checkpoint.fingerprint,
            max_image_pixels=cfg.max_image_pixels)
        self.media_reader = MediaReader(cfg, self.family, self.hf_processor, checkpoint.fingerprint, self.embedding_spec)
        # Small items encoded in this process (--local-encode-max-patches), the rest by the encoder service.
        self.local_encoder = (LocalEncoder(checkpoint, cfg.local_encode_max_patches)
                              if cfg.local_encode_max_patches else None)
        # Media decoding, the HF processor and proto <-> tensor conversion are CPU work: never on the event loop.
        self._cpu = ThreadPoolExecutor(max_workers=cfg.preprocess_threads, thread_name_prefix="preprocess")
        upstream_tls = ClientTLS.from_files(cfg.tls_upstream_ca, cfg.tls_client_cert, cfg.tls_client_key,
                                            flags=("--tls-upstream-ca", "--tls-client-cert", "--tls-client-key"))
        self.encoders = EncoderPool(cfg.encoder_addrs, checkpoint.fingerprint,
                                    resolve_interval_s=cfg.encoder_resolve_interval_s,
                                    max_message_bytes=cfg.server.max_message_mib << 20, tls=upstream_tls)
        self.llm = LlmClient(cfg.llm_addr, checkpoint.fingerprint, cfg.server.max_message_mib << 20, tls=upstream_tls)
        self._transport = (encoder_pb2.EMBEDDINGS_TRANSPORT_SHARED_MEMORY if cfg.embeddings_transport == "shm"
                           else encoder_pb2.EMBEDDINGS_TRANSPORT_INLINE)
        # Every call that decodes media holds a place from its start to its last reply (docs/reliability/load.md).
        self.admission = Admission(cfg.max_concurrent_requests, service="processor", flag="--max-concurrent-requests",
                                   reason="PROCESSOR_OVERLOADED")

    async def connect(self) -> None:
        """Start-up check: the LLM and at least one encoder answer, serve our model and agree on the dtype
        (each encoder replica is checked again whenever it is admitted)."""
        llm_info = await self.llm.connect(self.cfg.connect_timeout_s)
        own_dtype = self.checkpoint.model_info().embedding_dtype
        await self.encoders.connect(self.cfg.connect_timeout_s, check=lambda address, info: check_embedding_dtypes(
            own_dtype, (address, info), (self.llm.address, llm_info)))

    async def close(self) -> None:
        await asyncio.gather(self.encoders.close(), self.llm.close())
        self._cpu.shutdown(wait=False)
        if self.local_encoder is not None:
            self.local_encoder.close()

    # ---- RPCs ---------------------------------------------------------------------------
    async def Generate(self, request: processor_pb2.GenerateRequest, context) -> processor_pb2.GenerateResponse:
        with self.admission.admit():
            async for event in self._generate(request, context):
                if event.HasField("completion"):
                    return processor_pb2.GenerateResponse(completion=event.completion)
        raise AssertionError("generation ended without a completion")

    async def StreamGenerate(self, request, context) -> AsyncIterator[processor_pb2.StreamGenerateResponse]:
        with self.admission.admit():  # released when the stream ends, fails or is cancelled
            async for event in self._generate(request, context):
                yield event

    async def Preprocess(self, request: processor_pb2.PreprocessRequest, context) -> processor_pb2.PreprocessResponse:
        with self.admission.admit():
            return await self._preprocess(request)

    async def _preprocess(self, request: processor_pb2.PreprocessRequest) -> processor_pb2.PreprocessResponse:
        self._check_sampling(request.sampling)  # cheap first: no media work for a bad request
        prepared = await self._prepare(request)
        return await self._offload(lambda: processor_pb2.PreprocessResponse(
            prompt_text=prepared.prompt_text,
            encode_request=self._encode_request(prepared),
            llm_request=self._llm_request(llm_pb2.GenerateRequest, prepared, None, request.sampling),
        ))

    async def GetModelInfo(self, request, context) -> processor_pb2.GetModelInfoResponse:
        return processor_pb2.GetModelInfoResponse(model_info=self.checkpoint.model_info())

    # ---- the pipeline -------------------------------------------------------------------
    async def _generate(self, request, context) -> AsyncIterator[processor_pb2.StreamGenerateResponse]:
        loop = asyncio.get_running_loop()
        timer = metrics.TokenTimer()
        remaining = context.time_remaining()
        deadline = loop.time() + (remaining if remaining is not None else self.cfg.default_timeout_s)
        self._check_sampling(request.sampling)
        prepared = await self._prepare(request)
        if self.local_encoder is not None:  # small items are encoded here, beside the encoder service's call
            prepared = replace(prepared, local=await self._offload(self.local_encoder.select, prepared.unique_items))
        local = self.local_encoder.start(prepared.all_items, prepared.local) if prepared.local else None
        encode_request = encoded = None
        if prepared.unique_items:
            encode_request = await self._offload(self._encode_request, prepared)
            encode_request.embeddings_transport = self._transport  # not in Preprocess's: its caller decides
            with tracing.span("encode", items=len(encode_request.items)):
                encoded = await self.encoders.encode(encode_request, deadline - loop.time())
        local_embeddings = await local if local is not None else {}
        text = TextStream(self.tokenizer, list(request.sampling.stop))
        token_ids: list[int] = []
        logprobs: list[generation_pb2.TokenLogprobs] = []
        finish_reason = generation_pb2.FINISH_REASON_UNSPECIFIED
        async for reply in self._llm_replies(prepared, encode_request, encoded, local_embeddings, request.sampling,
                                             deadline):
            if reply.token_ids:
                timer.tokens_arrived(len(reply.token_ids))
                token_ids.extend(reply.token_ids)
                delta = text.push(list(reply.token_ids))
                step_logprobs = self._with_token_text(reply.logprobs)
                logprobs.extend(step_logprobs)
                yield processor_pb2.StreamGenerateResponse(text_delta=delta, token_ids=reply.token_ids,
                                                           logprobs=step_logprobs)
                if text.stopped:
                    break
            else:
                finish_reason = reply.finish_reason
        timer.finished()
        tail = text.finish()
        if tail:
            yield processor_pb2.StreamGenerateResponse(text_delta=tail)
        if text.stopped:  # at a push, or in the text the last tokens completed
            finish_reason = generation_pb2.FINISH_REASON_STOP
        yield processor_pb2.StreamGenerateResponse(completion=processor_pb2.Completion(
            text=text.text, token_ids=token_ids, finish_reason=finish_reason,
            prompt_tokens=len(prepared.processed.token_ids), completion_tokens=len(token_ids), logprobs=logprobs,
        ))

    async def _llm_replies(self, prepared: Prepared, encode_request: encoder_pb2.EncodeRequest | None,
                           encoded: encoder_pb2.EncodeResponse | None, local: dict[str, encoder_pb2.ItemEmbeddings],
                           sampling: generation_pb2.SamplingParams,
                           deadline: float) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        """The LLM's replies. Where it cannot open the encoder's shared memory (another host, a region
        freed by its TTL, an encoder that restarted), the items are encoded again inline, once."""
        loop = asyncio.get_running_loop()
        llm_request = await self._offload(self._llm_request, llm_pb2.StreamGenerateRequest, prepared, encoded, sampling,
                                          local)
        replies = self.llm.stream_generate(llm_request, deadline - loop.time())
        try:
            first = await anext(replies, None)
        except TriptychError as err:
            if err.reason != "SHM_REGION_UNAVAILABLE" or encode_request is None:
                raise
            log.warning("the LLM cannot read the encoder's shared memory (%s); encoding again inline", err.message)
            inline = encoder_pb2.EncodeRequest()
            inline.CopyFrom(encode_request)
            inline.embeddings_transport = encoder_pb2.EMBEDDINGS_TRANSPORT_INLINE
            encoded = await self.encoders.encode(inline, deadline - loop.time())
            llm_request = await self._offload(self._llm_request, llm_pb2.StreamGenerateRequest, prepared, encoded,
                                              sampling, local)
            replies = self.llm.stream_generate(llm_request, deadline - loop.time())
            first = await anext(replies, None)
        try:
            if first is not None:
                yield first
            async for reply in replies:
                yield reply
        finally:
            await replies.aclose()  # a stop string ends the LLM call now, not at garbage collection

    def _with_token_text(self, logprobs) -> list[generation_pb2.TokenLogprobs]:
        """The LLM's logprobs with each token's text, as the tokenizer decodes it alone (special tokens kept)."""
        if not logprobs:
            return []
        steps = [generation_pb2.TokenLogprobs(token=step.token, top_logprobs=step.top_logprobs) for step in logprobs]
        entries = [entry for step in steps for entry in (step.token, *step.top_logprobs)]
        texts = self.tokenizer.batch_decode([[entry.token_id] for entry in entries], skip_special_tokens=False)
        for entry, piece in zip(entries, texts, strict=True):
            entry.text = piece
        return steps

    async def _prepare(self, request) -> Prepared:
        if not request.messages:
            raise InvalidArgument("messages is empty; send at least one user message", reason="MESSAGES_EMPTY")
        prepared = await self._offload(self._prepare_blocking, list(request.messages))
        num_tokens, max_ctx = len(prepared.processed.token_ids), self.family.max_context_tokens
        if num_tokens >= max_ctx:
            raise InvalidArgument(
                f"the prompt has {num_tokens} tokens (media placeholders included); the model's context is "
                f"{max_ctx} tokens. Shorten the text or send fewer or smaller images",
                reason="PROMPT_TOO_LONG", metadata={"promptTokens": str(num_tokens), "maxContextTokens": str(max_ctx)})
        return prepared

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn` on the worker threads, in this call's context (its log lines keep the request id)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._cpu, context.run, fn, *args)

    def _prepare_blocking(self, messages: list[processor_pb2.ChatMessage]) -> Prepared:
        hf_messages: list[dict[str, Any]] = []
        media = RequestMedia()
        text_bytes = 0
        for m_index, message in enumerate(messages):
            if message.role not in ROLES:
                raise InvalidArgument(f"messages[{m_index}].role is {message.role!r}; use one of {sorted(ROLES)}",
                                      reason="ROLE_INVALID")
            parts: list[dict[str, Any]] = []
            for p_index, part in enumerate(message.content):
                where = f"messages[{m_index}].content[{p_index}]"
                kind = part.WhichOneof("part")
                if kind == "text":
                    self._check_text(part.text, where)
                    text_bytes += self._text_bytes(part.text)
                    self._check_text_bytes(text_bytes)
                    parts.append({"type": "text", "text": part.text})
                elif kind is None:
                    raise InvalidArgument(f"{where}: set one of text, image, video, audio", reason="CONTENT_EMPTY")
                elif kind not in self.family.modalities:
                    why = self.family.modality_refusal(kind)
                    raise InvalidArgument(f"{where}: the {self.family.name} model does not take {kind} input "
                                          f"(it takes text, {', '.join(self.family.modalities)})"
                                          + (f": {why}" if why else ""), reason="MODALITY_UNSUPPORTED")
                else:
                    self.media_reader.read_part(kind, getattr(part, kind), f"{where}.{kind}", media)
                    parts.append({"type": kind})
            hf_messages.append({"role": message.role, "content": parts})
        try:
            with tracing.span("hf_processor"):
                prompt_text = self.family.render_chat(self.hf_processor, hf_messages)
                more = {name: items for name, items in (("videos", media.videos), ("audios", media.audios)) if items}
                processed = self.family.preprocess(self.hf_processor, prompt_text, media.images, **more)
        # ValueError: the HF processor's way of rejecting input (sizes, counts, roles). ArithmeticError: its
        # size arithmetic failing on an input it does not foresee (Nemotron-H Omni's divides by zero on a
        # 2000x1 image), the input's fault as much: not INTERNAL.
        except (ValueError, ArithmeticError) as err:
            raise InvalidArgument(f"the model's processor rejected the request: {err}",
                                  reason="PROCESSOR_REJECTED") from err
        if [item.modality for item in processed.items] != media.modalities:
            raise Internal(f"the {self.family.name} family made media items {[i.modality for i in processed.items]} "
                           f"of a request with {media.modalities}", reason="PREPROCESS_ITEM_MISMATCH")
        unpruned = None
        if media.pruning_rates:  # EVS: as many placeholders as the encoder will keep (known before it runs)
            unpruned = processed
            processed = evs.prune_prompt(processed, {
                index: evs.pruning_plan(self.family, processed.items[index], rate)
                for index, rate in media.pruning_rates.items()})
            if all(len(unpruned.items[index].placeholder_runs) == 1 for index in media.pruning_rates):
                unpruned = None  # one run each: the cut prompt is final
        for index, given in media.precomputed.items():
            check_rows(given, processed.items[index], self.family.hidden_size)
        hashes = [f"{h}+{item.hash_context}" if item.hash_context else h for h, item in zip(media.hashes, processed.items)]
        _check_same_hash_same_item(hashes, processed.items)
        return Prepared(prompt_text=prompt_text, processed=processed, mm_hashes=hashes, media=media.files,
                        unpruned=unpruned,
                        precomputed={given.item.mm_hash: given.item for given in media.precomputed.values()})

    def _check_text_bytes(self, text_bytes: int) -> None:
        """PROMPT_TOO_LONG for text that cannot fit the context whatever its tokens (_max_text_bytes)."""
        max_ctx = self.family.max_context_tokens
        if text_bytes > self.max_text_bytes:
            raise InvalidArgument(
                f"the text is {text_bytes} bytes or more (normalized); no token of this model stands for more than "
                f"{self.max_text_bytes // max_ctx} bytes, so it cannot fit the model's context of {max_ctx} tokens. "
                "Shorten the text", reason="PROMPT_TOO_LONG", metadata={"maxContextTokens": str(max_ctx)})

    def _text_bytes(self, text: str) -> int:
        """UTF-8 bytes of `text` as the tokenizer's normalizer leaves them (NFC may shorten it)."""
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        return len((normalizer.normalize_str(text) if normalizer else text).encode())

    def _check_text(self, text: str, where: str) -> None:
        for token in self.reserved_tokens:
            if token in text:
                raise InvalidArgument(f"{where}: text contains the reserved token {token}; send media as "
                                      "image/video/audio parts", reason="RESERVED_TOKEN_IN_TEXT")

    def _check_sampling(self, s: generation_pb2.SamplingParams) -> None:
        """Stop strings (only the processor applies them) and every range, before any media work; the LLM
        checks what depends on the model (stop token ids, the checkpoint's default repetition penalty)."""
        if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
            raise invalid_param("stop", f"must be at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                "characters")
        check_params(s)

    def _encode_request(self, prepared: Prepared) -> encoder_pb2.EncodeRequest:
        """Each distinct mm_hash once: the same image twice in a request is encoded once."""
        files = prepared.unique_files
        return encoder_pb2.EncodeRequest(
            model_fingerprint=self.checkpoint.fingerprint,
            items=[self._encode_item(h, item, files.get(h)) for h, item in prepared.unique_items.items()],
        )

    def _encode_item(self, mm_hash: str, item: ProcessedItem, data: bytes | None) -> encoder_pb2.MediaItem:
        """One item for the encoder: in media mode its file as received (the encoder makes the same tensors
        of it, encoder/media_inputs.py), else (or without a file) the HF processor's tensors."""
        modality = modality_to_proto(item.modality)
        if data is not None and self.cfg.encoder_input == "media":  # images only: `data` is None for others
            return encoder_pb2.MediaItem(modality=modality, mm_hash=mm_hash, media=encoder_pb2.EncodedMedia(data=data))
        pruning = (encoder_pb2.VideoPruning(rate=item.pruning.rate, retained_tokens=item.length)
                   if item.pruning else None)
        return encoder_pb2.MediaItem(modality=modality, mm_hash=mm_hash, tensors=to_named(item.encoder_inputs),
                                     video_pruning=pruning)

    def _final_layout(self, prepared: Prepared, by_hash: dict[str, encoder_pb2.ItemEmbeddings]) -> ProcessedPrompt:
        """The prompt the LLM gets: as prepared, except that a pruned video of one run per frame group has
        each group's kept tokens in that group's run once the encoder has said which (same length)."""
        if prepared.unpruned is None:
            return prepared.processed
        plans = {}
        for index, (item, h) in enumerate(zip(prepared.processed.items, prepared.mm_hashes, strict=True)):
            if item.pruning is None:
                continue
            unpruned = prepared.unpruned.items[index]
            emb = by_hash.get(h)
            lengths = (evs.frame_runs(item.pruning, list(emb.kept_token_indexes), len(unpruned.placeholder_runs))
                       if emb else None)
            if lengths is None or sum(lengths) != item.length:  # one run, not encoded yet (Preprocess), or a
                # reply the LLM will refuse: the cut as prepared
                lengths = self.family.pruned_placeholder_runs(unpruned, item.length)
            plans[index] = (item.pruning, lengths)
        return evs.prune_prompt(prepared.unpruned, plans)

    def _llm_request(self, request_cls: type[T], prepared: Prepared, reply: encoder_pb2.EncodeResponse | None,
                     sampling: generation_pb2.SamplingParams,
                     local: dict[str, encoder_pb2.ItemEmbeddings] | None = None) -> T:
        """The LLM request: every item (repeats included) with the embeddings of its mm_hash, if encoded
        (by the encoder service, or `local`ly) or sent by the caller."""
        by_hash: dict[str, encoder_pb2.ItemEmbeddings] = {**prepared.precomputed, **(local or {})}
        if reply is not None:
            if [e.mm_hash for e in reply.items] != list(prepared.unique_items):
                raise Internal("the encoders answered for other items than asked",
                               reason="ENCODER_REPLY_MISMATCH")
            by_hash.update((e.mm_hash, e) for e in reply.items)
        processed = self._final_layout(prepared, by_hash)
        inputs = []
        for index, (item, h) in enumerate(zip(processed.items, prepared.mm_hashes, strict=True)):
            emb = by_hash.get(h)
            kept = list(emb.kept_token_indexes) if emb else []
            if kept and prepared.unpruned and len(prepared.unpruned.items[index].placeholder_runs) > 1:
                per_group = item.pruning.unpruned_length // item.pruning.frames  # a run per frame group:
                kept = [k % per_group for k in kept]  # each run's indexes are into its own group's tokens
            first_row = 0
            if emb is not None and emb.HasField("cross_attention_states"):  # one token; the states add no rows
                inputs.append(llm_pb2.MultimodalInput(
                    placeholder=tensor_pb2.PlaceholderRange(modality=modality_to_proto(item.modality),
                                                            offset=item.offset, length=item.length, mm_hash=h),
                    cross_attention_states=emb.cross_attention_states, position_inputs=to_named(item.position_inputs)))
                continue
            for run_index, (offset, length) in enumerate(item.placeholder_runs):
                rows = slice(first_row, first_row + length)  # an item split in runs sends one input per run
                inputs.append(llm_pb2.MultimodalInput(
                    placeholder=tensor_pb2.PlaceholderRange(modality=modality_to_proto(item.modality), offset=offset,
                                                            length=length, mm_hash=h, embedding_offset=first_row),
                    embeddings=slice_rows(emb.embeddings, rows) if emb else None,
                    deepstack_embeddings=[slice_rows(d, rows) for d in emb.deepstack_embeddings] if emb else [],
                    position_inputs=to_named(item.position_inputs_of_run(run_index)),
                    kept_token_indexes=kept[rows],
                ))
                first_row += length
        llm_sampling = generation_pb2.SamplingParams()
        llm_sampling.CopyFrom(sampling)
        llm_sampling.ClearField("stop")  # stop strings are applied here, on the text; the LLM refuses them
        return request_cls(
            model_fingerprint=self.checkpoint.fingerprint,
            prompt=llm_pb2.Prompt(token_ids=processed.token_ids, multimodal_inputs=inputs),
            sampling=llm_sampling,
        )
