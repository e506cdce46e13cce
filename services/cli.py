"""The `triptych` command: models, make-model, serve, up, generate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from services.common.config import EncoderConfig, LlmConfig, ProcessorConfig, ServerConfig, env_default

DEFAULT_PORT = 50051


def _server_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--model", type=Path, default=env_default("model", "") or None, required=not env_default("model", ""),
                   help="local Hugging Face checkpoint folder (env TRIPTYCH_MODEL)")
    p.add_argument("--host", default=env_default("host", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(env_default("port", str(default_port))), help="0 picks a free port")
    p.add_argument("--dtype", default=env_default("dtype", "float32"), choices=["float32", "bfloat16", "float16"],
                   help="weights and embeddings dtype")
    p.add_argument("--max-message-mib", type=int, default=int(env_default("max_message_mib", "256")))
    p.add_argument("--grace-s", type=float, default=float(env_default("grace_s", "30")),
                   help="how long in-flight requests may take to finish after SIGTERM")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, max_message_mib=args.max_message_mib, grace_s=args.grace_s)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triptych", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model families, their modalities and how each is served")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("make-model", help="write a tiny random checkpoint folder (offline)")
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])

    serve = sub.add_parser("serve", help="run one service").add_subparsers(dest="service", required=True)
    for name in ("encoder", "llm", "processor"):
        p = serve.add_parser(name)
        _server_args(p, 0)
        if name in ("encoder", "llm"):
            p.add_argument("--device", default=env_default("device", "cpu"), help="torch device, e.g. cuda:0")
        if name == "processor":
            p.add_argument("--encoder", required=True, help="encoder address HOST:PORT")
            p.add_argument("--llm", required=True, help="LLM address HOST:PORT")
            p.add_argument("--allowed-media-dir", type=Path, action="append", default=[],
                           help="directory whose files may be named by file:// URLs (repeatable)")
            p.add_argument("--max-media-mib", type=int, default=int(env_default("max_media_mib", "32")))
        if name == "llm":
            p.add_argument("--max-running-requests", type=int, default=8)
            p.add_argument("--max-waiting-requests", type=int, default=256)

    p = sub.add_parser("up", help="start processor, encoder and LLM on loopback")
    _server_args(p, DEFAULT_PORT)
    p.add_argument("--device", default=env_default("device", "cpu"))
    p.add_argument("--allowed-media-dir", type=Path, action="append", default=[])

    p = sub.add_parser("generate", help="send a request to a processor")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, ...")
    p.add_argument("--timeout-s", type=float, default=600.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-model":
        from services.tiny_checkpoints import make_model

        print(make_model(args.family, args.out, seed=args.seed, size=args.size))
        return 0
    if args.command == "models":
        return _list_models(args.json)
    if args.command == "generate":
        from services.client import run_generate

        return run_generate(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
        return {
            "family": name,
            "modalities": ["text", *status.family.modalities] if status.family else [],  # unknown if unavailable
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
    print(f"{'family':<18} {'modalities':<20} {'tiny':<5} served by")
    for r in rows:
        modalities = ",".join(r["modalities"]) or "?"
        print(f"{r['family']:<18} {modalities:<20} {'yes' if r['tiny_model'] else 'no':<5} {r['served_by']}")
        if not r["available"]:
            print(f"{'':<18} unavailable: {r['unavailable_reason']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from services.common.errors import TriptychError
    from services.models.checkpoint import DTYPES, Checkpoint

    try:
        checkpoint = Checkpoint(args.model.resolve(), DTYPES[args.dtype])
    except TriptychError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    server = _server_config(args)
    try:
        if args.service == "encoder":
            from services.encoder.__main__ import serve

            asyncio.run(serve(EncoderConfig(model=args.model, server=server, device=args.device), checkpoint))
        elif args.service == "llm":
            from services.llm.__main__ import serve

            asyncio.run(serve(LlmConfig(model=args.model, server=server, device=args.device,
                                        max_running_requests=args.max_running_requests,
                                        max_waiting_requests=args.max_waiting_requests), checkpoint))
        else:
            from services.processor.__main__ import serve

            asyncio.run(serve(ProcessorConfig(model=args.model, server=server, encoder_addr=args.encoder,
                                              llm_addr=args.llm, allowed_media_dirs=tuple(args.allowed_media_dir),
                                              max_media_mib=args.max_media_mib), checkpoint))
    except TriptychError as err:  # start-up failures: other model, service down
        print(f"error: {args.service}: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
