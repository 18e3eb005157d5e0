"""TLS and mTLS on the real server: a throwaway CA, server and client certificates on loopback.

Without the CA a client cannot verify the server and fails the handshake; with client
certificates required, a client without one (or with one from another CA) is turned away
before any RPC runs. adapterctl and the container health check speak the same TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from adapterctl import cli
from adapterd import healthcheck
from adapterd.auth import hash_token
from adapterd.config import AuthConfig, TlsConfig
from adapterd.registry.directory import DirectoryResolver
from adapterd_api.v1 import inference_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.grpc_harness import RunningServer, request


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # signed by other_ca, which the server does not trust
    other_client_key: Path


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _pem(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "srv", "cli", "oca", "ocli")}
    ca = _cert("adapterd test CA", keys["ca"], ca=True)
    other_ca = _cert("another CA", keys["oca"], ca=True)
    return Pki(
        ca=_pem(d / "ca.pem", ca),
        server_cert=_pem(d / "server.pem", _cert("localhost", keys["srv"], ca, keys["ca"], server=True)),
        server_key=_pem(d / "server.key", key=keys["srv"]),
        client_cert=_pem(d / "client.pem", _cert("client", keys["cli"], ca, keys["ca"])),
        client_key=_pem(d / "client.key", key=keys["cli"]),
        other_ca=_pem(d / "other-ca.pem", other_ca),
        other_client_cert=_pem(d / "other.pem", _cert("stranger", keys["ocli"], other_ca, keys["oca"])),
        other_client_key=_pem(d / "other.key", key=keys["ocli"]),
    )


@pytest.fixture
def start(parts_for, tmp_path):
    servers = []

    def run(**config) -> RunningServer:
        server = RunningServer.start(parts_for(2), DirectoryResolver(tmp_path), **config)
        servers.append(server)
        return server

    yield run
    for s in servers:
        s.stop()


def creds(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None):
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def generate(addr: str, credentials) -> str:
    """One Generate over a fresh channel: the status code name, or "OK"."""
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    with channel:
        try:
            pb_grpc.InferenceStub(channel).Generate(request("hi", max_new_tokens=2), timeout=10)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def test_tls_needs_the_ca(start, pki):
    server = start(tls=TlsConfig(pki.server_cert, pki.server_key))
    assert generate(server.addr, creds(ca=pki.ca)) == "OK"
    # The server's certificate is not signed by anything the client trusts.
    assert generate(server.addr, creds()) == "UNAVAILABLE"  # system roots
    assert generate(server.addr, creds(ca=pki.other_ca)) == "UNAVAILABLE"
    assert generate(server.addr, None) == "UNAVAILABLE"  # plaintext to a TLS port


def test_mtls_refuses_clients_without_a_certificate(start, pki):
    server = start(tls=TlsConfig(pki.server_cert, pki.server_key, pki.ca))
    assert generate(server.addr, creds(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) == "OK"
    assert generate(server.addr, creds(ca=pki.ca)) == "UNAVAILABLE"
    assert generate(server.addr, creds(ca=pki.ca, cert=pki.other_client_cert,
                                       key=pki.other_client_key)) == "UNAVAILABLE"

    # The refusal is in the TLS handshake itself: a raw TLS client gets the server's HTTP/2
    # SETTINGS frame with a certificate, and an alert or a closed connection without one.
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    without = ssl.create_default_context(cafile=str(pki.ca))
    for ctx in (with_cert, without):
        ctx.set_alpn_protocols(["h2"])
    first = first_bytes(server.port, with_cert)
    assert isinstance(first, bytes) and len(first) == 9 and first[3] == 0x4  # a SETTINGS frame
    refused = first_bytes(server.port, without)
    assert refused == b"" or isinstance(refused, (ssl.SSLError, ConnectionError))


def first_bytes(port: int, ctx: ssl.SSLContext) -> bytes | Exception:
    """The first 9 bytes the server sends after the handshake (TLS 1.3 delivers the
    server's verdict on the client certificate after the client's part of it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                data = b""
                while len(data) < 9:
                    chunk = tls.recv(9 - len(data))
                    if not chunk:
                        break
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionError) as e:
            return e


def test_adapterctl_and_healthcheck_speak_mtls_with_a_token(start, pki, tmp_path, monkeypatch, capsys):
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(f'[tenants.acme]\n[[tenants.acme.tokens]]\nhash = "{hash_token("s3cret")}"\n')
    server = start(tls=TlsConfig(pki.server_cert, pki.server_key, pki.ca), auth=AuthConfig(auth_file))
    conn = ["--addr", server.addr, "--ca", str(pki.ca), "--cert", str(pki.client_cert),
            "--key", str(pki.client_key)]

    monkeypatch.setenv("ADAPTERD_TOKEN", "s3cret")
    assert cli.main([*conn, "generate", "--max-new-tokens", "3", "hi"]) == 0
    assert cli.main([*conn, "--token", "wrong", "generate", "hi"]) == cli.exit_code(grpc.StatusCode.UNAUTHENTICATED)
    monkeypatch.delenv("ADAPTERD_TOKEN")
    assert cli.main([*conn, "generate", "hi"]) == cli.exit_code(grpc.StatusCode.UNAUTHENTICATED)
    # Without the client certificate: no connection at all.
    assert cli.main(["--addr", server.addr, "--ca", str(pki.ca), "--token", "s3cret", "generate", "hi"]) \
        == cli.exit_code(grpc.StatusCode.UNAVAILABLE)
    capsys.readouterr()

    # The container health check needs no token (health is open) but does need the certificate.
    tls_args = ["--address", server.addr, "--ca", str(pki.ca), "--server-name", "localhost"]
    assert healthcheck.main([*tls_args, "--cert", str(pki.client_cert), "--key", str(pki.client_key)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert healthcheck.main(tls_args) == 1
