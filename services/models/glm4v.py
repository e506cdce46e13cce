"""GLM-4.1V (Glm4vForConditionalGeneration): Qwen3-VL's split (qwen3_vl.py) without deepstack, with GLM's
tokens and tower.

Images are Qwen2-VL's: patches per image with `image_grid_thw`, one `<|image|>` run of t*h*w/4 tokens per
image, merged rows from `get_image_features` (a 2x2 conv and gated MLP inside the tower), and mRoPE
positions from the model's own `get_rope_index`, which has Qwen2-VL's signature and rules (an image
advances the text position by max(h, w)/2; decode continues at cache length + delta). The language model
applies them to the rotary half of each head (partial rotary), inside the model.

Video is Qwen3-VL's shape with GLM's tokens: the processor writes each frame group (grid step t) as
`<|begin_of_image|><|image|>...<|end_of_image|>` followed by its timestamp in text, all between
`<|begin_of_video|>` and `<|end_of_video|>`, so a video is t runs of the image token, told apart from
images only by those markers (`modality_runs`); each run carries its grid [[1, h, w]], as get_rope_index
splits a video's grid. No EVS: GLM-V prunes nothing.

Images and a video in one prompt are refused: transformers 5.23's GLM-V takes every `<|image|>` as both an
image and a video position (get_placeholder_mask), so the model run whole rejects such a prompt and there
is no answer to reproduce.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin

from services.common.errors import InvalidArgument
from services.common.video import Video
from services.models.base import IMAGE, VIDEO, ProcessedPrompt
from services.models.qwen3_vl import Qwen3VL


class Glm4v(Qwen3VL):
    name = "glm4v"
    hf_architectures = ("Glm4vForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
    supports_video_pruning = False

    @property
    def num_deepstack_layers(self) -> int:
        return 0  # the tower has no deepstack mergers

    def placeholder_token(self, modality: str) -> str:
        return "<|image|>"  # a video's frames too, between <|begin_of_video|> and <|end_of_video|>

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = ()) -> ProcessedPrompt:
        if images and videos:
            raise InvalidArgument(f"{len(images)} images and {len(videos)} videos in one request: {self.name} takes "
                                  "images or videos in a prompt, not both (transformers' model cannot tell their "
                                  "placeholders apart)", reason="MODALITY_UNSUPPORTED", metadata={"modality": VIDEO})
        return super().preprocess(processor, text, images, videos)

    def modality_runs(self, processor: ProcessorMixin, token_ids: list[int], modality: str) -> list[tuple[int, int]]:
        tokenizer = processor.tokenizer
        starts = [i for i, tok in enumerate(token_ids) if tok == tokenizer.convert_tokens_to_ids("<|begin_of_video|>")]
        ends = [i for i, tok in enumerate(token_ids) if tok == tokenizer.convert_tokens_to_ids("<|end_of_video|>")]
        spans = list(zip(starts, ends, strict=True))  # the processor writes them in pairs

        def in_video(offset: int) -> bool:
            return any(start < offset < end for start, end in spans)

        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(tokenizer, modality))
        return [run for run in runs if in_video(run[0]) == (modality == VIDEO)]
