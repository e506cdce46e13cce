"""GLM-4.6V: the three services (separate processes) give transformers' greedy tokens (images and text;
mRoPE on the rotary half of each head, computed by the model's own get_rope_index).

transformers' `glmga` model type builds the same class (its config, GlmgaConfig, has the same fields),
so a glmga checkpoint is this family's too.
"""

from __future__ import annotations

import json
import shutil

from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import family_services, model_info_test, parity_tests

services = family_services("glm46v")
test_parity = parity_tests("glm46v")
test_model_info = model_info_test("glm46v")


def test_a_glmga_checkpoint_is_served_by_this_family(tmp_path):
    model_dir = shutil.copytree(tiny_checkpoint("glm46v"), tmp_path / "glmga")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "glmga"}))
    family = family_for(model_dir)
    assert family.name == "glm46v"
    assert type(family.config).__name__ == "GlmgaConfig"
