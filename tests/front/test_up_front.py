"""`triptych up --front-port 0`: the front starts after the processor, serves its model, and stops with the rest;
with --auth-token-file both want the token, and the front sends it to the processor itself."""

from __future__ import annotations

import re
import signal

import httpx
import openai
import pytest

from tests.procs import spawn, wait_listening

pytestmark = pytest.mark.e2e


def test_up_starts_the_front_too(qwen2_vl_dir, tmp_path):
    (tmp_path / "token").write_text("up-token")
    up = spawn("up", "up", "--model", str(qwen2_vl_dir), "--port", "0", "--front-port", "0", "--cache-mib", "0",
               "--auth-token-file", str(tmp_path / "token"), listen_name="front")
    try:
        wait_listening(up, 600)
        # The launcher's own lines (its children's carry a "[name] " prefix); the processor's comes first.
        own = [line.strip() for line in up.lines if re.fullmatch(r"(processor|front) listening on \S+\s*", line)]
        assert [line.split()[0] for line in own] == ["processor", "front"], up.output()
        front = own[1].split()[-1]
        assert httpx.get(f"http://{front}/health/ready", timeout=10).json()["status"] == "ready"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{front}/v1", api_key="another", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"http://{front}/v1", api_key="up-token", max_retries=0, timeout=120)
        [model] = client.models.list().data
        assert model.id == str(qwen2_vl_dir)
        reply = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
    finally:
        assert up.stop(signal.SIGTERM, timeout_s=120) == 0, up.output()
    assert any("[front]" in line and "Shutting down" in line for line in up.lines), up.output()
