"""`triptych export-triton`: a Triton model repository that serves a checkpoint's towers.

One model per tower modality, named `<name>_<modality>` (the encoder's --triton-model is `<name>`):

    REPO/<name>_image/config.pbtxt     typed inputs/outputs from the family's encoder_schema
    REPO/<name>_image/1/model.py       services/encoder/backends/triton_model.py
    REPO/<name>_image/1/triptych/      a copy of this `services` package: Triton runs the exporter's code

Batching: variable-size items (Qwen patches, InternVL tiles, Phi-4-MM crops) cannot share a dense
batch without padding, and padding changes what the tower computes. So max_batch_size > 0 with
ragged batching: every input has `allow_ragged_batch`, each request is one unit with a batch dim of
1, and the dynamic batcher hands the Python model several requests at once, which it encodes
together only where the family's batch does not change the bytes (triton_model.py). With
max_batch_size 0 Triton would never batch (measured: one request per execute). The checkpoint's
fingerprint and dtype are parameters of the config, checked by the encoder at start.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.config import DType

if TYPE_CHECKING:  # torch-heavy: imported where used, so `triptych --help` stays quick
    from services.models.checkpoint import Checkpoint

SERVICES_DIR = Path(__file__).resolve().parent.parent
MODEL_PY = Path(__file__).resolve().parent / "backends" / "triton_model.py"


@dataclass(frozen=True)
class ExportOptions:
    name: str = "triptych"  # models are <name>_<modality>
    max_batch_size: int = 8  # requests (units) the dynamic batcher hands one execute
    instances: int = 1  # model instances (processes) per modality
    instance_kind: str = "cpu"  # cpu or gpu
    max_queue_delay_us: int = 0  # how long the dynamic batcher waits for more requests
    checkpoint_path: Path | None = None  # where Triton reads the checkpoint; default the exported folder
    torch_threads: int = 0  # per instance; 0: half the cores of Triton's host


def model_name(name: str, modality: str) -> str:
    return f"{name}_{modality}"


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def config_pbtxt(checkpoint: Checkpoint, modality: str, options: ExportOptions) -> str:
    from services.common.errors import FailedPrecondition
    from services.encoder.backends import triton_wire
    from services.models.checkpoint import DTYPES

    family = checkpoint.family
    try:
        schema = family.encoder_schema(modality)
    except (NotImplementedError, ValueError, KeyError) as err:
        raise FailedPrecondition(f"{family.name} declares no encoder inputs for {modality} ({err}): nothing to "
                                 "type a Triton model with", reason="TRITON_EXPORT_UNSUPPORTED") from err
    if checkpoint.dtype not in triton_wire.TRITON_TYPES:
        raise FailedPrecondition(f"embeddings of dtype {checkpoint.dtype} have no Triton type",
                                 reason="TRITON_EXPORT_UNSUPPORTED")
    out_type = triton_wire.TRITON_TYPES[checkpoint.dtype][0]
    inputs = [f'  {{ name: "{t.name}" data_type: {triton_wire.TRITON_TYPES[t.dtype][0]} dims: {_dims(t.dims)} '
              'allow_ragged_batch: true }' for t in triton_wire.input_tensors(schema)]
    hidden = family.hidden_size
    outputs = [f'  {{ name: "{triton_wire.EMBEDDINGS}" data_type: {out_type} dims: [ -1, {hidden} ] }}',
               f'  {{ name: "{triton_wire.EMBEDDING_ROWS}" data_type: TYPE_INT64 dims: [ -1 ] }}']
    if family.num_deepstack_layers:
        outputs.append(f'  {{ name: "{triton_wire.DEEPSTACK}" data_type: {out_type} '
                       f'dims: [ {family.num_deepstack_layers}, -1, {hidden} ] }}')
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == checkpoint.dtype)
    params = {"checkpoint": str(options.checkpoint_path or checkpoint.path.resolve()),
              "fingerprint": checkpoint.fingerprint, "dtype": dtype_name, "modality": modality,
              "family": family.name, "torch_threads": str(options.torch_threads)}
    parameters = "\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }},' for k, v in params.items())
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[options.instance_kind]
    newline = ",\n"
    return f"""# Written by `triptych export-triton` from {checkpoint.path.name} ({family.name}, {dtype_name}).
name: "{model_name(options.name, modality)}"
backend: "python"
max_batch_size: {options.max_batch_size}
input [
{newline.join(inputs)}
]
output [
{newline.join(outputs)}
]
dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}
instance_group [ {{ kind: {kind} count: {options.instances} }} ]
parameters [
{parameters.rstrip(",")}
]
"""


def export(checkpoint: Checkpoint, out: Path, options: ExportOptions) -> list[Path]:
    """Writes one model folder per modality into `out` (replacing those of the same names); their paths."""
    from services.common.errors import FailedPrecondition

    if options.max_batch_size < 1:
        raise FailedPrecondition("--max-batch-size must be at least 1: Triton batches only models with "
                                 "max_batch_size > 0", reason="TRITON_EXPORT_UNSUPPORTED")
    configs = {modality: config_pbtxt(checkpoint, modality, options) for modality in checkpoint.family.modalities}
    written: list[Path] = []
    for modality, config in configs.items():
        folder = out / model_name(options.name, modality)
        if folder.exists():
            shutil.rmtree(folder)
        version = folder / "1"
        shutil.copytree(SERVICES_DIR, version / "triptych" / "services",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copyfile(MODEL_PY, version / "model.py")
        (folder / "config.pbtxt").write_text(config)
        written.append(folder)
    return written


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """`triptych export-triton`'s flags (an offline command, not a service: no config dataclass)."""
    defaults = ExportOptions()
    p.add_argument("--model", type=Path, required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="the Triton model repository (created if absent)")
    p.add_argument("--name", default=defaults.name, help="models are NAME_<modality>; the encoder's --triton-model")
    p.add_argument("--dtype", default="float32", choices=typing.get_args(DType),
                   help="weights and embeddings dtype; the encoder's --dtype")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="requests Triton's dynamic batcher hands the model at once")
    p.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us,
                   help="how long the dynamic batcher waits for more requests, microseconds")
    p.add_argument("--instances", type=int, default=defaults.instances, help="model instances (processes) per modality")
    p.add_argument("--instance-kind", default=defaults.instance_kind, choices=["cpu", "gpu"], help="where instances run")
    p.add_argument("--checkpoint-path", type=Path,
                   help="the checkpoint folder as Triton sees it (e.g. a container's mount); default --model")
    p.add_argument("--torch-threads", type=int, default=defaults.torch_threads,
                   help="torch CPU threads per instance; 0: half the cores")


def run_export(args: argparse.Namespace) -> int:
    """The command: prints each model folder written; a refusal goes to stderr (exit 2)."""
    from services.common.errors import TriptychError
    from services.models.checkpoint import DTYPES, Checkpoint

    options = ExportOptions(name=args.name, max_batch_size=args.max_batch_size, instances=args.instances,
                            instance_kind=args.instance_kind, max_queue_delay_us=args.max_queue_delay_us,
                            checkpoint_path=args.checkpoint_path, torch_threads=args.torch_threads)
    try:
        for folder in export(Checkpoint(args.model.resolve(), DTYPES[args.dtype]), args.out, options):
            print(folder)
    except TriptychError as err:
        print(f"error: export-triton: [{err.reason}] {err.message}", file=sys.stderr)
        return 2
    return 0
