"""A failing `triptych` command prints one line, `error: ...`, and exits non-zero (the traceback only
with --debug or TRIPTYCH_DEBUG=1); long commands say what they do on stderr, never on --json's stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def triptych(*argv: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout_s, env={**os.environ, "TRIPTYCH_DEBUG": "", **(env or {})})


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    assert out.returncode != 0, out
    lines = out.stderr.strip().splitlines()  # progress lines may come first ("front: waiting for ...")
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], out.stderr
    assert "Traceback" not in out.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_a_bad_flag_value_is_one_line():
    out = triptych("serve", "encoder", "--model", "/m", "--port", "seven")
    assert out.returncode == 2
    assert_one_line_error(out, "--port", "'seven'")
    assert_one_line_error(triptych("serve", "encoder", "--model", "/m", "--dtype", "float8"), "--dtype", "float8")
    assert_one_line_error(triptych("serve", "processor", "--model", "/m"), "--encoder")  # a required flag


def test_a_missing_model_folder_is_one_line(tmp_path):
    for service in ("encoder", "llm"):
        assert_one_line_error(triptych("serve", service, "--model", str(tmp_path / "absent")), "absent")


def test_an_unreachable_server_is_one_line():
    line = assert_one_line_error(triptych("generate", "--server", "127.0.0.1:1", "--prompt", "hi", "--timeout-s", "5"))
    assert "UNAVAILABLE" in line or "DEADLINE_EXCEEDED" in line
    assert_one_line_error(triptych("serve", "front", "--processor", "127.0.0.1:1", "--port", "0",
                                   "--connect-timeout-s", "1"), "PROCESSOR_UNAVAILABLE", "127.0.0.1:1")


def test_an_unreadable_media_file_is_one_line(tmp_path):
    assert_one_line_error(triptych("generate", "--prompt", "hi", "--image", str(tmp_path / "none.png")), "none.png")


@pytest.mark.e2e
def test_a_grpc_error_in_generate_is_one_line_with_code_and_reason(qwen2_vl_services):
    out = triptych("generate", "--server", qwen2_vl_services.address, "--prompt", "hi", "--temperature", "-1")
    assert_one_line_error(out, "INVALID_ARGUMENT", "[SAMPLING_PARAM_INVALID]", "temperature")
    out = triptych("generate", "--server", qwen2_vl_services.address, "--prompt", "hi", "--max-new-tokens", "3",
                   "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["completion_tokens"] == 3  # stdout: the JSON alone


def test_debug_shows_the_traceback(tmp_path):
    argv = ("make-model", "--family", "no_such_family", "--out", str(tmp_path / "m"))
    line = assert_one_line_error(triptych(*argv), "no_such_family")
    for out in (triptych("--debug", *argv), triptych(*argv, env={"TRIPTYCH_DEBUG": "1"})):
        assert out.returncode == 1 and "Traceback" in out.stderr
        assert out.stderr.strip().splitlines()[-1] == line


def test_make_model_says_what_it_does_on_stderr_and_prints_only_the_path(tmp_path):
    out = triptych("make-model", "--family", "qwen2_vl", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "m")
    assert "make-model: building a tiny qwen2_vl checkpoint" in out.stderr and "make-model: done in" in out.stderr


def test_a_port_in_use_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = triptych("serve", "front", "--processor", "127.0.0.1:1", "--port", str(port))
    assert_one_line_error(out, "cannot listen on", str(port))


def test_python_m_services_front_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "services.front", "--help"], check=False, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "triptych serve front" in out.stdout and "--processor" in out.stdout
