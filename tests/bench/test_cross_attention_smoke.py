"""bench/cross_attention.py runs (tiny mllama, in process) and its figures are the contract's sizes."""

from __future__ import annotations

from bench.cross_attention import computed, measure
from tests.checkpoints import tiny_checkpoint


def test_cross_attention_smoke():
    result = measure(tiny_checkpoint("mllama"), reps=2, batch=2)
    assert result["rows_per_image"] == 4 * 17 and result["hidden"] == 64  # 4 tiles x (16 patches + CLS)
    assert result["states_bytes_per_image_fp32"] == 4 * 17 * 64 * 4
    assert set(result["decode_ms_per_step"]) == {f"{n}_images_batch_{b}" for n in (0, 1, 2) for b in (1, 2)}
    assert all(ms > 0 for ms in result["decode_ms_per_step"].values())
    big = computed()  # Llama-3.2-11B-Vision, bf16: 4 tiles of 40x40 patches + CLS, hidden 4096
    assert big["rows_per_image"] == 6404 and big["states_bytes_per_image"] == 6404 * 4096 * 2
