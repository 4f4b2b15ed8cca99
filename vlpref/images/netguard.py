"""Outbound requests of the images stage go only where the config allows: no SSRF.

An image URL comes from data (a manifest row, a redirect), so by default the stage refuses any
host that is, or resolves to, a loopback, private, shared (CGNAT), link-local (cloud metadata at
169.254.169.254), multicast, reserved or unspecified address. IPv4 addresses embedded in IPv6
forms are judged as the IPv4 address they carry: IPv4-mapped (`::ffff:127.0.0.1`), 6to4
(`2002::/16`) and NAT64 (`64:ff9b::/96`).

The check and the connection are one step (`GuardedBackend.connect_tcp`): the host is resolved,
every address is checked, and the socket is opened to one of the checked addresses, never by
name, so a DNS answer that changes between a check and the connection (DNS rebinding) cannot
steer it. The TLS handshake and the `Host` header still use the hostname (httpcore keeps the
origin; only the socket is opened by address). `fetch_url` also checks each redirect hop before
it asks for it, which gives the refusal its reason and covers requests sent through a proxy.

Exceptions: `allow_private` accepts loopback, private and shared addresses (never link-local,
multicast, reserved or unspecified); `allow_hosts` accepts hostnames (`images.internal`, or
`*.internal` for its subdomains) whatever they resolve to, and addresses or networks
(`10.0.0.0/8`, `127.0.0.1`) whatever their kind.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import httpcore
import httpx

__all__ = [
    "HostGuard",
    "HostRefused",
    "IPAddress",
    "Resolver",
    "address_kind",
    "guarded_transport",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses the host resolves to (an IP literal resolves to itself).
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: not global, not "private"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Kinds `allow_private` accepts; the others need an explicit `allow_hosts` network.
_PRIVATE_KINDS = frozenset({"loopback", "private", "shared"})


class HostRefused(Exception):
    """A host the policy does not allow; `reason` is safe to publish (no address is named)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def address_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not an ordinary public address (`loopback`, `private`, …), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(embedded)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:  # before "private": Python counts 240.0.0.0/4 as both
        return "reserved"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to (getaddrinfo in a worker thread), in the system's order."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for family, *_rest, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    return found


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class HostGuard:
    """The address policy of one source: which hosts a download may connect to."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allow_hosts: Iterable[str] = (),
        resolver: Resolver = system_resolver,
    ) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self._names: set[str] = set()
        self._suffixes: list[str] = []
        self._networks: list[IPNetwork] = []
        for entry in allow_hosts:
            text = entry.strip().lower().rstrip(".")
            try:
                self._networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if text.startswith("*."):
                self._suffixes.append(text[1:])
            elif text:
                self._names.add(text)

    def name_allowed(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self._names or any(name.endswith(s) for s in self._suffixes)

    def refusal(self, host: str, addresses: list[IPAddress]) -> str | None:
        """Why a connection to `host` at `addresses` is refused, or None when it is allowed."""
        if self.name_allowed(host):
            return None
        literal = _literal(host) is not None
        for ip in addresses:
            kind = address_kind(ip)
            if kind is None or any(ip in net for net in self._networks):
                continue
            if self.allow_private and kind in _PRIVATE_KINDS:
                continue
            article = "an" if kind[0] in "aeiou" else "a"
            what = "is" if literal else "resolves to"
            hint = "allow_private or allow_hosts" if kind in _PRIVATE_KINDS else "allow_hosts"
            return f"refused: {host} {what} {article} {kind} address (set {hint} to allow it)"
        return None

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve `host` and check every address: the ones to connect to.

        Raises `HostRefused` when any address is refused (a name that resolves to a public and a
        private address is refused as a whole), `OSError` when the name does not resolve.
        """
        host = host.strip("[]")
        addresses = await self.resolver(host, port)
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        reason = self.refusal(host, addresses)
        if reason is not None:
            raise HostRefused(reason)
        return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, opening sockets only to addresses the guard has checked."""

    def __init__(self, guard: HostGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self.guard.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError:
            raise httpcore.ConnectError(f"cannot resolve {host}") from None
        error: Exception | None = None
        for ip in addresses:  # by address: what was checked is what is connected to
            try:
                return await self._inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise HostRefused("refused: image downloads do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose every socket goes through the guard.

    httpx builds its pool without a network-backend option, so the pool is replaced after
    construction; the request/response mapping is httpx's own.
    """

    def __init__(self, guard: HostGuard, *, limits: httpx.Limits, trust_env: bool) -> None:
        super().__init__(limits=limits, trust_env=trust_env)
        if not isinstance(self._pool, httpcore.AsyncConnectionPool):  # pragma: no cover
            raise RuntimeError("httpx's transport changed: cannot guard its connections")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=trust_env),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )


def guarded_transport(
    guard: HostGuard, *, limits: httpx.Limits, trust_env: bool = True
) -> httpx.AsyncHTTPTransport:
    """An httpx transport that connects only to addresses `guard` allows (checked per socket)."""
    return _GuardedTransport(guard, limits=limits, trust_env=trust_env)
