"""An OpenAI chat completion request as the processor's messages and SamplingParams, and the
processor's Completion (or stream events) as OpenAI's reply.

Media parts map one to one onto the processor's ContentParts, in order: a base64 `data:` URL
becomes Media.data (the processor sniffs the format from the bytes, whatever the MIME type
says); any other URL goes as Media.url and the processor decides (file:// inside its
--allowed-media-dir, anything else refused). The processor checks every range; the front
checks only what it alone knows: the types of the JSON, and the parameters it does not implement.
"""

from __future__ import annotations

import base64
import binascii

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2
from services.front.errors import invalid_request
from services.front.schema import (
    AudioUrlPart,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ImagePart,
    InputAudioPart,
    Message,
    TextPart,
    TokenLogprob,
    TopLogprob,
    Usage,
    VideoPart,
)

FINISH_REASONS = {generation_pb2.FINISH_REASON_STOP: "stop", generation_pb2.FINISH_REASON_LENGTH: "length"}
# OpenAI reports an impossible token's logprob as this, not -inf (JSON has no infinities).
MIN_LOGPROB = -9999.0
_ROLES = {"developer": "system"}  # OpenAI's newer name for system instructions


def check_supported(request: ChatCompletionRequest) -> None:
    """Refuses what OpenAI's API has and the front does not do, rather than ignoring it."""
    if request.n not in (None, 1):
        raise invalid_request(f"n is {request.n}; this server returns one choice per request (n=1)", "n")
    if request.tools:
        raise invalid_request("tools are not supported by this server", "tools")
    if request.tool_choice not in (None, "none"):
        raise invalid_request("tool_choice is not supported by this server; omit it or send \"none\"", "tool_choice")
    if request.logit_bias:
        raise invalid_request("logit_bias is not supported by this server", "logit_bias")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise invalid_request("response_format other than {\"type\": \"text\"} is not supported by this server",
                              "response_format")


def chat_messages(messages: list[Message]) -> list[processor_pb2.ChatMessage]:
    out = []
    for m_index, message in enumerate(messages):
        if isinstance(message.content, str):
            parts = [processor_pb2.ContentPart(text=message.content)]
        else:
            parts = [_part(part, f"messages[{m_index}].content[{p_index}]")
                     for p_index, part in enumerate(message.content or ())]
        out.append(processor_pb2.ChatMessage(role=_ROLES.get(message.role, message.role), content=parts))
    return out


def _part(part, where: str) -> processor_pb2.ContentPart:
    if isinstance(part, TextPart):
        return processor_pb2.ContentPart(text=part.text)
    if isinstance(part, ImagePart):
        return processor_pb2.ContentPart(image=_media(part.image_url.url, part.uuid, f"{where}.image_url.url"))
    if isinstance(part, VideoPart):
        return processor_pb2.ContentPart(video=_media(part.video_url.url, part.uuid, f"{where}.video_url.url"))
    if isinstance(part, AudioUrlPart):
        return processor_pb2.ContentPart(audio=_media(part.audio_url.url, part.uuid, f"{where}.audio_url.url"))
    assert isinstance(part, InputAudioPart)
    data = _base64(part.input_audio.data, f"{where}.input_audio.data")
    return processor_pb2.ContentPart(audio=processor_pb2.Media(data=data, uuid=part.uuid or ""))


def _media(url: str, uuid: str | None, where: str) -> processor_pb2.Media:
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid_request(f"{where}: a data: URL must be data:<mime type>;base64,<data>", where)
        return processor_pb2.Media(data=_base64(payload, where), uuid=uuid or "")
    return processor_pb2.Media(url=url, uuid=uuid or "")


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid_request(f"{where} is not valid base64: {err}", where) from err


def sampling_params(request: ChatCompletionRequest) -> generation_pb2.SamplingParams:
    """OpenAI's parameters with OpenAI's defaults (temperature and top_p 1 when unset); the processor
    checks the ranges and names the field."""
    if request.seed is not None and not 0 <= request.seed < 2**64:
        raise invalid_request(f"seed is {request.seed}; use 0 to 2**64-1", "seed")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    optional = {name: value for name, value in (("seed", request.seed),
                                                ("repetition_penalty", request.repetition_penalty))
                if value is not None}
    try:
        return generation_pb2.SamplingParams(
            max_new_tokens=max_tokens or 0,  # 0: the LLM's --default-max-new-tokens
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=max(0, request.top_k or 0),  # vLLM's -1 means off, as our 0
            min_p=request.min_p or 0.0,
            presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
            stop=stop, stop_token_ids=request.stop_token_ids or [], ignore_eos=bool(request.ignore_eos),
            logprobs=bool(request.logprobs), top_logprobs=request.top_logprobs or 0, **optional)
    except (ValueError, TypeError) as err:  # a number beyond the proto field's type, e.g. max_tokens >= 2**31
        raise invalid_request(f"a sampling parameter is out of range: {err}", None) from err


def generate_request(request: ChatCompletionRequest) -> processor_pb2.GenerateRequest:
    """Raises TriptychError (REQUEST_INVALID) for what the processor would never see."""
    check_supported(request)
    return processor_pb2.GenerateRequest(messages=chat_messages(request.messages), sampling=sampling_params(request))


def logprobs(steps) -> ChoiceLogprobs | None:
    """The processor's TokenLogprobs (each token's text set) as OpenAI's `logprobs.content`."""
    if not steps:
        return None

    def entry(lp: generation_pb2.TokenLogprob) -> dict:
        return {"token": lp.text, "logprob": max(lp.logprob, MIN_LOGPROB), "bytes": list(lp.text.encode())}

    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(step.token), top_logprobs=[TopLogprob(**entry(t)) for t in step.top_logprobs])
        for step in steps])


def usage(completion: processor_pb2.Completion) -> Usage:
    return Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                 total_tokens=completion.prompt_tokens + completion.completion_tokens)

