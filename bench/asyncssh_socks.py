"""asyncssh's own SOCKS forwarder, as a user would run it: one connection and
``conn.forward_socks()``. The benchmark's third subject.

Prints one JSON line once listening: ``{"port": ..., "cipher": ..., "loop": ...}``, then
serves until SIGTERM or SIGINT.

    python bench/asyncssh_socks.py --port 2222 --key KEY --known-hosts KNOWN \
        --user me 127.0.0.1 [--cipher aes128-gcm@openssh.com] [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
from typing import Any

import asyncssh


async def serve(args: argparse.Namespace, loop_name: str) -> None:
    options: dict[str, Any] = {
        "port": args.port,
        "username": args.user,
        "client_keys": [args.key],
        "known_hosts": args.known_hosts,
        "config": [],  # no ~/.ssh/config: every subject sees the same settings
        "agent_path": None,
    }
    if args.cipher:
        options["encryption_algs"] = [args.cipher]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with asyncssh.connect(args.host, **options) as conn:
        listener = await conn.forward_socks("127.0.0.1", 0)
        ready = {
            "port": listener.get_port(),
            "cipher": conn.get_extra_info("send_cipher"),
            "loop": loop_name,
            "asyncssh": asyncssh.__version__,
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        closed = asyncio.ensure_future(conn.wait_closed())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--cipher", default="", help="force this cipher (default: asyncssh's)")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (pytunnel runs on uvloop; use the same for a like-for-like relay)",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args, "uvloop"))
    else:
        asyncio.run(serve(args, "asyncio"))


if __name__ == "__main__":
    main()
