"""The towers in an NVIDIA Triton Inference Server, called over KServe v2 (HTTP).

HTTP, not gRPC: tritonclient's gRPC client needs protobuf < 7, the project's generated code
protobuf 7, and one process holds one protobuf. tritonclient[http] has no protobuf dependency;
with the binary tensor extension the tensors travel as raw bytes after a small JSON header, the
same bytes a gRPC request would carry. Co-located (--triton-transport shm), the inputs go through system
shared memory regions instead (one per worker, grown as needed) and only the outputs by HTTP.

At start the encoder waits for Triton (--triton-start-timeout-s) and checks each modality's model
(`<--triton-model>_<modality>`, written by `triptych export-triton`): present and ready, else
FAILED_PRECONDITION (TRITON_MODEL_MISSING); exported from this checkpoint, dtype and modality (its
config's parameters), else FAILED_PRECONDITION (TRITON_MODEL_MISMATCH). The encoder never loads
the weights itself. A Triton that stops answering makes calls fail with UNAVAILABLE
(TRITON_UNAVAILABLE); the worker's connection is dropped, so the first call after Triton is back
succeeds. The encoder's grpc.health follows `ready` (server.py): NOT_SERVING while Triton or a model
is down, so a processor's pool takes the replica out before its calls fail.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.config import EncoderConfig
from services.common.errors import FailedPrecondition, Internal, ResourceExhausted, Unavailable
from services.encoder.backends import triton_wire
from services.encoder.triton_export import model_name
from services.models.base import ItemEmbeddings
from services.models.checkpoint import DTYPES, Checkpoint

log = logging.getLogger(__name__)

# Triton's own errors that mean "not serving now" (restarting, model reloading), not a bad request.
_UNAVAILABLE_MESSAGES = ("unknown model", "is not ready", "unavailable", "server is stopping", "shutting down")


@dataclass
class _Region:
    """One worker's shared-memory region for its inputs, registered with Triton."""

    name: str
    handle: Any
    byte_size: int


