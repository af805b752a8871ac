"""A fast echo server (uvloop Protocol) used as the upstream app by the demo and the benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import socket

from pyproxy.addresses import parse_address
from pyproxy.eventloop import new_event_loop


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(address: str) -> None:
    target = parse_address(address)
    loop = asyncio.get_running_loop()
    if target.is_unix:
        server = await loop.create_unix_server(_Echo, target.path)
    else:
        server = await loop.create_server(_Echo, target.host, target.port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.listen))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
