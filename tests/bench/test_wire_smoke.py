"""bench/wire.py runs (tiny checkpoint, one image per format, a real encoder process) and its figures hold
what the issue asks of media mode: the item is the file plus a few bytes (goal <= 1.1x), tensors far more."""

from __future__ import annotations

import pytest

from bench.wire import FORMATS, MODES, EncoderProcess, measure_wire
from tests.checkpoints import tiny_checkpoint


@pytest.mark.e2e
def test_wire_smoke():
    model_dir = tiny_checkpoint("qwen2_vl")
    with EncoderProcess(model_dir, torch_threads=1) as encoder:
        results = measure_wire(model_dir, encoder.address, images=1, px=448, warmup=0)
    by_key = {(r.format, r.mode): r for r in results}
    assert set(by_key) == {(f, m) for f in FORMATS for m in MODES}
    for fmt in FORMATS:
        media, tensors = by_key[fmt, "media"], by_key[fmt, "tensors"]
        assert media.file_bytes == tensors.file_bytes > 0
        assert media.file_bytes < media.item_bytes <= media.file_bytes + 200  # mm_hash, modality, framing
        assert media.ratio_to_file <= 1.1 < tensors.ratio_to_file
        assert all(r.encode_call_ms > 0 and r.prepare_ms > 0 for r in (media, tensors))