class _Worker(threading.local):
    """A batcher thread's own HTTP connection (tritonclient's is not thread-safe) and region."""

    client: httpclient.InferenceServerClient | None = None
    region: _Region | None = None


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor of its own (the reply's buffer is read-only); BF16 comes as ml_dtypes' bfloat16, which torch
    takes by its 16-bit words."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


class TritonBackend:
    proto = encoder_pb2.ENCODER_BACKEND_TRITON
    model = None  # the weights live in Triton
    health_interval_s = 2.0  # the encoder's health follows Triton's models (server.py)

    def __init__(self, checkpoint: Checkpoint, cfg: EncoderConfig):
        self.url = cfg.triton_url
        self.workers = max(1, cfg.triton_workers)
        self.timeout_s = cfg.triton_timeout_s
        self.use_shm = cfg.triton_transport == "shm"
        self.family = checkpoint.family
        self.models = {modality: model_name(cfg.triton_model, modality) for modality in self.family.modalities}
        self.schemas = {modality: self.family.encoder_schema(modality) for modality in self.family.modalities}
        self._worker = _Worker()
        self._regions: list[_Region] = []  # every worker's, for close()
        self._lock = threading.Lock()
        self._check_models(checkpoint, cfg.triton_start_timeout_s)

    # ---- start ---------------------------------------------------------------------------
    def _new_client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(self.url, connection_timeout=min(10.0, self.timeout_s),
                                                network_timeout=self.timeout_s)

    def _check_models(self, checkpoint: Checkpoint, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self._wait_live(deadline)
        try:
            dtype = next(name for name, dtype in DTYPES.items() if dtype == checkpoint.dtype)
            for modality, name in self.models.items():
                self._wait_model(client, name, deadline)
                params = {key: value.get("string_value", "")
                          for key, value in client.get_model_config(name).get("parameters", {}).items()}
                expected = {"fingerprint": checkpoint.fingerprint, "dtype": dtype, "modality": modality}
                served = {key: params.get(key, "") for key in expected}
                if served != expected:
                    raise FailedPrecondition(
                        f"Triton model {name!r} at {self.url} was exported from {served}, this encoder serves "
                        f"{expected} ({checkpoint.path}); run `triptych export-triton --model {checkpoint.path}` "
                        "into Triton's repository, or start the encoder with the checkpoint Triton serves",
                        reason="TRITON_MODEL_MISMATCH",
                        metadata={"tritonModel": name, "expected": str(expected), "served": str(served)})
        finally:
            client.close()

    def _wait_live(self, deadline: float) -> httpclient.InferenceServerClient:
        while True:
            client = self._new_client()
            try:
                live = client.is_server_live()
            except Exception:  # noqa: BLE001 -- not listening yet
                live = False
            if live:
                return client
            client.close()
            if time.monotonic() > deadline:
                raise Unavailable(f"Triton at {self.url} did not answer (KServe v2 /v2/health/live) within the "
                                  "start timeout; start Triton, or check --triton-url", reason="TRITON_UNAVAILABLE",
                                  metadata={"tritonUrl": self.url})
            time.sleep(0.5)

    def _wait_model(self, client: httpclient.InferenceServerClient, name: str, deadline: float) -> None:
        while not client.is_model_ready(name):
            index = {entry["name"]: entry for entry in client.get_model_repository_index()}
            entry = index.get(name)
            state = entry.get("state", "") if entry else ""
            if entry is None or (state == "UNAVAILABLE" and entry.get("reason")) or time.monotonic() > deadline:
                why = (f"not in its model repository (it has {sorted(index) or 'none'})" if entry is None
                       else f"{state or 'not ready'}: {entry.get('reason') or 'still loading at the start timeout'}")
                raise FailedPrecondition(
                    f"Triton at {self.url} does not serve model {name!r}: {why}. Write it with `triptych "
                    "export-triton` into Triton's model repository, or pass the --triton-model it was exported "
                    "under", reason="TRITON_MODEL_MISSING", metadata={"tritonUrl": self.url, "tritonModel": name})
            time.sleep(0.5)

    # ---- calls (batcher threads) -----------------------------------------------------------
    def run(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        name = self.models[modality]
        tensors = triton_wire.pack_items(self.schemas[modality], items)
        outputs = [httpclient.InferRequestedOutput(out, binary_data=True)
                   for out in (triton_wire.EMBEDDINGS, triton_wire.EMBEDDING_ROWS)]
        if self.family.num_deepstack_layers:
            outputs.append(httpclient.InferRequestedOutput(triton_wire.DEEPSTACK, binary_data=True))
        worker = self._worker
        for attempt in (1, 2):
            if worker.client is None:
                worker.client = self._new_client()
            try:
                result = worker.client.infer(name, self._inputs(worker, tensors), outputs=outputs)
                break
            except InferenceServerException as err:
                # A Triton restarted since this worker registered its region no longer knows it: register anew.
                if attempt == 1 and self.use_shm and "shared memory" in (err.message() or "").lower():
                    self._drop(worker)
                    continue
                raise self._status(name, err) from err
            except Exception as err:  # the connection: refused, reset, timed out
                self._drop(worker)
                raise Unavailable(f"Triton at {self.url} did not answer ({type(err).__name__}: {err}); retry when "
                                  "it is back", reason="TRITON_UNAVAILABLE", metadata={"tritonUrl": self.url}) from err
        results = triton_wire.unpack_embeddings({out.name(): _as_torch(result.as_numpy(out.name())) for out in outputs})
        if len(results) != len(items):
            raise Internal(f"Triton model {name!r} answered {len(results)} items for {len(items)}",
                           reason="TRITON_INFER_FAILED", metadata={"tritonModel": name})
        return results

    def _inputs(self, worker: _Worker, tensors: dict[str, torch.Tensor]) -> list[httpclient.InferInput]:
        arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
        inputs = {name: httpclient.InferInput(name, list(array.shape), triton_wire.TRITON_TYPES[tensors[name].dtype][1])
                  for name, array in arrays.items()}
        if not self.use_shm:
            for name, array in arrays.items():
                inputs[name].set_data_from_numpy(array, binary_data=True)
            return list(inputs.values())
        region = self._region(worker, sum(array.nbytes for array in arrays.values()))
        system_shm.set_shared_memory_region(region.handle, list(arrays.values()))
        offset = 0
        for name, array in arrays.items():
            inputs[name].set_shared_memory(region.name, array.nbytes, offset)
            offset += array.nbytes
        return list(inputs.values())

    def _region(self, worker: _Worker, byte_size: int) -> _Region:
        """The worker's region, made (or remade twice as large) to hold `byte_size` bytes."""
        region = worker.region
        if region is not None and region.byte_size >= byte_size:
            return region
        if region is not None:
            self._free(worker.client, region)
        size = max(1 << 20, 1 << (byte_size - 1).bit_length())
        name = f"triptych-{uuid.uuid4().hex[:12]}"
        handle = system_shm.create_shared_memory_region(name, "/" + name, size)
        worker.region = _Region(name, handle, size)
        with self._lock:
            self._regions.append(worker.region)
        worker.client.register_system_shared_memory(name, "/" + name, size)
        return worker.region

    def _free(self, client: httpclient.InferenceServerClient | None, region: _Region) -> None:
        with self._lock:
            self._regions = [r for r in self._regions if r is not region]
        try:
            if client is not None:
                client.unregister_system_shared_memory(region.name)
        except Exception as err:  # noqa: BLE001 -- Triton gone: its registration went with it
            log.debug("unregistering %s from Triton: %s", region.name, err)
        system_shm.destroy_shared_memory_region(region.handle)

    def _drop(self, worker: _Worker) -> None:
        """Forgets the worker's connection (and region: a restarted Triton knows neither)."""
        if worker.region is not None:
            self._free(worker.client, worker.region)
            worker.region = None
        if worker.client is not None:
            worker.client.close()
            worker.client = None

    def _status(self, name: str, err: InferenceServerException) -> Exception:
        message = err.message() or str(err)
        if "out of memory" in message:
            return ResourceExhausted(f"Triton model {name!r} ran out of memory: {message}; retry later or send fewer "
                                     "or smaller items", reason="ENCODER_OUT_OF_MEMORY")
        if any(text in message.lower() for text in _UNAVAILABLE_MESSAGES):
            self._drop(self._worker)
            return Unavailable(f"Triton at {self.url} does not serve {name!r} now: {message}",
                               reason="TRITON_UNAVAILABLE", metadata={"tritonUrl": self.url})
        return Internal(f"Triton model {name!r} failed: {message}", reason="TRITON_INFER_FAILED",
                        metadata={"tritonModel": name})

    def ready(self) -> bool:
        """Whether Triton answers and every model the encoder needs is ready (a client of its own: this runs
        in whatever thread asks)."""
        client = httpclient.InferenceServerClient(self.url, connection_timeout=2.0, network_timeout=2.0)
        try:
            return all(client.is_model_ready(name) for name in self.models.values())
        except Exception:  # noqa: BLE001 -- refused, reset, timed out: not ready
            return False
        finally:
            client.close()

    def close(self) -> None:
        """Unregisters and frees every worker's region (a client of this thread: one is not shared across threads)."""
        with self._lock:
            regions = list(self._regions)
        if not regions:
            return
        client = self._new_client()
        try:
            for region in regions:
                self._free(client, region)
        finally:
            client.close()
