"""docker-compose.yml is not run here (no Docker engine); check that it says what the services need."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import _parser

ROOT = Path(__file__).resolve().parent.parent


def test_compose_describes_the_three_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = {name: svc for name, svc in compose["services"].items() if "profiles" not in svc}  # `up`'s default
    assert set(services) == {"encoder", "llm", "processor", "front"}
    ports = {}
    for name, svc in services.items():
        if name == "front":  # HTTP, and no model: checked below
            continue
        command = svc["command"]
        assert command[:2] == ["serve", name]
        _parser().parse_args([*command, "--model", "/model"])  # the CLI accepts exactly these flags
        ports[name] = command[command.index("--port") + 1]
        assert svc["environment"]["TRIPTYCH_HOST"] == "0.0.0.0"
        assert svc["environment"]["TRIPTYCH_MODEL"] == "/model"
        assert svc["healthcheck"]["test"][-1] == ports[name]
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
    processor = services["processor"]["command"]
    assert processor[processor.index("--encoder") + 1] == f"encoder:{ports['encoder']}"
    assert processor[processor.index("--llm") + 1] == f"llm:{ports['llm']}"
    assert set(services["processor"]["depends_on"]) == {"encoder", "llm"}


def test_compose_describes_the_front():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    front, processor = compose["services"]["front"], compose["services"]["processor"]["command"]
    command = front["command"]
    args = _parser().parse_args(command)  # the CLI accepts exactly these flags
    assert command[:2] == ["serve", "front"] and front["volumes"] == []
    assert args.processor_addr == f"processor:{processor[processor.index('--port') + 1]}"
    assert front["ports"] == [f"{args.port}:{args.port}"] and front["environment"]["TRIPTYCH_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{args.port}/health/ready" in front["healthcheck"]["test"][-1]
    assert front["depends_on"] == {"processor": {"condition": "service_healthy"}}


def test_compose_triton_profile_puts_an_encoder_in_front_of_triton():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    triton, encoder = services["triton"], services["encoder-triton"]
    assert triton["profiles"] == encoder["profiles"] == ["triton"]
    assert (ROOT / triton["build"]["dockerfile"]).is_file()
    assert "nvcr.io/nvidia/tritonserver:" in (ROOT / triton["build"]["dockerfile"]).read_text()
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/models" in triton["command"] and any(v.endswith(":/models:ro") for v in triton["volumes"])
    command = encoder["command"]
    args = _parser().parse_args([*command, "--model", "/model"])
    assert (args.backend, args.triton_url) == ("triton", "triton:8000")
    assert triton["command"][triton["command"].index("--http-port") + 1] == "8000"
    assert encoder["depends_on"]["triton"]["condition"] == "service_healthy"
