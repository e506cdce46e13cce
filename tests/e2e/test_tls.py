"""Mutual TLS between the three services (as separate processes) and for clients, the processor's
bearer token, and the HTTP front's HTTPS, token and metrics: certificates made here by a CA of the
test's own (the `cryptography` package)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import image_bytes
from tests.procs import (
    spawn,
    start_encoder,
    start_llm,
    start_processor,
    stop_all,
    tls_flags,
    wait_listening,
    wait_serving,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


# ---- a CA and its certificates ------------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    @property
    def pem(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    issued = Issued(folder / f"{stem}.pem", folder / f"{stem}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return issued


class CertificateAuthority:
    def __init__(self, folder: Path, name: str):
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = folder / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, *, server: bool, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        """A leaf certificate: for a server, valid for `names` (host names and IP addresses); else a client
        certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]),
                critical=False)
        return _write(self.folder, stem, builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued  # every service's (one host)
    processor_client: Issued  # what the processor presents to the encoder and the LLM
    client: Issued  # a user's
    rogue_client: Issued  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "triptych-test-ca"), CertificateAuthority(folder, "rogue-ca")
    return Pki(ca, ca.issue("server", server=True), ca.issue("processor-client", server=False),
               ca.issue("client", server=False), rogue.issue("rogue-client", server=False))


TOKEN = f"tok-{uuid.uuid4().hex}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEALTH_PORT = free_port()


@pytest.fixture(scope="module")
def services(qwen2_vl_dir, pki, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    mtls = tls_flags(pki.server.cert, pki.server.key, pki.ca.pem)
    encoder, llm = start_encoder(qwen2_vl_dir, *mtls), start_llm(qwen2_vl_dir, *mtls)
    processor = start_processor(
        qwen2_vl_dir, wait_listening(encoder), wait_listening(llm), None, *mtls,
        "--tls-upstream-ca", str(pki.ca.pem), "--tls-client-cert", str(pki.processor_client.cert),
        "--tls-client-key", str(pki.processor_client.key), "--auth-token-file", str(token_file),
        "--health-port", str(HEALTH_PORT))
    procs = {"encoder": encoder, "llm": llm, "processor": processor}
    try:
        wait_listening(processor)
        for proc in procs.values():
            wait_serving(proc.address, credentials=credentials(pki, pki.client))
        yield procs
    finally:
        stop_all(*(procs[name] for name in ("processor", "encoder", "llm")))


def credentials(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    cert, key = client.pem if client else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.pem.read_bytes(), private_key=key, certificate_chain=cert)


def _generate(address: str, creds: grpc.ChannelCredentials | None, token: str | None = TOKEN):
    request = processor_pb2.GenerateRequest(messages=build_messages("Describe.", [image_bytes(48, 48, seed=5)]),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=3))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with channel:
        return processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, metadata=metadata, timeout=60)


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


# ---- the tests ------------------------------------------------------------------------------------
def test_a_request_crosses_the_three_services_over_mutual_tls(services, pki):
    # The processor reached the encoder and the LLM with its client certificate (they refuse any other).
    reply = _generate(services["processor"].address, credentials(pki, pki.client))
    assert reply.completion.completion_tokens == 3


def test_triptych_generate_speaks_tls_and_sends_the_token(services, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "--server", services["processor"].address,
         "--prompt", "Hi.", "--max-new-tokens", "2", "--json", "--tls-ca", str(pki.ca.pem),
         "--tls-client-cert", str(pki.client.cert), "--tls-client-key", str(pki.client.key),
         "--auth-token-file", str(token_file)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completion_tokens"] == 2


@pytest.mark.parametrize("client", ["rogue", "none"])
def test_a_client_without_a_certificate_of_the_ca_is_refused_at_the_handshake(services, pki, client):
    creds = credentials(pki, pki.rogue_client if client == "rogue" else None)
    for name in ("processor", "encoder"):
        # gRPC refuses the connection during the TLS handshake, before any RPC: no status can be sent,
        # the client sees UNAVAILABLE (not UNAUTHENTICATED).
        err = _refusal(lambda: _generate(services[name].address, creds) if name == "processor" else
                       encoder_pb2_grpc.EncoderServiceStub(grpc.secure_channel(services[name].address, creds))
                       .GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=20))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)


def test_a_plaintext_client_is_refused(services):
    err = _refusal(lambda: _generate(services["processor"].address, None))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("token", "reason"), [(None, "AUTH_TOKEN_MISSING"), ("not-the-token", "AUTH_TOKEN_INVALID"),
                                                (TOKEN[:-1], "AUTH_TOKEN_INVALID")])
