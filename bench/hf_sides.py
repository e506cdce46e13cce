"""The in-process peers: the whole model in transformers, in this process.

(a) `model.generate`, one request after another (batch 1, the way a script or a sequential server
    runs a VLM); (c) transformers' own continuous batching, `model.generate_batch` (paged
    attention), which takes token ids only, so text-only requests.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.workload import Request, Sample, SideResult, summarize

# An EOS id no token has: generation never stops early. (None would not do: `generate` fills unset
# values from the checkpoint's generation_config, EOS included; transformers' continuous batching
# itself uses -1 for "disabled".)
NO_EOS = -1


class _TokenClock(BaseStreamer):
    """Notes when each new token leaves `generate` (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class HfModel:
    """The checkpoint loaded whole, as a transformers user loads it."""

    def __init__(self, model_dir: Path):
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)

    def generation_config(self, new_tokens: int) -> GenerationConfig:
        """Greedy, exactly `new_tokens`: no EOS to stop at (as Triptych's ignore_eos, which does not
        mask EOS either: `min_new_tokens` would change greedy tokens where EOS is the argmax)."""
        config = copy.deepcopy(self.model.generation_config)
        config.update(max_new_tokens=new_tokens, min_new_tokens=None, do_sample=False, eos_token_id=NO_EOS,
                      temperature=None, top_p=None, top_k=None)
        return config

    def inputs(self, request: Request) -> dict:
        content = ([{"type": "image"}] if request.image is not None else []) + [{"type": "text", "text": request.text}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        images = [Image.open(io.BytesIO(request.image))] if request.image is not None else None
        return self.processor(text=[text], images=images, return_tensors="pt")

    def prompt_ids(self, request: Request) -> list[int]:
        return self.inputs(request)["input_ids"][0].tolist()


def run_sequential(hf: HfModel, requests: list[Request], new_tokens: int, mode: str, threads: int,
                   tick: Callable[[], None]) -> SideResult:
    """(a): each request whole (processor, encode, prefill, decode) after the previous one. TTFT is
    from the request's own start: nothing queues in a loop."""
    config = hf.generation_config(new_tokens)
    hf.model.generate(**hf.inputs(requests[0]), generation_config=config)  # warm-up
    samples: list[Sample] = []
    start = time.perf_counter()
    for request in requests:
        sent, clock = time.perf_counter(), _TokenClock()
        inputs = hf.inputs(request)  # the processor's time counts: it is part of serving a request
        with torch.inference_mode():
            out = hf.model.generate(**inputs, generation_config=config, streamer=clock)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        if len(ids) != new_tokens:
            raise RuntimeError(f"generate gave {len(ids)} tokens for request {request.index}, not {new_tokens}")
        samples.append(Sample(request.index, sent, clock.times[0], clock.times[-1], len(ids), ids))
        tick()
    wall = time.perf_counter() - start
    return summarize("hf_generate_sequential", mode, None, samples, wall, f"{threads} (in process)",
                     note="one request after another, in process; TTFT from each request's own start")


def run_generate_batch(hf: HfModel, requests: list[Request], new_tokens: int, threads: int,
                       tick: Callable[[], None]) -> SideResult:
    """(c): every request handed to `generate_batch` at once (paged attention, continuous batching).
    Token ids only: the prompt is tokenized before the clock starts, as the API requires."""
    config = hf.generation_config(new_tokens)
    prompts = [hf.prompt_ids(r) for r in requests]
    # No inference_mode here: generate_batch runs its own thread and zeroes its static tensors in place.
    # The manager (paged cache sized for this workload, ~10 s to set up on a CPU) is built and warmed
    # up by a first untimed run, and kept for the timed one: steady state, as a server would run.
    hf.model.generate_batch(prompts, generation_config=config, persistent_manager=True)
    start = time.perf_counter()
    outputs = hf.model.generate_batch(prompts, generation_config=config, record_timestamps=True,
                                      persistent_manager=True)
    wall = time.perf_counter() - start
    hf.model.destroy_cached_continuous_batching_manager()
    samples = []
    for request, out in zip(requests, outputs.values(), strict=True):
        if out.error is not None or not out.timestamps:
            raise RuntimeError(f"generate_batch failed on request {request.index}: {out.error}")
        ids = list(out.generated_tokens)
        if len(ids) != new_tokens:
            raise RuntimeError(f"generate_batch gave {len(ids)} tokens for request {request.index}, not {new_tokens}")
        samples.append(Sample(request.index, out.created_time, out.timestamps[0], out.timestamps[-1], len(ids), ids))
        tick()
    return summarize("hf_generate_batch", "text", len(requests), samples, wall, f"{threads} (in process)",
                     note="transformers continuous batching (paged attention), all requests submitted at once")
