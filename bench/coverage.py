"""The coverage sweep: every image-text-to-text architecture of transformers, served token-exact or refused.

For each key of transformers' MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
  1. a tiny random checkpoint, offline: the model type's own tiny builder when this package has one
     (services/tiny_checkpoints/<model type>.py, or the registry family's builder when it writes this
     model type), else services/tiny_checkpoints/auto.py from the architecture's own config class;
  2. the serving path as the services resolve it (services/models/registry.py family_for: a family
     file, the generic family when its can_serve says so, or a refusal with its reason);
  3. when served: the three services in this process (tests/inproc.py) against transformers run whole
     (tests/reference.py), greedy float32, MAX_NEW_TOKENS tokens, for text only, one image and two
     images; a case transformers itself cannot run (a model that takes one image) is skipped.

    python bench/coverage.py                 # the sweep; writes docs/coverage.md and docs/coverage.json
    python bench/coverage.py --only aria,smolvlm --no-write

Checkpoints go to build/coverage-models (or --models), built once; delete the folder to rebuild.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from services.coverage import RESULTS_JSON, Coverage, Row, load, write_markdown

MODELS_DIR = ROOT / "build" / "coverage-models"
MAX_NEW_TOKENS = 6
CASES = {
    "text-only": ("Tell me a story about the sea.", ()),
    "one-image": ("Describe this image.", ((160, 120, 1, "noise"),)),
    "two-images": ("Compare the two pictures.", ((96, 96, 5, "noise"), (128, 64, 6, "gradient"))),
}


@dataclass
class Outcome:
    """One architecture's sweep outcome, before it becomes a Row."""

    path: str = "refused"
    result: str = "refused"
    reason: str = ""
    cases: dict[str, str] = field(default_factory=dict)
    builder: str = ""
    seconds: float = 0.0


def _distill(err: BaseException) -> str:
    """An exception as a one-line reason: its class and message, the checkpoint folder and the
    registry's preamble taken out (the row already names the architecture)."""
    message = getattr(err, "message", None) or str(err)
    message = re.sub(r"/\S*/[\w\-.]+?-(small|default)-images\b:?\s*", "", message)  # the checkpoint folder
    message = re.sub(r"/\S*/[\w\-.]+:\s", "", message)
    message = re.sub(r"no family file claims \w+, and the generic family cannot serve it exactly: ", "", message)
    message = " ".join(message.split())
    name = type(err).__name__
    kind = "" if name in ("FailedPrecondition", "BuildError") else f"{name}: "
    return (kind + message)[:400]


def _builder_for(model_type: str, architecture: str) -> str | None:
    """This package's own tiny builder for the model type (by name, or the registry family's that writes it)."""
    from services.models.registry import ARCHITECTURES
    from services.tiny_checkpoints import TINY_FAMILIES

    if model_type in TINY_FAMILIES:
        return model_type
    family = ARCHITECTURES.get(architecture, ("",))[0]
    return family if family in TINY_FAMILIES else None


def _why_not_served(model_type: str, out: Path) -> str:
    """A specific reason for a model type no family file claims and the generic family does not judge
    (not an image-text-to-text model with get_image_features): read from its classes, not a list."""
    import inspect

    from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig

    config = AutoConfig.for_model(model_type)
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING.get(type(config), None)
    if model_class is None:
        return "no model class in transformers' image-text-to-text mapping for its config"
    name = model_class.__name__
    source = inspect.getsource(inspect.getmodule(model_class))
    if getattr(config, "is_encoder_decoder", False) or "EncoderDecoder" in name or "encoder_outputs" in \
            inspect.signature(model_class.forward).parameters:
        return f"encoder-decoder model ({name}): the decoder cross-attends to the encoder's states"
    if "cross_attention_states" in source or "cross_attention_layers" in source:
        return f"image features enter through cross-attention layers ({name})"
    if "trust_remote_code" in source and "auto_map" in source:
        return "needs remote code"
    if not hasattr(model_class, "get_image_features"):
        if any(n in name for n in ("Diffusion", "Protein", "PI0")):
            return f"not a text-generation head: {name}"
        for marker, why in (("image_embeds_position_mask", "image positions come from an embeds position mask"),
                            ("image_patches_indices", "image patches enter as raw patch embeddings by index"),
                            ("qformer", "images pass a Q-Former whose queries prefix the prompt"),
                            ("vqmodel", "images are tokenized by a VQ model into discrete tokens"),
                            ("get_placeholder_mask", "")):
            if marker in source.lower() and why:
                return f"{why}; {name} has no get_image_features"
        return f"{name} has no get_image_features: images are merged inside its forward"
    try:
        AutoConfig.from_pretrained(out)
    except Exception as err:  # noqa: BLE001 -- the generic family cannot read the config: why
        return f"the tiny config does not load back: {_distill(err)}"
    return f"{name} is not served by any family and the generic family does not judge it"


