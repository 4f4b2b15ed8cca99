"""The address policy and the connector seam of URL downloads (issue 14.3).

Nothing here connects anywhere but loopback: addresses outside it are only classified, or
refused before any connection (the image tests' conftest fails any other connect outright).
"""

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpcore
import pytest
from pydantic import ValidationError

from vlpref.config import ManifestSource
from vlpref.images.netguard import (
    GuardedBackend,
    HostGuard,
    HostRefused,
    IPAddress,
    address_kind,
    system_resolver,
)
from vlpref.images.normalize import ImageRejected
from vlpref.images.sources import fetch_url, make_client


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "shared"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:8.8.8.8", None),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ],
)
def test_address_kind(address: str, kind: str | None) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


def ips(*texts: str) -> list[IPAddress]:
    return [ipaddress.ip_address(t) for t in texts]


def test_refusal_by_default_and_the_allowances() -> None:
    strict = HostGuard()
    assert strict.refusal("8.8.8.8", ips("8.8.8.8")) is None
    reason = strict.refusal("127.0.0.1", ips("127.0.0.1"))
    assert reason == (
        "refused: 127.0.0.1 is a loopback address (set allow_private or allow_hosts to allow it)"
    )
    meta = strict.refusal("metadata.test", ips("169.254.169.254"))
    assert meta == (
        "refused: metadata.test resolves to a link-local address (set allow_hosts to allow it)"
    )
    # A name resolving to a public and a private address is refused as a whole.
    assert strict.refusal("both.test", ips("8.8.8.8", "10.0.0.1")) is not None

    private = HostGuard(allow_private=True)
    for address in ("127.0.0.1", "10.0.0.1", "fd00::1", "100.64.0.1"):
        assert private.refusal(address, ips(address)) is None, address
    for address in ("169.254.169.254", "224.0.0.1", "0.0.0.0", "240.0.0.1"):
        assert private.refusal(address, ips(address)) is not None, address

    listed = HostGuard(allow_hosts=["images.internal", "*.corp.test", "10.0.0.0/8", "::1"])
    assert listed.refusal("images.internal", ips("169.254.1.1")) is None  # a name: any address
    assert listed.refusal("IMAGES.INTERNAL.", ips("10.0.0.1")) is None
    assert listed.refusal("a.b.corp.test", ips("192.168.0.1")) is None
    assert listed.refusal("corp.test", ips("192.168.0.1")) is not None  # *. means subdomains
    assert listed.refusal("other.test", ips("10.9.9.9")) is None  # inside the network
    assert listed.refusal("other.test", ips("11.0.0.1")) is None  # public anyway
    assert listed.refusal("other.test", ips("192.168.0.1")) is not None
    assert listed.refusal("::1", ips("::1")) is None
    assert listed.refusal("127.0.0.1", ips("127.0.0.1")) is not None


def test_allow_hosts_is_validated_in_the_config() -> None:
    ok = ManifestSource(
        kind="manifest", path="m.csv", allow_hosts=("images.internal", "*.corp", "10.0.0.0/8")
    )
    assert ok.allow_hosts[2] == "10.0.0.0/8" and not ok.allow_private
    for bad in ("http://images.internal", "images.internal:8080", "a b", "10.0.0.0/33x"):
        with pytest.raises(ValidationError, match="allow_hosts"):
            ManifestSource(kind="manifest", path="m.csv", allow_hosts=(bad,))


async def test_a_literal_address_is_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("DNS asked for an IP literal")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert await system_resolver("127.0.0.1", 80) == ips("127.0.0.1")
    assert await system_resolver("[::1]", 80) == ips("::1")


# --------------------------------------------------------------------------- the connector seam


class Recording(httpcore.AsyncNetworkBackend):
    """An inner backend that records where it was asked to connect, and connects nowhere."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.calls.append((host, port))
        raise httpcore.ConnectError("recording only")


class Resolver:
    """A scripted resolver: the answers of successive calls for one name."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        return ips(*answer)


async def test_the_connection_goes_to_the_checked_address_by_address() -> None:
    inner = Recording()
    resolver = Resolver(["127.0.0.1", "::1"])
    backend = GuardedBackend(HostGuard(allow_private=True, resolver=resolver), inner)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("images.test", 8080, timeout=1)
    # Never by name (a second lookup could answer differently): each checked address in turn.
    assert inner.calls == [("127.0.0.1", 8080), ("::1", 8080)]
    assert resolver.calls == 1


async def test_a_refused_resolution_never_reaches_the_socket() -> None:
    inner = Recording()
    backend = GuardedBackend(HostGuard(resolver=Resolver(["127.0.0.1"])), inner)
    with pytest.raises(HostRefused, match="loopback"):
        await backend.connect_tcp("images.test", 80)
    with pytest.raises(HostRefused):
        await backend.connect_unix_socket("/var/run/docker.sock")
    assert inner.calls == []


async def test_an_unresolvable_name_is_a_connect_error() -> None:
    async def nothing(host: str, port: int) -> list[IPAddress]:
        raise OSError("no such name")

    backend = GuardedBackend(HostGuard(resolver=nothing), Recording())
    with pytest.raises(httpcore.ConnectError, match="cannot resolve"):
        await backend.connect_tcp("nowhere.test", 80)


def test_the_loopback_net_is_in_place() -> None:
    from tests.images.safety import _check_address

    assert socket.socket.connect.__name__ == "connect" and socket.socket.connect.__module__ == (
        "tests.images.safety"
    )
    _check_address(("127.0.0.1", 80))
    _check_address(("::1", 80, 0, 0))
    for address in ("169.254.169.254", "10.0.0.1", "example.test"):
        with pytest.raises(AssertionError, match="loopback"):
            _check_address((address, 80))


# --------------------------------------------------------------------------- TLS keeps the name


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_is_negotiated_for_the_name_not_the_address(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "images.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []

    def remember(sock: Any, name: str | None, ctx: Any) -> None:
        names.append(name)

    context.sni_callback = remember
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
            pass  # the client refuses our self-signed certificate: the handshake fails

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    guard = HostGuard(allow_hosts=["images.test"], resolver=Resolver(["127.0.0.1"]))
    client = make_client(timeout_s=5, concurrency=1, trust_env=False, guard=guard)
    async with client:
        with pytest.raises(ImageRejected) as info:
            await fetch_url(
                client, f"https://images.test:{port}/a.png", max_bytes=1000, timeout_s=5, attempts=1
            )
    thread.join(5)
    listener.close()
    # Connected to 127.0.0.1; SNI (and the certificate check that failed) used the name.
    assert names == ["images.test"]
    assert info.value.kind == "network" and "could not connect" in info.value.reason
