"""`vfioctl reload`: root asks vfiod to read its policy again, or with --dry-run what it would do."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .common import EXIT_OK, EXIT_USAGE, print_json
from .talk import run_client, user_name

if TYPE_CHECKING:
    from ..client import Client


def cmd_reload(args: argparse.Namespace) -> int:
    """Root: ask vfiod to read its policy directory again; say whether it took the new policy
    and which leases it revokes (with --dry-run: what it would do, changing nothing)."""
    from ..errors import InvalidArgument as Refused      # a broken policy (PolicyError) travels as this
    from ..policy import PolicyStore

    dry_run = bool(getattr(args, "dry_run", False))      # `vfiod reload` (ExecReload) has no --dry-run

    async def go(client: Client) -> int:
        errors, revoked = (await client.call("/org/vfiod1", "org.vfiod1.Manager", "PreviewPolicy")).body[0]
        if not dry_run:           # vfiod judges (and logs) the reload itself, errors and all
            try:
                await client.call("/org/vfiod1", "org.vfiod1.Manager", "ReloadPolicy")
                errors = []
            except Refused as e:
                lines = str(e).splitlines()
                errors = lines[1:] if lines and lines[0].startswith(PolicyStore.REFUSED) else lines
        rows = [{"lease": lease_id, "uid": uid, "user": user_name(uid), "reason": why}
                for lease_id, uid, why in revoked]
        if args.json:
            print_json("reload", taken=not errors and not dry_run, dry_run=dry_run, errors=errors,
                       revokes=[] if errors else rows)
            return EXIT_USAGE if errors else EXIT_OK
        if errors:
            what = "would be refused; vfiod keeps the policy it has" if dry_run else \
                "was refused; vfiod keeps the policy it had"
            print(f"vfioctl: the new policy {what} ({len(errors)} error{'s' if len(errors) != 1 else ''}):",
                  file=sys.stderr)
            for line in errors:
                print(f"  {line}", file=sys.stderr)
            return EXIT_USAGE
        print("The new policy loads; nothing was changed (--dry-run)." if dry_run
              else "The new policy is in force.")
        if rows:
            print(f"It {'would revoke' if dry_run else 'revokes'} {len(rows)} "
                  f"lease{'s' if len(rows) != 1 else ''} it no longer allows:")
            for r in rows:
                print(f"  {r['lease']}  {r['user']}: {r['reason']}")
        return EXIT_OK
    return run_client(args, go)
