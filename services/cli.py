"""The `triptych` command: models, make-model, serve, up, generate, export-triton.

An error prints one line, `error: ...`, and exits non-zero; `--debug` (or TRIPTYCH_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

from services.common.config import (DEFAULT_PROCESSOR_PORT, ClientConfig, EncoderConfig, FrontConfig, LlmConfig,
                                     ProcessorConfig)
from services.common.flags import add_config_flags, config_from_args
from services.encoder.triton_export import add_export_flags

SERVICE_CONFIGS: dict[str, type] = {"encoder": EncoderConfig, "llm": LlmConfig, "processor": ProcessorConfig,
                                    "front": FrontConfig}
SERVICE_HELP = {"front": "run the OpenAI-compatible HTTP front over a processor"}
# `up` wires the processor to the encoder and LLM it starts itself, and the front to the processor.
UP_SKIPS = frozenset({"encoder_addrs", "llm_addr", "processor_addr"})


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (subcommands' parsers are of this class as well)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")




def _media_arg(kind: str, value: str) -> tuple[str, Path]:
    return kind, Path(value)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="triptych", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show an error's traceback (also TRIPTYCH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model families, their modalities and how each is served, then "
                                      "every image-text-to-text architecture of transformers as the coverage sweep "
                                      "recorded it (docs/coverage.md)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--architectures", action="store_true",
                   help="only the architectures (with --json: the recorded rows of docs/coverage.json)")

    p = sub.add_parser("make-model", help="write a tiny random checkpoint folder (offline)")
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])

    serve = sub.add_parser("serve", help="run one service").add_subparsers(dest="service", required=True)
    for name, config_cls in SERVICE_CONFIGS.items():
        add_config_flags(serve.add_parser(name, help=SERVICE_HELP.get(name, f"run the {name} service")), config_cls)

    p = sub.add_parser("up", help="start processor, encoder and LLM on loopback")
    for config_cls in (ProcessorConfig, EncoderConfig, LlmConfig, FrontConfig):  # --port is the processor's
        add_config_flags(p, config_cls, skip=UP_SKIPS, overrides={"port": DEFAULT_PROCESSOR_PORT})
    p.add_argument("--encoders", type=int, default=1, metavar="N",
                   help="encoder replicas behind the processor (each its own process, sharing the encoder's cores)")
    p.add_argument("--front-port", type=int, metavar="PORT",
                   help="also start the OpenAI-compatible HTTP front on this port (0: a free one); default: no front")

    add_export_flags(sub.add_parser("export-triton", help="write a Triton model repository serving a checkpoint's towers"))

    p = sub.add_parser("generate", help="send a request to a processor")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PROCESSOR_PORT}")
    p.add_argument("--prompt", required=True)
    # One list in command-line order: the parts go to the model in the order given.
    for kind in ("image", "video", "audio"):
        p.add_argument(f"--{kind}", dest="media", type=functools.partial(_media_arg, kind), action="append",
                       default=[], metavar="PATH", help=f"{kind} file (repeatable; media parts keep their order)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this times as likely as the top one")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, over generated tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, per repeat in generated tokens")
    p.add_argument("--repetition-penalty", type=float, help="transformers' (1 = none); default: the checkpoint's")
    p.add_argument("--seed", type=int)
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="return each token's logprob and the N (0-20) most likely alternatives (shown with --json)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, ...")
    p.add_argument("--timeout-s", type=float, default=600.0)
    add_config_flags(p, ClientConfig)  # TLS and the bearer token
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; any failure is one line on stderr (the traceback too with --debug)."""
    args = _parser().parse_args(argv)  # a usage error exits here, with status 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 — the one place a command's failure becomes its message
        from services.common.errors import TriptychError

        if args.debug or os.environ.get("TRIPTYCH_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        message = f"[{err.reason}] {err.message}" if isinstance(err, TriptychError) else f"{err}"
        kind = "" if isinstance(err, (TriptychError, OSError, ValueError)) else f"{type(err).__name__}: "
        print(f"error: {kind}{' '.join(message.split())}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-model":
        from services.tiny_checkpoints import make_model

        started = time.monotonic()
        print(f"make-model: building a {args.size} {args.family} checkpoint (seed {args.seed}) in {args.out} ...",
              file=sys.stderr, flush=True)
        path = make_model(args.family, args.out, seed=args.seed, size=args.size)
        print(f"make-model: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(path)
        return 0
    if args.command == "models":
        return _list_architectures(args.json) if args.architectures else _list_models(args.json)
    if args.command == "export-triton":
        from services.encoder.triton_export import run_export

        return run_export(args)
    if args.command == "generate":
        from services.client import run_generate

        return run_generate(args)
    from services.common.interceptors import setup_logging

    setup_logging()  # every line carries the request id it was logged for
    if args.command == "up":
        from services.launcher import run_up

        return run_up(args)
    return _serve(args)


def _list_models(as_json: bool) -> int:
    """One row per family in the registry (importing each: a broken one is listed unavailable with
    its error), then one per tiny builder that no family file claims (the generic family serves it)."""
    from services.models.registry import GENERIC, FamilyStatus, family_statuses
    from services.tiny_checkpoints import TINY_FAMILIES

    def row(name: str, status: FamilyStatus) -> dict[str, object]:
        """`status` is the family serving `name`: its own, or the generic one."""
        own_file = bool(status.architectures)  # only the generic family claims no architecture
        if own_file:
            architectures = list(status.architectures)
        else:
            architectures = ["any ImageTextToText model with get_image_features"] if name == status.name else []
        modalities = status.family.modalities if status.family else ()  # unknown if unavailable
        if status.family and not own_file and name != status.name:  # a tiny builder's model type, served generically
            modalities = status.family.model_type_modalities(name)
        return {
            "family": name,
            "modalities": ["text", *modalities] if status.family else [],
            "served_by": f"services/models/{name}.py" if own_file else "generic path (services/models/generic.py)",
            "architectures": architectures,
            "tiny_model": name in TINY_FAMILIES,
            "available": status.available,
            "unavailable_reason": status.error or None,
        }

    statuses = family_statuses()
    generic = next(status for status in statuses if status.name == GENERIC[0])
    rows = [row(status.name, status) for status in statuses]
    rows += [row(name, generic) for name in TINY_FAMILIES if name not in {status.name for status in statuses}]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    modalities = {r["family"]: ",".join(r["modalities"]) or "?" for r in rows}
    width = max(len(r["family"]) for r in rows) + 1, max(map(len, modalities.values())) + 1
    print(f"{'family':<{width[0]}} {'modalities':<{width[1]}} {'tiny':<5} served by")
    for r in rows:
        tiny = "yes" if r["tiny_model"] else "no"
        print(f"{r['family']:<{width[0]}} {modalities[r['family']]:<{width[1]}} {tiny:<5} {r['served_by']}")
        if not r["available"]:
            print(f"{'':<{width[0]}} unavailable: {r['unavailable_reason']}")
    print()
    _list_architectures(False)  # the families serve whatever the record says; without one, a note only
    return 0


def _list_architectures(as_json: bool) -> int:
    """Every architecture of transformers' image-text-to-text mapping, served or not and by which path,
    as the last coverage sweep (bench/coverage.py) recorded it in docs/coverage.json: proving parity
    takes minutes per model, so this reads the record rather than recomputing it."""
    from services.coverage import RESULTS_JSON, load

    coverage = load()
    if coverage is None:
        print(f"no coverage record at {RESULTS_JSON}: run python bench/coverage.py", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(coverage.to_json()["rows"], indent=2))
        return 0
    width = max(len(r.model_type) for r in coverage.rows) + 1, max(len(r.path) for r in coverage.rows) + 1
    print(f"{'architecture':<{width[0]}} {'served by':<{width[1]}} {'result':<9} reason")
    for r in coverage.rows:
        served = r.path if r.served else "-"
        print(f"{r.model_type:<{width[0]}} {served:<{width[1]}} {r.result:<9} {r.reason}")
    print(f"{coverage.summary()} (recorded in {RESULTS_JSON.name})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.common.errors import TriptychError
    from services.models.checkpoint import DTYPES, Checkpoint

    cfg = config_from_args(SERVICE_CONFIGS[args.service], args)
    if args.service == "front":  # no model of its own: it serves the processor's
        from services.front.server import serve as serve_front

        try:
            asyncio.run(serve_front(cfg))
        except TriptychError as err:
            print(f"error: front: [{err.reason}] {err.message}", file=sys.stderr)
            return 1
        return 0
    try:
        checkpoint = Checkpoint(cfg.model.resolve(), DTYPES[cfg.dtype])
    except TriptychError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    # Progress for the slow part of a start; "<service> listening on ..." follows once it serves.
    print(f"{args.service}: loading {checkpoint.family.name} from {checkpoint.path} ({cfg.dtype}) ...",
          file=sys.stderr, flush=True)
    if args.service == "encoder":
        from services.encoder.server import serve
    elif args.service == "llm":
        from services.llm.server import serve
    else:
        from services.processor.server import serve
    try:
        asyncio.run(serve(cfg, checkpoint))
    except TriptychError as err:  # start-up failures: other model or dtype, service down
        print(f"error: {args.service}: [{err.reason}] {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
