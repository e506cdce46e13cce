"""`triptych generate`: one chat request to a processor, printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.server import channel_options

_FINISH_NAMES = {generation_pb2.FINISH_REASON_STOP: "stop", generation_pb2.FINISH_REASON_LENGTH: "length"}


def build_messages(prompt: str, images: Sequence[bytes] = (), *,
                   media: Sequence[tuple[str, bytes]] = ()) -> list[processor_pb2.ChatMessage]:
    """One user message: the media first (as HF chat templates order them: `images`, then each
    (modality, file bytes) of `media` in order), then the prompt."""
    parts = [processor_pb2.ContentPart(**{kind: processor_pb2.Media(data=data)})
             for kind, data in [*(("image", data) for data in images), *media]]
    parts.append(processor_pb2.ContentPart(text=prompt))
    return [processor_pb2.ChatMessage(role="user", content=parts)]


def _logprob_json(entry: generation_pb2.TokenLogprob) -> dict:
    return {"token_id": entry.token_id, "text": entry.text, "logprob": entry.logprob}


def completion_json(completion: processor_pb2.Completion) -> dict:
    result = {
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "finish_reason": _FINISH_NAMES.get(completion.finish_reason, "unspecified"),
    }
    if completion.logprobs:  # as the OpenAI API lays them out: one entry per token, its alternatives inside
        result["logprobs"] = [_logprob_json(step.token) | {"top_logprobs": [_logprob_json(t) for t in step.top_logprobs]}
                              for step in completion.logprobs]
    return result


def sampling_params(args: argparse.Namespace) -> generation_pb2.SamplingParams:
    """The request's SamplingParams from `triptych generate`'s flags; unset flags leave the server's defaults."""
    optional = {name: getattr(args, name) for name in ("seed", "repetition_penalty") if getattr(args, name) is not None}
    return generation_pb2.SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=args.stop, logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0, **optional)


def run_generate(args: argparse.Namespace) -> int:
    try:
        media = [(kind, path.read_bytes()) for kind, path in args.media]
    except OSError as err:
        print(f"error: cannot read media file: {err}", file=sys.stderr)
        return 2
    sampling = sampling_params(args)
    messages = build_messages(args.prompt, media=media)
    with grpc.insecure_channel(args.server, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        try:
            if args.stream:
                completion = None
                request = processor_pb2.StreamGenerateRequest(messages=messages, sampling=sampling)
                for event in stub.StreamGenerate(request, timeout=args.timeout_s):
                    if event.HasField("completion"):
                        completion = event.completion
                    elif not args.json:
                        print(event.text_delta, end="", flush=True)
                if not args.json:
                    print()
            else:
                request = processor_pb2.GenerateRequest(messages=messages, sampling=sampling)
                completion = stub.Generate(request, timeout=args.timeout_s).completion
                if not args.json:
                    print(completion.text)
        except grpc.RpcError as err:
            info = error_info(err)
            reason = f" [{info.reason}]" if info else ""
            print(f"error: {err.code().name}{reason}: {err.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(completion_json(completion)))
    return 0
