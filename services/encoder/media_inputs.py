"""Media-mode items: compressed bytes in, the family's encoder inputs out, as the processor would send them.

In media mode (`triptych serve processor --encoder-input media`) the processor sends an image's file
bytes instead of the HF processor's float32 patches (about the file's size instead of 4.8 MB for a
448x448 image on the bench model). The encoder then does here what the processor would have done:
decode with the shared code and its own limits (services/common/media.py), and run the checkpoint's
HF processor through the family's own path (`ModelFamily.image_encoder_inputs`), so the tensors,
and the embeddings, are bitwise those of tensor mode. CPU work: the servicer runs it on its parse
threads, never on the event loop or the torch thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.errors import InvalidArgument
from services.common.media import MediaLimits, check_media_size, decode_image
from services.models.base import IMAGE, ModelFamily


class MediaInputs:
    """The encoder's copy of the processor's media path: one per encoder, shared by its parse threads."""

    def __init__(self, family: ModelFamily, model_dir: Path, limits: MediaLimits):
        self.family = family
        self.limits = limits
        # The checkpoint's own processor, loaded as the processor service loads it (same backend, same config).
        self.processor = family.load_processor(model_dir)

    def encoder_inputs(self, item: encoder_pb2.MediaItem, modality: str, where: str) -> dict[str, torch.Tensor]:
        """The item's encoder inputs from its `media`; the caller checks them against the schema."""
        if item.tensors:
            raise InvalidArgument(f"{where}: set either tensors or media, not both (no tensors: the encoder "
                                  "processes the media itself)", reason="MEDIA_ITEM_INPUTS_CONFLICT")
        if modality != IMAGE:
            raise InvalidArgument(f"{where}: the encoder processes only images from compressed media, not "
                                  f"{modality}; send its tensors", reason="MEDIA_MODALITY_UNSUPPORTED")
        where = f"{where}.media"
        image = decode_image(check_media_size(item.media.data, self.limits, where), self.limits, where)
        try:
            return self.family.image_encoder_inputs(self.processor, image)
        except (ValueError, ArithmeticError) as err:  # the HF processor rejecting input, as in the processor service
            raise InvalidArgument(f"{where}: the model's processor rejected the image: {err}",
                                  reason="PROCESSOR_REJECTED") from err
