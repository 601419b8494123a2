"""What vfioctl's bus commands share: a client connection for one command, and user names."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from ..client import Client


def run_client(args: argparse.Namespace, coro_fn: Callable[[Client], Awaitable[int]]) -> int:
    from ..client import Client

    async def main() -> int:
        client = await Client(args.bus, timeout=args.timeout).connect()
        try:
            return await coro_fn(client)
        finally:
            client.close()
    return asyncio.run(main())


def user_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
