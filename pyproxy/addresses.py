"""Parse and format the endpoint addresses users write: host:port, [v6]:port, unix:/path."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP (IPv4/IPv6) or Unix-domain endpoint."""

    host: str = ""
    port: int = 0
    path: str = ""  # set for Unix-domain sockets only
    # Addresses key the upstream pools, looked up twice per request: hash once.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.host, self.port, self.path)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def family(self) -> int:
        if self.path:
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def sockaddr(self) -> str | tuple:
        if self.path:
            return self.path
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse `host:port`, `[v6]:port` or `unix:/path`; raise ValueError with a reason."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected an address like 127.0.0.1:8080, [::1]:8080 or unix:/path")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        return Address(path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_text}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address (names are not resolved)") from None
        ip = ipaddress.ip_address("127.0.0.1")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port_text!r}")
    return Address(host=str(ip), port=int(port_text))
