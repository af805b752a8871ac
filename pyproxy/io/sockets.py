"""Socket setup for the data path: listening sockets, upstream connects, original destinations."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from pyproxy.addresses import Address

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
UNIX_SOCKET_MODE = 0o660
# Unix listening sockets bound by the master before it forks workers (path -> socket):
# a Unix socket has no SO_REUSEPORT, so the workers share one socket instead of each binding.
_shared_unix: dict[str, socket.socket] = {}


def listen(
    address: Address, transparent: bool = False, reuse_port: bool = True, backlog: int = 1024
) -> socket.socket:
    """A non-blocking listening socket; SO_REUSEPORT so several workers can share the address."""
    if address.is_unix:
        # In a forked worker: take the inherited socket (the master closes its own copy).
        shared = _shared_unix.pop(address.path, None)
        if shared is not None:
            return shared
        return _listen_unix(address.path, backlog)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            # v4 and v6 listeners are separate sockets so the original-destination lookup knows its family.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            level, option = (
                (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
                if address.family == socket.AF_INET6
                else (socket.SOL_IP, IP_TRANSPARENT)
            )
            sock.setsockopt(level, option, 1)
        sock.bind(address.sockaddr())
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def share_unix_listeners(addresses: list[Address], backlog: int = 1024) -> None:
    """Bind these Unix addresses now (in the master) so workers forked afterwards share them."""
    try:
        for address in addresses:
            if address.path not in _shared_unix:
                _shared_unix[address.path] = _listen_unix(address.path, backlog)
    except BaseException:
        release_shared_unix(unlink=True)
        raise


def release_shared_unix(unlink: bool) -> None:
    """The master's copies: close them once workers hold theirs (unlink if none ever will)."""
    for path, sock in _shared_unix.items():
        sock.close()
        if unlink:
            try:
                os.unlink(path)
            except OSError:
                pass
    _shared_unix.clear()


def _listen_unix(path: str, backlog: int) -> socket.socket:
    _check_socket_directory(path)
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the file is born 0660: never a window where others can connect
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _check_socket_directory(path: str) -> None:
    """Refuse a directory anyone may rename or delete entries in (world-writable, no sticky bit,
    like /tmp has): another user could swap our socket for theirs and receive the app's traffic."""
    directory = os.path.dirname(path) or "."
    mode = os.stat(directory).st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise OSError(
            errno.EPERM,
            f"{directory} is world-writable without the sticky bit (mode "
            f"{stat.S_IMODE(mode):04o}): another user could replace {os.path.basename(path)}; "
            "use a directory only the proxy (and the app's group) can write",
        )


def _remove_stale_unix_socket(path: str) -> None:
    """Replace a socket file left by a dead process; refuse to steal a live one or clobber a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")


def connect_nonblocking(target: Address, source_host: str = "") -> tuple[socket.socket, int]:
    """Start a non-blocking connect; return the socket and the errno connect_ex gave."""
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if not target.is_unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source_host:
                try:
                    sock.bind((source_host, 0))
                except OSError as exc:
                    # ::6 exists only once capture has added it to lo; without it, deliver unmarked.
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
        code = sock.connect_ex(target.sockaddr())
    except BaseException:
        sock.close()
        raise
    return sock, code


def original_destination(sock: socket.socket) -> tuple[Address, bool]:
    """Where the client meant to connect, and whether NAT redirected it here.

    Under REDIRECT the answer is SO_ORIGINAL_DST (conntrack's pre-NAT address);
    under TPROXY, or for a direct connection, it is the accepted socket's
    local address. conntrack answers SO_ORIGINAL_DST for every tracked
    connection, NATed or not, so "redirected" means the original destination
    differs from where the connection actually landed.
    """
    local_host, local_port = sock.getsockname()[:2]
    local = Address(host=local_host, port=local_port)
    family = sock.family
    try:
        if family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            original = Address(host=socket.inet_ntop(socket.AF_INET, packed), port=port)
        elif family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            original = Address(host=socket.inet_ntop(socket.AF_INET6, packed), port=port)
        else:
            return local, False
    except OSError as exc:
        # ENOENT: no conntrack entry (TPROXY without NAT, or no netfilter at all).
        if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
            raise
        return local, False
    return original, original != local


def local_port(sock: socket.socket) -> int | None:
    """The port a connection arrived on; None on a Unix socket."""
    return None if sock.family == socket.AF_UNIX else sock.getsockname()[1]


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), so a reset on one side is seen as a reset on the other."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
