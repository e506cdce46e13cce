"""LlmService: token ids + placeholder ranges + embeddings in, generated token ids out.

A request is parsed and checked in a worker thread (proto -> tensors, ranges, finite embeddings,
position inputs against the family's schema), never on the event loop. The model and every torch
step live in the engine's own process (engine_process.py); this process holds no model, so the
gRPC loop never waits on a torch step's GIL. What parsing needs of the model (vocabulary size)
comes from the engine's hello, the rest from the checkpoint's config files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GenerationConfig

from services.common import chunks, metrics, shm, tracing
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, torch_threads
from services.common.errors import InvalidArgument
from services.common.sampling_params import check_params, check_range, invalid_param
from services.common.tensors import DataType, ExternalBytes, from_named, from_proto
from services.llm.engine import Finished
from services.llm.engine_client import EngineClient
from services.llm.engine_process import EngineSpec
from services.llm.sampling import SampledToken, SamplingSpec
from services.models import evs
from services.models.base import VIDEO, ItemEmbeddings, PlacedEmbeddings
from services.models.checkpoint import Checkpoint, modality_from_proto

log = logging.getLogger(__name__)

_FINISH = {"stop": generation_pb2.FINISH_REASON_STOP, "length": generation_pb2.FINISH_REASON_LENGTH}


def _eos_token_ids(checkpoint: Checkpoint) -> frozenset[int]:
    """End-of-sequence ids as transformers' generate() uses them: generation_config first."""
    try:
        eos = GenerationConfig.from_pretrained(checkpoint.path).eos_token_id
    except OSError:  # no generation_config.json
        eos = checkpoint.family.text_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _default_repetition_penalty(checkpoint: Checkpoint) -> float:
    try:
        return float(GenerationConfig.from_pretrained(checkpoint.path).repetition_penalty or 1.0)
    except OSError:
        return 1.0


def _logprobs(token: SampledToken) -> list[generation_pb2.TokenLogprobs]:
    """The token's logprobs as the contract carries them: one entry when asked for, none otherwise."""
    if token.logprob is None:
        return []
    return [generation_pb2.TokenLogprobs(
        token=generation_pb2.TokenLogprob(token_id=token.token_id, logprob=token.logprob),
        top_logprobs=[generation_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs],
    )]


def _stage_spans(finished: Finished) -> None:
    """The engine's stages of a finished request as spans of the current call (tracing on)."""
    tracing.record_span("llm.queue", finished.queued_ns, finished.prefill_start_ns)
    tracing.record_span("llm.prefill", finished.prefill_start_ns, finished.prefill_end_ns)
    tracing.record_span("llm.decode", finished.prefill_end_ns, finished.end_ns, tokens=finished.num_generated)


