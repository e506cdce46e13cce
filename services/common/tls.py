"""TLS and mutual TLS for servers and channels, from PEM files named by flags (or TRIPTYCH_* env).

A server with --tls-cert and --tls-key serves TLS only; with --tls-ca as well, every client must
present a certificate signed by that CA (mutual TLS: gRPC refuses the others at the handshake, before
any RPC, so they see UNAVAILABLE). Health checks go through the same port: a probe speaks TLS too
(grpc_health_probe -tls ...), or checks from inside the pod.

A client verifies the server's certificate against its CA (or the system's roots), and presents its
own certificate when it has one. The name checked is the host the client was given: for an encoder
host name that resolves to several replicas the processor dials each address but checks the name, so
one certificate for the (headless) service name serves every replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.errors import InvalidArgument


def read_pem(path: Path, flag: str) -> bytes:
    """A PEM file's bytes; a missing or unreadable one is a clear start-up error naming the flag."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"{flag} {path}: cannot read it ({err.strerror})", reason="TLS_CONFIG_INVALID") from err
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"{flag} {path} is not a PEM file", reason="TLS_CONFIG_INVALID")
    return data


def _pair(cert: Path | None, key: Path | None, cert_flag: str, key_flag: str) -> tuple[bytes, bytes] | None:
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if cert is not None else (key_flag, cert_flag)
        raise InvalidArgument(f"{given} needs {missing} as well", reason="TLS_CONFIG_INVALID")
    if cert is None:
        return None
    return read_pem(key, key_flag), read_pem(cert, cert_flag)  # gRPC's order: (private key, chain)


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    """The server's credentials from --tls-cert/--tls-key/--tls-ca; None: plaintext."""
    pair = _pair(cert, key, "--tls-cert", "--tls-key")
    if pair is None:
        if ca is not None:
            raise InvalidArgument("--tls-ca (client certificates) needs --tls-cert and --tls-key",
                                  reason="TLS_CONFIG_INVALID")
        return None
    roots = read_pem(ca, "--tls-ca") if ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


@dataclass(frozen=True)
class ClientTLS:
    """How a client connects over TLS: the CA that signed the server (None: the system's roots) and the
    certificate it presents (mutual TLS), as PEM bytes read once at start."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(cls, ca: Path | None, cert: Path | None, key: Path | None, *, enabled: bool = False,
                   flags: tuple[str, str, str] = ("--tls-ca", "--tls-client-cert", "--tls-client-key")) -> ClientTLS | None:
        """None (plaintext) unless a file is given or `enabled`; `flags` name them in errors."""
        pair = _pair(cert, key, flags[1], flags[2])
        if ca is None and pair is None and not enabled:
            return None
        return cls(ca=read_pem(ca, flags[0]) if ca is not None else None,
                   key=pair[0] if pair else None, cert=pair[1] if pair else None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def server_name_options(server_name: str | None) -> list[tuple[str, str]]:
    """Channel options that check the server's certificate for `server_name` instead of the dialled address."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []
