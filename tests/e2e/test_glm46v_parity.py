"""GLM-4.6V: the three services (separate processes) give transformers' greedy tokens (images, video and
text; mRoPE on the rotary half of each head, computed by the model's own get_rope_index).

transformers' `glmga` model type builds the same class (its config, GlmgaConfig, has the same fields),
so a glmga checkpoint is this family's too.
"""

from __future__ import annotations

import json
import shutil

from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("glm46v")
test_parity = parity_tests("glm46v")
test_model_info = model_info_test("glm46v")
# GLM-4.6V's own frame sampler (its rate from the clip's length) and timestamps ("1.5 seconds").
test_video_parity = media_parity_tests("glm46v", {case: VIDEO_CASES[case] for case in ("video", "video-other")})


def test_a_glmga_checkpoint_is_served_by_this_family(tmp_path):
    model_dir = shutil.copytree(tiny_checkpoint("glm46v"), tmp_path / "glmga")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "glmga"}))
    family = family_for(model_dir)
    assert family.name == "glm46v"
    assert type(family.config).__name__ == "GlmgaConfig"