def test_no_or_a_wrong_token_is_unauthenticated(services, pki, token, reason):
    err = _refusal(lambda: _generate(services["processor"].address, credentials(pki, pki.client), token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err).reason == reason and error_info(err).domain == "triptych.processor"
    assert TOKEN not in err.details()


def test_health_needs_no_token(services, pki):
    with grpc.secure_channel(services["processor"].address, credentials(pki, pki.client)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_probes_without_a_certificate_use_the_plaintext_health_port(services):
    with grpc.insecure_channel(f"127.0.0.1:{HEALTH_PORT}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="triptych.processor.v1.ProcessorService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refused = _refusal(lambda: processor_pb2_grpc.ProcessorServiceStub(channel).Generate(
            processor_pb2.GenerateRequest(), timeout=10))
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED  # that port serves health and nothing else


def test_the_token_is_in_no_log(services, pki):
    _refusal(lambda: _generate(services["processor"].address, credentials(pki, pki.client), token="wrong-" + TOKEN))
    logs = "".join(line for proc in services.values() for line in proc.lines)
    assert "UNAUTHENTICATED" in logs  # the refusals were logged...
    assert TOKEN not in logs  # ...without the token (right or wrong)


def test_replicas_of_a_host_name_are_checked_for_that_name(qwen2_vl_dir, pki):
    """The pool dials each address an encoder name resolves to, but checks the certificate for the name:
    one certificate for a (headless) service name serves every replica, whose IPs it cannot list."""
    import asyncio

    from services.common.config import EncoderConfig, ServerConfig
    from services.common.errors import Unavailable
    from services.common.tls import ClientTLS
    from services.encoder import server as encoder_server
    from services.encoder.servicer import EncoderServicer
    from services.models.checkpoint import Checkpoint
    from services.processor.pool import EncoderPool

    named = pki.ca.issue("encoders", server=True, names=("encoders.test",))  # no IP address in it
    checkpoint = Checkpoint(qwen2_vl_dir)
    tls = ClientTLS(ca=pki.ca.pem.read_bytes(), cert=pki.processor_client.cert.read_bytes(),
                    key=pki.processor_client.key.read_bytes())

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "encoders.test"
        return ["127.0.0.1"]

    async def run() -> None:
        servicer = EncoderServicer(checkpoint, EncoderConfig(model=qwen2_vl_dir))
        server, port = await encoder_server.start_server(servicer, ServerConfig(
            port=0, tls_cert=named.cert, tls_key=named.key, tls_ca=pki.ca.pem))
        try:
            by_name = EncoderPool([f"encoders.test:{port}"], checkpoint.fingerprint, resolver=resolve, tls=tls)
            await by_name.connect(30)
            assert [s.healthy for s in by_name.stats()] == [True]
            await by_name.close()
            by_address = EncoderPool([f"127.0.0.1:{port}"], checkpoint.fingerprint, tls=tls)
            with pytest.raises(Unavailable):  # the certificate does not name 127.0.0.1
                await by_address.connect(3)
            await by_address.close()
        finally:
            await server.stop(0)
            servicer.close()

    asyncio.run(run())


# ---- the public front: HTTPS, its own bearer token, TLS and the token to the processor -----------------
FRONT_TOKEN = f"front-{uuid.uuid4().hex}"  # not the processor's: the front sends that one itself
FRONT_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def front(services, pki, tmp_path_factory):
    secret = tmp_path_factory.mktemp("front-secret")
    (secret / "front").write_text(FRONT_TOKEN)
    (secret / "processor").write_text(TOKEN)
    proc = spawn("front", "serve", "front", "--processor", services["processor"].address, "--port", "0",
                 "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                 "--auth-token-file", str(secret / "front"), "--metrics-port", str(FRONT_METRICS_PORT),
                 "--tls-upstream-ca", str(pki.ca.pem), "--tls-client-cert", str(pki.client.cert),
                 "--tls-client-key", str(pki.client.key), "--upstream-auth-token-file", str(secret / "processor"))
    address = wait_listening(proc, 120)
    yield proc, f"https://{address}"
    assert proc.stop() == 0, proc.output()


def _verify(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca.pem))


def _openai(pki: Pki, url: str, token: str) -> openai.OpenAI:
    """Used in a `with`: a TLS connection left open keeps the front's shutdown waiting for its close_notify
    (asyncio's 30 s SSL shutdown timeout), as any HTTPS client that neither closes nor reads would."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120,
                         http_client=httpx.Client(verify=_verify(pki)))


def test_the_front_serves_https_with_its_token_and_reaches_the_tls_processor_with_its_own(front, pki):
    _, url = front
    with _openai(pki, url, FRONT_TOKEN) as client:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, max_tokens=3, temperature=0,
                                               messages=[{"role": "user", "content": "Hi."}])
    assert reply.usage.completion_tokens == 3


@pytest.mark.parametrize(("token", "code"), [("", "AUTH_TOKEN_MISSING"), (TOKEN, "AUTH_TOKEN_INVALID"),
                                             (FRONT_TOKEN[:-1], "AUTH_TOKEN_INVALID")])
def test_the_front_refuses_no_or_a_wrong_token_with_401(front, pki, token, code):
    proc, url = front
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        reply = httpx.request(method, f"{url}{path}", headers=headers, json={}, verify=_verify(pki), timeout=30)
        assert reply.status_code == 401, reply.text
        assert reply.headers["www-authenticate"] == "Bearer"
        error = reply.json()["error"]
        assert error["code"] == code and error["type"] == "authentication_error"
        assert FRONT_TOKEN not in reply.text and TOKEN not in reply.text
    assert FRONT_TOKEN not in proc.output() and TOKEN not in proc.output()


def test_the_fronts_probes_need_no_token_and_plain_http_is_refused(front, pki):
    _, url = front
    for path in ("/health", "/health/ready"):  # ready: the front reached the processor's health over TLS
        assert httpx.get(f"{url}{path}", verify=_verify(pki), timeout=30).status_code == 200
    with pytest.raises(httpx.HTTPError):  # HTTPS only
        httpx.get(url.replace("https://", "http://") + "/health", timeout=10)


def test_the_front_counts_its_requests_by_route_and_status(front, pki):
    _, url = front
    before = _http_requests()
    httpx.get(f"{url}/v1/models", verify=_verify(pki), timeout=30)  # no token: 401
    with _openai(pki, url, FRONT_TOKEN) as client:
        client.models.list()
    after = _http_requests()
    for status in ("401", "200"):
        key = ("/v1/models", status)
        assert after.get(key, 0) - before.get(key, 0) == 1, (key, before, after)


def _http_requests() -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{FRONT_METRICS_PORT}/metrics", timeout=10).text
    return {(s.labels["route"], s.labels["status"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "triptych_http_requests" for s in family.samples if s.name.endswith("_total")}
