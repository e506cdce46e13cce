"""docker-compose.yml is not run here (no Docker engine); check that it says what the services need."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli import _parser

ROOT = Path(__file__).resolve().parent.parent


def test_compose_describes_the_three_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = {name: svc for name, svc in compose["services"].items() if "profiles" not in svc}  # `up`'s default
    assert set(services) == {"encoder", "encoder-2", "llm", "processor", "front"}
    ports = {}
    for name, svc in services.items():
        if name == "front":  # HTTP, and no model: checked below
            continue
        command = svc["command"]
        assert command[:2] == ["serve", name.removesuffix("-2")]
        _parser().parse_args([*command, "--model", "/model"])  # the CLI accepts exactly these flags
        ports[name] = command[command.index("--port") + 1]
        assert svc["environment"]["TRIPTYCH_HOST"] == "0.0.0.0"
        assert svc["environment"]["TRIPTYCH_MODEL"] == "/model"
        assert svc["healthcheck"]["test"][-1] == ports[name]
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
    processor = services["processor"]["command"]
    args = _parser().parse_args([*processor, "--model", "/model"])
    # Two encoder replicas behind the processor, one --encoder each.
    assert args.encoder_addrs == [f"encoder:{ports['encoder']}", f"encoder-2:{ports['encoder-2']}"]
    assert services["encoder-2"]["command"] == services["encoder"]["command"]
    assert args.llm_addr == f"llm:{ports['llm']}"
    assert services["processor"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in ("encoder", "encoder-2", "llm")}


def test_dockerfiles_build_the_triptych_image():
    """The CPU and CUDA images: one image for every service, `triptych` its entry point, the health check in it."""
    cpu = (ROOT / "docker/Dockerfile").read_text()
    cuda = (ROOT / "docker/Dockerfile.cuda").read_text()
    assert _base_images(cpu) == ["python:3.11-slim"]
    assert len(_base_images(cuda)) == 1 and _base_images(cuda)[0].startswith("nvidia/cuda:")
    assert "-runtime-" in _base_images(cuda)[0]  # the runtime image: torch's wheels bring their own CUDA libraries
    for text in (cpu, cuda):
        assert _instructions(text, "ENTRYPOINT") == ['["triptych"]']
        assert "docker/healthcheck.py /app/healthcheck.py" in _instructions(text, "COPY")
        assert "torch==2.14.1 torchvision==0.29.1" in text  # pyproject.toml's pins
        assert "HF_HUB_OFFLINE=1" in " ".join(_instructions(text, "ENV"))
    # The CUDA image's default device: an environment variable that is a flag of the encoder and the LLM.
    env = " ".join(_instructions(cuda, "ENV"))
    assert "TRIPTYCH_DEVICE=cuda:0" in env
    for service in ("encoder", "llm"):
        assert _parser().parse_args(["serve", service, "--model", "/m", "--device", "cuda:0"]).device == "cuda:0"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-triptych"]["build"]["dockerfile"] == "docker/Dockerfile"


def _instructions(dockerfile: str, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, continuation lines joined."""
    lines = dockerfile.replace("\\\n", " ").splitlines()
    return [line.split(None, 1)[1].strip() for line in lines if line.split(None, 1)[:1] == [keyword]]


def _base_images(dockerfile: str) -> list[str]:
    return [args.split()[0] for args in _instructions(dockerfile, "FROM")]


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