@dataclass(frozen=True)
class ParsedRequest:
    """A Generate request checked against the model: what the engine takes."""

    token_ids: torch.Tensor  # [L]
    placed: list[PlacedEmbeddings]
    sampling: SamplingSpec


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, checkpoint: Checkpoint, cfg: LlmConfig):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.cfg = cfg
        self.eos_token_ids = _eos_token_ids(checkpoint)
        self.default_repetition_penalty = _default_repetition_penalty(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        self.placeholder_ids = {m: self.family.placeholder_token_id(tokenizer, m) for m in self.family.modalities}
        self._parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llm-parse")
        self.engine = EngineClient(EngineSpec(
            model=checkpoint.path, dtype=str(checkpoint.dtype).removeprefix("torch."), device=cfg.device,
            max_running=cfg.max_running_requests, max_waiting=cfg.max_waiting_requests,
            max_batch_tokens=cfg.max_batch_tokens,
            torch_threads=torch_threads(cfg.torch_threads)))
        self.engine.start()  # returns once the engine process has loaded the model
        self.vocab_size = self.engine.vocab_size  # the embedding table's rows (may exceed the tokenizer's)

    def stop(self) -> None:
        """Stops the engine process (requests still in it fail with UNAVAILABLE) and joins our threads."""
        self.engine.stop()
        self._parse_pool.shutdown(wait=True)

    # ---- RPCs ---------------------------------------------------------------------------
    async def Generate(self, request: llm_pb2.GenerateRequest, context) -> llm_pb2.GenerateResponse:
        token_ids: list[int] = []
        logprobs: list[generation_pb2.TokenLogprobs] = []
        async for event in self._generate(request):
            if isinstance(event, Finished):
                return llm_pb2.GenerateResponse(token_ids=token_ids, finish_reason=_FINISH[event.finish_reason],
                                                prompt_tokens=len(request.prompt.token_ids), logprobs=logprobs)
            token_ids.append(event.token_id)
            logprobs.extend(_logprobs(event))
        raise AssertionError("engine ended without a Finished event")

    async def StreamGenerate(self, request: llm_pb2.StreamGenerateRequest, context) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        async for response in self._stream(request):
            yield response

    async def ChunkedStreamGenerate(self, request_iterator, context) -> AsyncIterator[llm_pb2.ChunkedStreamGenerateResponse]:
        request, assembler = await chunks.receive_generate_request(request_iterator, check=self._check_chunked)
        async for response in self._stream(request, assembler):
            yield llm_pb2.ChunkedStreamGenerateResponse(response=response)

    async def GetModelInfo(self, request, context) -> llm_pb2.GetModelInfoResponse:
        return llm_pb2.GetModelInfoResponse(model_info=self.checkpoint.model_info())

    async def _stream(self, request: llm_pb2.StreamGenerateRequest,
                      assembler: chunks.Assembler | None = None) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        async for event in self._generate(request, assembler):
            if isinstance(event, Finished):
                yield llm_pb2.StreamGenerateResponse(finish_reason=_FINISH[event.finish_reason],
                                                     prompt_tokens=len(request.prompt.token_ids))
            else:
                yield llm_pb2.StreamGenerateResponse(token_ids=[event.token_id], logprobs=_logprobs(event))

    # ---- parsing ------------------------------------------------------------------------
    async def _generate(self, request: llm_pb2.GenerateRequest | llm_pb2.StreamGenerateRequest,
                        assembler: chunks.Assembler | None = None):
        timer = metrics.TokenTimer()
        with tracing.span("llm.parse"):
            parsed = await asyncio.get_running_loop().run_in_executor(self._parse_pool, self._parse, request, assembler)
        gauges = metrics.LlmRequestGauges(len(parsed.token_ids))
        try:
            async for event in self.engine.generate(parsed.token_ids, parsed.placed, parsed.sampling):
                if isinstance(event, Finished):
                    timer.finished()
                    gauges.close()  # now: Generate returns at Finished, before this generator is closed
                    _stage_spans(event)
                else:
                    timer.tokens_arrived(1)
                    gauges.token()
                yield event
        finally:
            gauges.close()

    def _parse(self, request: llm_pb2.GenerateRequest | llm_pb2.StreamGenerateRequest,
               assembler: chunks.Assembler | None = None) -> ParsedRequest:
        self.checkpoint.check_fingerprint(request.model_fingerprint)
        token_ids = self._parse_token_ids(request.prompt.token_ids)
        # Embedding bytes may lie in shared memory (claimed once parsed) or in a stream's chunks.
        with shm.Reader() as regions:
            external: dict[str, ExternalBytes] = {"shm": regions}
            if assembler is not None:
                external["chunked_id"] = assembler.finish()
            placed = self._parse_multimodal(request.prompt, token_ids, external)
        return ParsedRequest(token_ids, placed, self._parse_sampling(request.sampling, len(token_ids)))

    def _check_chunked(self, request: llm_pb2.StreamGenerateRequest) -> None:
        """Before a stream's chunks are read: each chunked tensor is [length, hidden] for a range no longer
        than the prompt, deepstack tensors as many as the model has layers for, so a stream cannot make us
        hold more bytes than the prompt's embeddings take."""
        num_tokens = len(request.prompt.token_ids)
        for index, mm in enumerate(request.prompt.multimodal_inputs):
            where, length = f"multimodal_inputs[{index}]", mm.placeholder.length
            if length > num_tokens:
                raise InvalidArgument(f"{where}: range of {length} tokens in a {num_tokens}-token prompt",
                                      reason="PLACEHOLDER_RANGE_INVALID")
            self._check_deepstack_count(mm, where)
            named = [(f"{where}.embeddings", mm.embeddings)]
            named += [(f"{where}.deepstack_embeddings[{i}]", t) for i, t in enumerate(mm.deepstack_embeddings)]
            if self._check_input_kind(mm, where):  # its size is the family's, not the range's
                self.family.check_cross_attention_states(tuple(mm.cross_attention_states.shape),
                                                         f"{where}.cross_attention_states")
                continue
            for name, proto in named:
                if proto.WhichOneof("external_data") == "chunked_id":
                    self._check_embedding_shape(name, proto, length)

    def _parse_token_ids(self, ids) -> torch.Tensor:
        if not ids:
            raise InvalidArgument("prompt.token_ids is empty", reason="PROMPT_EMPTY")
        token_ids = torch.tensor(list(ids), dtype=torch.long)
        bad = (token_ids < 0) | (token_ids >= self.vocab_size)
        if bad.any():
            raise InvalidArgument(
                f"token id {int(token_ids[bad][0])} at position {int(bad.nonzero()[0])} is outside the "
                f"vocabulary [0, {self.vocab_size})", reason="TOKEN_ID_OUT_OF_RANGE")
        max_ctx = self.family.max_context_tokens
        if len(token_ids) >= max_ctx:
            raise InvalidArgument(
                f"the prompt has {len(token_ids)} tokens; the model's context is {max_ctx} tokens, "
                "which must leave room for at least one generated token",
                reason="PROMPT_TOO_LONG", metadata={"promptTokens": str(len(token_ids)), "maxContextTokens": str(max_ctx)})
        return token_ids

    def _parse_multimodal(self, prompt: llm_pb2.Prompt, token_ids: torch.Tensor,
                          external: dict[str, ExternalBytes]) -> list[PlacedEmbeddings]:
        """Checks every embedding against its range, the model's dtype and hidden size; no silent casts."""
        placed: list[PlacedEmbeddings] = []
        covered = torch.zeros_like(token_ids, dtype=torch.bool)
        for index, mm in enumerate(prompt.multimodal_inputs):
            where = f"multimodal_inputs[{index}]"
            modality = modality_from_proto(mm.placeholder.modality)
            if modality not in self.family.modalities:
                raise InvalidArgument(f"{where}: this model does not take {modality}", reason="MODALITY_UNSUPPORTED")
            offset, length = mm.placeholder.offset, mm.placeholder.length
            if length <= 0 or offset < 0 or offset + length > len(token_ids):
                raise InvalidArgument(f"{where}: range [{offset}, {offset + length}) is outside the "
                                      f"{len(token_ids)}-token prompt", reason="PLACEHOLDER_RANGE_INVALID")
            span = slice(offset, offset + length)
            if covered[span].any():
                raise InvalidArgument(f"{where}: range [{offset}, {offset + length}) overlaps another",
                                      reason="PLACEHOLDER_RANGE_INVALID")
            if not (token_ids[span] == self.placeholder_ids[modality]).all():
                raise InvalidArgument(f"{where}: range [{offset}, {offset + length}) is not all "
                                      f"{self.family.placeholder_token(modality)} tokens",
                                      reason="PLACEHOLDER_RANGE_INVALID")
            covered[span] = True
            self._check_deepstack_count(mm, where)
            if self._check_input_kind(mm, where):
                name = f"{where}.cross_attention_states"
                self.family.check_cross_attention_states(tuple(mm.cross_attention_states.shape), name)
                tensors = [self._parse_embeddings(name, mm.cross_attention_states, None, external)]
            else:
                named = [(f"{where}.embeddings", mm.embeddings)]
                named += [(f"{where}.deepstack_embeddings[{i}]", t) for i, t in enumerate(mm.deepstack_embeddings)]
                tensors = [self._parse_embeddings(name, proto, length, external) for name, proto in named]
            position_inputs = from_named(mm.position_inputs)
            kept = self._parse_kept(mm, modality, length, where)
            self.family.check_position_inputs(modality, position_inputs, length, where=f"{where}.position_inputs",
                                              kept=kept)
            placed.append(PlacedEmbeddings(
                modality=modality, offset=offset, length=length,
                embeddings=ItemEmbeddings(tensors[0], tuple(tensors[1:])),
                position_inputs=position_inputs, kept=kept,
            ))
        for modality, token_id in self.placeholder_ids.items():
            uncovered = int(((token_ids == token_id) & ~covered).sum())
            if uncovered:
                raise InvalidArgument(f"{uncovered} {self.family.placeholder_token(modality)} tokens have no embeddings",
                                      reason="PLACEHOLDER_COUNT_MISMATCH")
        placed.sort(key=lambda p: p.offset)
        return placed

    def _parse_kept(self, mm: llm_pb2.MultimodalInput, modality: str, length: int, where: str) -> torch.Tensor | None:
        """A pruned video's kept token indexes (EVS), checked; None for an item not pruned."""
        if not mm.kept_token_indexes:
            return None
        if modality != VIDEO or not self.family.supports_video_pruning:
            what = f"the {self.family.name} model" if modality == VIDEO else f"a {modality} item"
            raise InvalidArgument(f"{where}: kept_token_indexes for {what}, which has no video pruning (EVS)",
                                  reason="VIDEO_PRUNING_UNSUPPORTED", metadata={"family": self.family.name})
        kept = torch.tensor(list(mm.kept_token_indexes), dtype=torch.long)
        evs.check_kept(kept, length, f"{where}.kept_token_indexes")
        return kept

    def _check_input_kind(self, mm: llm_pb2.MultimodalInput, where: str) -> bool:
        """Whether the input carries cross-attention states (the model's kind: Mllama's media enter through
        cross-attention layers, every other family's replace placeholder rows); the other kind is refused."""
        cross = self.family.cross_attention
        if mm.HasField("cross_attention_states") != cross or (cross and mm.HasField("embeddings")):
            sent = next((f for f in ("cross_attention_states", "embeddings") if mm.HasField(f)), "no tensor")
            takes = "cross_attention_states" if cross else "embeddings"
            raise InvalidArgument(f"{where}: {sent} for the {self.family.name} model, which takes {takes} only",
                                  reason="CROSS_ATTENTION_STATES_INVALID", metadata={"family": self.family.name})
        return cross

    def _check_deepstack_count(self, mm: llm_pb2.MultimodalInput, where: str) -> None:
        num_layers = self.family.num_deepstack_layers
        if len(mm.deepstack_embeddings) != num_layers:  # Qwen3-VL one per layer, others none: never ignored
            raise InvalidArgument(
                f"{where} has {len(mm.deepstack_embeddings)} deepstack_embeddings; the {self.family.name} model "
                f"takes {num_layers} (one per deepstack layer)", reason="DEEPSTACK_COUNT_MISMATCH",
                metadata={"deepstackLayers": str(num_layers)})

    def _check_embedding_shape(self, name: str, proto, length: int) -> None:
        hidden = self.family.hidden_size
        if tuple(proto.shape) != (length, hidden):  # before decoding: the shape alone says no
            shown = "is unset" if not proto.ListFields() else f"of shape {list(proto.shape)}"
            raise InvalidArgument(f"{name} {shown}, expected [{length}, {hidden}] "
                                  "(placeholder length x hidden size)", reason="EMBEDDING_SHAPE_MISMATCH")

    def _parse_embeddings(self, name: str, proto, length: int | None, external: dict[str, ExternalBytes]) -> torch.Tensor:
        """One embedding tensor: [length, hidden] in the model's dtype (no silent casts), all finite.
        `length` None: cross-attention states, whose shape the family has checked."""
        dtype = self.checkpoint.dtype
        if length is not None:
            self._check_embedding_shape(name, proto, length)
        tensor = from_proto(proto, name, external)
        if tensor.dtype != dtype:
            raise InvalidArgument(f"{name} are {DataType.Name(proto.dtype)}, the model runs in {dtype}; send them "
                                  "in the model's dtype", reason="EMBEDDING_DTYPE_MISMATCH")
        if not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise InvalidArgument(f"{name} holds NaN or Inf (first at row {bad[0]}, column {bad[1]}); embeddings "
                                  "must be finite", reason="EMBEDDING_NOT_FINITE", metadata={"input": name})
        return tensor

    def _parse_sampling(self, s: generation_pb2.SamplingParams, prompt_tokens: int) -> SamplingSpec:
        if s.stop:
            raise InvalidArgument(
                f"sampling.stop has {len(s.stop)} strings; the LLM service does not apply stop strings (the processor "
                "does, on the text). Send stop_token_ids", reason="STOP_STRINGS_UNSUPPORTED")
        check_params(s)
        penalty = s.repetition_penalty if s.HasField("repetition_penalty") else self.default_repetition_penalty
        check_range("repetition_penalty", penalty, 0.01, 10)  # the checkpoint's default too
        if not all(0 <= t < self.vocab_size for t in s.stop_token_ids):
            raise invalid_param("stop_token_ids", f"must be vocabulary ids in [0, {self.vocab_size})")
        room = self.family.max_context_tokens - prompt_tokens
        max_new = min(s.max_new_tokens or self.cfg.default_max_new_tokens, room)
        stop_ids = frozenset(s.stop_token_ids) | (frozenset() if s.ignore_eos else self.eos_token_ids)
        return SamplingSpec(
            max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, min_p=s.min_p,
            seed=s.seed if s.HasField("seed") else None, repetition_penalty=penalty,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, stop_token_ids=stop_ids,
            logprobs=s.logprobs, top_logprobs=s.top_logprobs,
        )
