from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_models_lists_every_family_file():
    out = subprocess.run([sys.executable, "-m", "services.cli", "models", "--json"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    rows = {row["family"]: row for row in json.loads(out.stdout)}
    not_families = {"__init__", "base", "registry", "checkpoint", "generic", "inputs"}
    family_files = {p.stem for p in (ROOT / "services" / "models").glob("*.py")} - not_families
    for name in family_files:
        assert rows[name]["served_by"] == f"services/models/{name}.py"
        assert rows[name]["modalities"][0] == "text" and {"image", "audio"} & set(rows[name]["modalities"])
    assert rows["qwen2_vl"]["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert rows["qwen2_audio"]["modalities"] == ["text", "audio"]
    assert rows["phi4mm"]["modalities"] == ["text", "image", "audio"]


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.cli", "make-model", "--family", "qwen2_vl", "--out",
                          str(tmp_path / "m"), "--seed", "3"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()


# ---- configuration: every config field has a flag and a TRIPTYCH_* variable that take effect ----

import typing  # noqa: E402

import pytest  # noqa: E402

from services.cli import SERVICE_CONFIGS, _parser  # noqa: E402
from services.common.config import EncoderConfig, LlmConfig, ProcessorConfig  # noqa: E402
from services.common.flags import ConfigFlag, child_argv, config_flags, config_from_args  # noqa: E402

REQUIRED = {"model": "/models/m", "encoder_addrs": "enc:1", "llm_addr": "llm:2"}


def _other_value(cf: ConfigFlag) -> tuple[str, typing.Any]:
    """A value unlike the field's default, as text (for flag and env) and as the config holds it."""
    kind = typing.get_args(cf.type)[0] if cf.is_list else cf.type
    if cf.is_list:
        return cf.separator.join(["/srv/a", "/srv/b"]), (kind("/srv/a"), kind("/srv/b"))
    if cf.is_bool:
        return str(not cf.default).lower(), not cf.default
    if typing.get_origin(kind) is typing.Literal:
        value = next(c for c in typing.get_args(kind) if c != cf.default)
        return value, value
    if kind in (int, float):
        base = cf.default if isinstance(cf.default, (int, float)) else 0  # required, or None by default
        value = kind(base + 7)
        return str(value), value
    text = "x-" + cf.name if kind is str else "/srv/" + cf.name
    return text, kind(text)


def _leaf(cfg, cf: ConfigFlag):
    return getattr(getattr(cfg, cf.section), cf.name) if cf.section else getattr(cfg, cf.name)


def _required_argv(config_cls, skip: str) -> list[str]:
    argv = []
    for cf in config_flags(config_cls):
        if cf.required and cf.name != skip:
            argv += [cf.flag, REQUIRED[cf.name]]
    return argv


CASES = [(service, cf) for service, cls in SERVICE_CONFIGS.items() for cf in config_flags(cls)]


@pytest.mark.parametrize(("service", "cf"), CASES, ids=[f"{s}-{cf.name}" for s, cf in CASES])
def test_every_config_field_has_a_flag_and_an_env_variable(service, cf, monkeypatch):
    config_cls = SERVICE_CONFIGS[service]
    text, value = _other_value(cf)
    assert value != cf.default
    flag_args = text.split(cf.separator) if cf.is_list else [text]
    argv = [x for v in flag_args for x in (cf.flag, v)]
    if cf.is_bool:
        argv = [cf.flag if value else "--no-" + cf.flag[2:]]
    base = ["serve", service, *_required_argv(config_cls, skip=cf.name)]

    by_flag = config_from_args(config_cls, _parser().parse_args([*base, *argv]))
    assert _leaf(by_flag, cf) == value

    monkeypatch.setenv(cf.env, text)  # read when the parser is built
    by_env = config_from_args(config_cls, _parser().parse_args(base))
    assert _leaf(by_env, cf) == value

    assert cf.env.startswith("TRIPTYCH_") and cf.flag.startswith("--")


def test_defaults_come_from_the_config_dataclasses(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TRIPTYCH_"):
            monkeypatch.delenv(name)
    cfg = config_from_args(ProcessorConfig, _parser().parse_args(
        ["serve", "processor", "--model", "/m", "--encoder", "e:1", "--llm", "l:2"]))
    assert cfg == ProcessorConfig(model=Path("/m"), encoder_addrs=("e:1",), llm_addr="l:2")
    assert config_from_args(LlmConfig, _parser().parse_args(["serve", "llm", "--model", "/m"])) == LlmConfig(Path("/m"))


def test_flag_beats_env_and_a_bad_env_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("TRIPTYCH_PORT", "7000")
    args = _parser().parse_args(["serve", "encoder", "--model", "/m", "--port", "7001"])
    assert config_from_args(EncoderConfig, args).server.port == 7001
    monkeypatch.setenv("TRIPTYCH_PORT", "seven")
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "encoder", "--model", "/m"])
    assert "--port" in capsys.readouterr().err


def test_up_passes_each_child_its_own_config(monkeypatch):
    """`triptych up --X` reaches the service that has X; each child parses what up gives it."""
    args = _parser().parse_args(["up", "--model", "/m", "--dtype", "bfloat16", "--max-running-requests", "3",
                                 "--max-items-per-request", "5", "--allowed-media-dir", "/a", "--grace-s", "4"])
    assert args.port == 50051  # `up`'s own default: where `generate` looks
    for service, config_cls in SERVICE_CONFIGS.items():
        extra = ["--encoder", "e:1", "--llm", "l:2"] if service == "processor" else []
        argv = child_argv(config_cls, args, skip=frozenset({"encoder_addrs", "llm_addr"}))
        cfg = config_from_args(config_cls, _parser().parse_args(["serve", service, *argv, *extra]))
        assert cfg.dtype == "bfloat16" and cfg.server.grace_s == 4
        expected = {"encoder": ("max_items_per_request", 5), "llm": ("max_running_requests", 3),
                    "processor": ("allowed_media_dirs", (Path("/a"),))}[service]
        assert getattr(cfg, expected[0]) == expected[1]


def test_up_splits_the_encoders_half_of_the_cores_between_its_encoders():
    from services.launcher import torch_shares

    assert torch_shares(0, 8) == (4, 4) and torch_shares(0, 8, encoders=2) == (2, 4)
    assert torch_shares(0, 2, encoders=3) == (1, 1) and torch_shares(3, 8, encoders=2) == (3, 3)
    assert _parser().parse_args(["up", "--model", "/m", "--encoders", "2"]).encoders == 2


def test_cli_repeats_no_default():
    """Defaults live in services/common/config.py: cli.py only names the flags it adds itself."""
    source = (ROOT / "services" / "cli.py").read_text()
    for cls in SERVICE_CONFIGS.values():
        for cf in config_flags(cls):
            assert f'"{cf.flag}"' not in source, cf.name


# ---- python -m services.<service>: a thin entry to the CLI, no import circle ----

@pytest.mark.parametrize("service", ["encoder", "llm", "processor"])
def test_python_m_service_is_the_cli(service):
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", f"services.{service}", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"triptych serve {service}" in out.stdout and "--model" in out.stdout
    assert "RuntimeWarning" not in out.stderr  # runpy warns when a module is executed twice


def test_cli_does_not_import_the_entry_modules():
    code = ("import sys, services.cli, services.encoder.server, services.llm.server, services.processor.server; "
            "print(sorted(m for m in sys.modules if m.endswith('__main__') and m.startswith('services')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_imports_an_entry_module():
    """`python -m services.encoder` ran its module twice when cli.py imported it back."""
    import ast

    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.endswith("__main__") for n in names), f"{path} imports {names}"


def test_readme_lists_every_flag_with_its_env_and_default():
    readme = (ROOT / "README.md").read_text()
    for cls in SERVICE_CONFIGS.values():
        for cf in config_flags(cls):
            default = "required" if cf.required else ("none" if cf.default in ((), None) else str(cf.default))
            assert re.search(rf"^\| `{cf.flag}` \| `{cf.env}` \| [^|]+ \| {re.escape(default)} \|", readme, re.M), (
                f"README.md's Commands table needs the row: | `{cf.flag}` | `{cf.env}` | SERVICES | {default} | HELP |")