def _own_build(model_type: str, architecture: str, models_dir: Path) -> tuple[str, Path] | None:
    """The checkpoint by this package's own builder for the model type, if it has one that writes it."""
    from services.tiny_checkpoints import make_model

    builder = _builder_for(model_type, architecture)
    if builder is None:
        return None
    out = models_dir / builder
    if not (out / "config.json").exists():
        make_model(builder, out)
    if json.loads((out / "config.json").read_text()).get("model_type") != model_type and builder != model_type:
        return None  # the family's builder writes another model type (shieldgemma2 -> gemma3): build this one
    return builder, out


def _auto_build(model_type: str, variant: str, models_dir: Path) -> Path:
    from services.tiny_checkpoints import auto

    out = models_dir / f"{model_type}-{variant}"
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        auto.build(model_type, out, variant=variant)
    return out


def _hf_runs(model_dir: Path) -> str | None:
    """None when transformers generates on one image with the checkpoint; else why not (remembered in the folder)."""
    from tests.media import image_bytes
    from tests.reference import hf_generate

    marker = model_dir / ".hf-check"
    if not marker.exists():
        prompt, specs = CASES["one-image"]
        try:
            hf_generate(model_dir, prompt, [image_bytes(w, h, seed=s, kind=k) for w, h, s, k in specs], 1)
            marker.write_text("")
        except Exception as err:  # noqa: BLE001 -- the reason is the exception
            marker.write_text(_distill(err))
    return marker.read_text() or None


def _generate(address: str, prompt: str, images: list[bytes]) -> list[int]:
    from services.client import build_messages
    from services.common.api.triptych.common.v1 import generation_pb2
    from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return list(processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion.token_ids)


def _parity(model_dir: Path) -> dict[str, str]:
    """Each case: exact, mismatch (with both token lists), skipped (transformers cannot run it) or error."""
    from tests.inproc import InProcessServices
    from tests.media import image_bytes
    from tests.reference import hf_generate

    results: dict[str, str] = {}
    services = InProcessServices(model_dir)
    try:
        for case, (prompt, specs) in CASES.items():
            images = [image_bytes(w, h, seed=seed, kind=kind) for w, h, seed, kind in specs]
            try:
                expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS)
            except Exception as err:  # noqa: BLE001 -- transformers cannot run the case: not ours to prove
                results[case] = f"skipped: transformers fails: {_distill(err)[:160]}"
                continue
            try:
                got = _generate(services.address, prompt, images)
            except grpc.RpcError as err:
                results[case] = f"error: {err.code().name}: {err.details()[:200]}"
                continue
            results[case] = "exact" if got == expected else f"mismatch: {got} vs transformers {expected}"
    finally:
        services.stop()
    return results


def _resolve(out: Path, outcome: Outcome, model_type: str):
    """The family serving the folder, or None with the refusal in `outcome`."""
    from services.models.registry import family_for

    try:
        family = family_for(out)
    except Exception as err:  # noqa: BLE001 -- FAILED_PRECONDITION with the registry's reason, or another failure
        message = _distill(err)
        outcome.path, outcome.result = "refused", "refused"
        outcome.reason = _why_not_served(model_type, out) if "are not supported (supported:" in message \
            else message
        return None
    outcome.path = family.name
    return family


def checkpoint_for(model_type: str, architecture: str, models_dir: Path, outcome: Outcome) -> Path | None:
    """The tiny checkpoint the sweep proves (or refuses) the architecture with; None with the reason in
    `outcome` when none can be built. The family's own builder if any; else auto.py's first variant
    that the registry refuses (nothing to prove) or that transformers runs on an image."""
    from services.tiny_checkpoints.auto import VARIANTS

    try:
        own = _own_build(model_type, architecture, models_dir)
    except Exception as err:  # noqa: BLE001
        outcome.reason = f"tiny checkpoint cannot be built offline: {_distill(err)}"
        return None
    if own is not None:
        outcome.builder = own[0]
        _resolve(own[1], outcome, model_type)
        return own[1]
    failures = []
    for variant in VARIANTS:
        outcome.builder = f"auto:{variant}"
        out = models_dir / f"{model_type}-{variant}"
        try:
            _auto_build(model_type, variant, models_dir)
        except Exception as err:  # noqa: BLE001
            failures.append(f"cannot be built offline: {_distill(err)}")
            # A model the registry refuses from its config alone is refused for that, not for the build.
            if (out / "config.json").exists() and _resolve(out, outcome, model_type) is None \
                    and "processor" not in outcome.reason:
                return None
            shutil.rmtree(out, ignore_errors=True)
            continue
        if _resolve(out, outcome, model_type) is None:
            return out
        why = _hf_runs(out)
        if why is None:
            return out
        failures.append(f"inconsistent ({variant}: transformers fails on one image: {why})")
    outcome.path, outcome.result = "refused", "refused"
    outcome.reason = f"tiny checkpoint {failures[0]}" + (f" (and {len(failures) - 1} other sizings)" if len(failures) > 1 else "")
    return None


