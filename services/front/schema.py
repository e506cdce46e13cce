"""OpenAI's chat completion shapes, as the front takes and returns them (pydantic).

Requests: the fields of OpenAI's API the front implements, plus vLLM's extras that OpenAI clients
send through `extra_body` (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
return_token_ids) and vLLM's media parts (video_url, audio_url). Fields it does not know are
ignored, as OpenAI-compatible servers do; fields it knows but does not implement (n > 1, tools,
logit_bias) are refused in convert.py. Responses: what OpenAI returns, `null`s included.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _unset(value: Any) -> bool:
    return value is None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MediaUrl(_Request):
    """An image, video or audio: a `data:<mime>;base64,...` URL, or a URL the processor reads (file://)."""

    url: str
    detail: str | None = None  # OpenAI's image detail level; the model's processor decides the size


class InputAudio(_Request):
    data: str  # base64 of the file
    format: str = "wav"  # any container FFmpeg reads; the processor sniffs it from the bytes


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: MediaUrl
    uuid: str | None = None  # vLLM's: the caller's id for the item, instead of its content hash


class VideoPart(_Request):
    type: Literal["video_url"]
    video_url: MediaUrl
    uuid: str | None = None


class AudioUrlPart(_Request):
    type: Literal["audio_url"]
    audio_url: MediaUrl
    uuid: str | None = None


class InputAudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio
    uuid: str | None = None


ContentPart = Annotated[TextPart | ImagePart | VideoPart | AudioUrlPart | InputAudioPart, Field(discriminator="type")]


class Message(_Request):
    role: str  # system, developer (as system), user, assistant; the processor refuses others
    content: str | list[ContentPart] | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str
    messages: list[Message]
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # OpenAI's older name; max_completion_tokens wins
    # OpenAI's defaults: an unset temperature or top_p is 1 (sampling), not greedy.
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Known to OpenAI, not implemented here: refused when set to anything but "off".
    tools: list[Any] | None = None
    tool_choice: Any = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's sampling extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool | None = None  # the generated token ids in each choice (and chunk)


# ---- responses ------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, exclude_if=_unset)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_unset)  # in the first chunk only
    content: str | None = Field(None, exclude_if=_unset)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_unset)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_unset)  # the last chunk, with stream_options.include_usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "triptych"
    root: str  # the checkpoint folder the services loaded
    max_model_len: int  # prompt plus generated tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None  # the ErrorInfo reason, e.g. "IMAGE_DECODE_FAILED"


class ErrorResponse(BaseModel):
    error: ErrorBody
