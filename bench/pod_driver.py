"""The profile's load driver: exchanges with a direct and a proxied echo, here or inside a client pod.

`Pair` drives the two echoes from this process. `PodPair` starts this module
as a process inside a client pod (`python -m pyproxy.bench.pod_driver`), so
the measured path is a pod's: the client's veth, the bridge, the echo pod's
capture rules and its sidecar, as the validation's load takes it. It sends
one JSON command per line on the process's stdin and reads one JSON answer
per line from its stdout; the process runs a `Pair` on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pyproxy.bench.driver import EXCHANGERS, drive, drive_paired, wait_ready
from pyproxy.iptables.netns import Pod


class Pair:
    """Exchanges of `size` bytes with a direct and a proxied echo of `protocol`, from this process."""

    def __init__(self, protocol: str, direct: str, proxied: str, size: int) -> None:
        make = EXCHANGERS[protocol]
        self.direct = make(direct, size)
        self.proxied = None
        try:
            self.proxied = make(proxied, size)
            # The first bytes at once: a capture listener that hears nothing on a new connection
            # for its detect timeout takes it for a server-first protocol and relays it as opaque
            # TCP, with no HTTP parsing and no filter.
            self.direct.exchange()
            self.proxied.exchange()
        except BaseException:
            self.close()
            raise

    def paired(
        self, seconds: float, rate: float | None = None, warmup: int = 0
    ) -> tuple[list[int], list[int], float]:
        """Round trips alternating direct and proxied (ns each), and the wall time they took (s)."""
        t0 = time.monotonic()
        direct, proxied = drive_paired(self.direct, self.proxied, seconds, rate=rate, warmup=warmup)
        return direct, proxied, time.monotonic() - t0

    def paced(self, seconds: float, rate: float) -> tuple[int, float]:
        """Proxied exchanges started `rate` times per second: how many, in how much wall time (s)."""
        t0 = time.monotonic()
        done = drive(self.proxied, seconds, rate=rate, warmup=0)
        return len(done), time.monotonic() - t0

    def close(self) -> None:
        self.direct.close()
        if self.proxied is not None:
            self.proxied.close()


class PodPair:
    """A `Pair` run by a driver process inside `pod`; the same methods, over its stdin and stdout."""

    def __init__(self, pod: Pod, protocol: str, direct: str, proxied: str, size: int) -> None:
        argv = [sys.executable, "-m", "pyproxy.bench.pod_driver", "--protocol", protocol,
                "--direct", direct, "--proxied", proxied, "--size", str(size)]  # fmt: skip
        self.proc = pod.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self._answer()  # ready: both echoes answered once
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            code = self.proc.wait(timeout=10)
            raise RuntimeError(f"the driver in the client pod exited with {code}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the driver in the client pod: {answer['error']}")
        return answer

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._answer()

    def paired(
        self, seconds: float, rate: float | None = None, warmup: int = 0
    ) -> tuple[list[int], list[int], float]:
        got = self._ask({"op": "paired", "seconds": seconds, "rate": rate, "warmup": warmup})
        return got["direct"], got["proxied"], got["wall_s"]

    def paced(self, seconds: float, rate: float) -> tuple[int, float]:
        got = self._ask({"op": "paced", "seconds": seconds, "rate": rate})
        return got["count"], got["wall_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]  # end of commands: it exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc.stdout.close()  # type: ignore[union-attr]


def serve(pair: Pair, commands, answers) -> None:
    """Answer each command line with one JSON line, until the commands end."""
    for line in commands:
        command = json.loads(line)
        try:
            if command["op"] == "paired":
                direct, proxied, wall = pair.paired(
                    command["seconds"], command.get("rate"), command.get("warmup", 0)
                )
                answer: dict = {"direct": direct, "proxied": proxied, "wall_s": wall}
            elif command["op"] == "paced":
                count, wall = pair.paced(command["seconds"], command["rate"])
                answer = {"count": count, "wall_s": wall}
            else:
                answer = {"error": f"unknown command {command['op']!r}"}
        except (OSError, ConnectionError, RuntimeError) as exc:
            answer = {"error": str(exc)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", choices=sorted(EXCHANGERS), required=True)
    parser.add_argument("--direct", required=True, help="the echo without a sidecar")
    parser.add_argument("--proxied", required=True, help="the echo behind its pod's sidecar")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        for address in (args.direct, args.proxied):
            wait_ready(args.protocol, address, timeout=args.ready_timeout)
        pair = Pair(args.protocol, args.direct, args.proxied, args.size)
    except (OSError, ConnectionError, RuntimeError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    try:
        serve(pair, sys.stdin, sys.stdout)
    finally:
        pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