def sweep_one(model_type: str, architecture: str, models_dir: Path, parity: bool = True) -> Outcome:
    outcome = Outcome()
    start = time.monotonic()
    try:
        out = checkpoint_for(model_type, architecture, models_dir, outcome)
        if out is None or outcome.path == "refused" or not parity:
            return outcome
        outcome.cases = _parity(out)
    except Exception as err:  # noqa: BLE001 -- served but failing: a bug, recorded with its exception
        outcome.result, outcome.reason = "error", _distill(err)
        log.debug("%s", traceback.format_exc())
        return outcome
    finally:
        outcome.seconds = round(time.monotonic() - start, 1)
    bad = {case: r for case, r in outcome.cases.items() if not r.startswith(("exact", "skipped"))}
    if not bad and not outcome.cases["one-image"].startswith("exact"):
        bad["one-image"] = outcome.cases["one-image"]
    if bad:
        outcome.result = "mismatch" if any(r.startswith("mismatch") for r in bad.values()) else "error"
        outcome.reason = "; ".join(f"{case}: {r}" for case, r in bad.items())[:400]
    else:
        outcome.result = "exact"
        skipped = [case for case, r in outcome.cases.items() if r.startswith("skipped")]
        outcome.reason = f"{', '.join(skipped)} not run: transformers cannot" if skipped else ""
    return outcome


log = logging.getLogger("coverage")


def run(only: list[str] | None, models_dir: Path) -> Coverage:
    rows = []
    start = time.monotonic()
    for model_type, architecture in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        if only and model_type not in only:
            continue
        outcome = sweep_one(model_type, architecture, models_dir)
        row = Row(model_type, architecture, outcome.path, outcome.result, outcome.reason, outcome.builder)
        rows.append(row)
        print(f"{model_type:<24} {row.path:<16} {row.result:<9} {outcome.seconds:>6.1f}s {row.reason[:150]}", flush=True)
        for case, result in outcome.cases.items():
            if not result.startswith("exact"):
                print(f"    {case}: {result[:300]}", flush=True)
    return Coverage(rows=rows, seconds=round(time.monotonic() - start, 1))


def differences(recorded: Coverage, models_dir: Path, parity_for: frozenset[str]) -> list[str]:
    """Where the sweep now disagrees with the record: for every architecture the path it resolves (and
    the reason it is refused); for those in `parity_for` the parity result too. Empty: the record holds."""
    found = []
    for row in recorded.rows:
        outcome = sweep_one(row.model_type, row.architecture, models_dir, parity=row.model_type in parity_for)
        if outcome.path != row.path or (row.path == "refused" and outcome.reason != row.reason):
            found.append(f"{row.model_type}: recorded {row.path} ({row.reason!r}), now {outcome.path} ({outcome.reason!r})")
        elif row.model_type in parity_for and outcome.result != row.result:
            found.append(f"{row.model_type}: recorded {row.result}, now {outcome.result}: {outcome.reason}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model types (keys of the mapping)")
    parser.add_argument("--models", type=Path, default=MODELS_DIR, help="where the tiny checkpoints are built")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/coverage.* as they are")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    only = [m for m in args.only.split(",") if m]
    coverage = run(only, args.models)
    recorded = load()
    if only and recorded is not None:  # those rows replaced in the record; the full sweep's time kept
        fresh = {row.model_type: row for row in coverage.rows}
        coverage = Coverage(rows=[fresh.get(row.model_type, row) for row in recorded.rows], seconds=recorded.seconds)
    print(coverage.summary())
    if not args.no_write:
        RESULTS_JSON.write_text(json.dumps(coverage.to_json(), indent=1) + "\n")
        write_markdown(coverage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
