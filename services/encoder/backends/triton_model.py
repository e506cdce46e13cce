"""The Triton Python-backend model that `triptych export-triton` writes as `<model>/1/model.py`.

It runs inside Triton's Python backend stub, beside a copy of the exporting `services` package
(`1/triptych/`), so the tower code is the exporter's: the checkpoint folder loaded by the family's
own load_model + strip_for_encoder (towers.load_towers), items cut out of each request
(triton_wire.py) and encoded by `family.encode` -- the torch backend's calls, so the same bytes.

Triton's dynamic batcher hands `execute` several requests at once (ragged batching). A family whose
embeddings are bitwise the same in any batch (`encoder_batching == "exact"`) encodes all of them in
one forward; any other family encodes each request (one unit) by itself, as the torch backend would.

Tensors cross into and out of the stub by DLPack (torch), not numpy: with numpy 2 this stub
(Triton 2.51) sends empty outputs for `pb_utils.Tensor(name, ndarray)`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "triptych"))  # the exporter's services package

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from services.common.config import torch_threads
from services.encoder.backends import triton_wire
from services.encoder.towers import is_out_of_memory, load_towers
from services.models.checkpoint import DTYPES, Checkpoint

log = logging.getLogger("triptych.triton")


class TritonPythonModel:
    """One modality's tower of one checkpoint, one instance per Triton model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.modality = params["modality"]
        checkpoint = Checkpoint(Path(params["checkpoint"]), DTYPES[params["dtype"]])
        if checkpoint.fingerprint != params["fingerprint"]:  # the folder changed since the export
            raise pb_utils.TritonModelException(
                f"{params['checkpoint']} has fingerprint {checkpoint.fingerprint}, the model was exported from "
                f"{params['fingerprint']}; run `triptych export-triton` again")
        self.family = checkpoint.family
        self.schema = self.family.encoder_schema(self.modality)
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        torch.set_num_threads(torch_threads(int(params.get("torch_threads", "0"))))
        self.model = load_towers(checkpoint, device)

    def execute(self, requests: list) -> list:
        units: list[list[dict[str, torch.Tensor]] | Exception] = []
        for request in requests:
            try:
                inputs = {tensor.name: torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, tensor.name).to_dlpack())
                          for tensor in triton_wire.input_tensors(self.schema)}
                units.append(triton_wire.unpack_items(self.schema, inputs))
            except Exception as err:  # noqa: BLE001 -- a malformed request fails alone
                units.append(err)
        results: list[list | Exception] = list(units)
        good = [i for i, unit in enumerate(units) if not isinstance(unit, Exception)]
        # "exact": any batch gives each item the same bytes, so the batch Triton formed is one forward.
        groups = [good] if self.family.encoder_batching == "exact" and good else [[i] for i in good]
        for group in groups:
            items = [item for i in group for item in units[i]]  # type: ignore[union-attr]
            try:
                out = self.family.encode(self.model, self.modality, items)
            except Exception as err:
                log.exception("encoding %d %s items failed", len(items), self.modality)
                for i in group:
                    results[i] = err
                continue
            start = 0
            for i in group:
                count = len(units[i])  # type: ignore[arg-type]
                results[i] = out[start:start + count]
                start += count
        return [self._response(result) for result in results]

    def _response(self, result: list | Exception):
        if isinstance(result, Exception):
            # The encoder reads "out of memory" in the message as RESOURCE_EXHAUSTED, anything else as INTERNAL.
            kind = "out of memory" if is_out_of_memory(result) else "failed"
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{self.family.name} {self.modality} tower {kind}: {type(result).__name__}: {result}"))
        tensors = [pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.cpu().contiguous()))
                   for name, tensor in triton_wire.pack_embeddings(result).items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.model = None
