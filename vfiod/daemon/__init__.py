"""The daemon: `serve` wires the parts together and starts them in numbered steps.

The parts: `service.Service` (the lease façade the bus edge calls),
`callers.Callers` (who is calling), `objects.ObjectTree` (the bus objects),
`hotplug.Hotplug` (what uevents mean for leases) and `snapshot.Snapshot` (the
host as last scanned)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile

from dbus_next import DBusError, Message, MessageType
from dbus_next.constants import RequestNameReply

from .. import early
from ..wire import BUS_NAME, bus_args
from .connection import VfiodBus, install_caller_tracking
from ..backends import load_backends
from ..leases.verify import reconcile_at_start
from ..errors import BackendFailed, InvalidArgument, PermissionDenied, PolicyError, VfiodError
from ..policy import KNOWN_BACKENDS, PolicyStore
from ..state import Journal
from ..statedir import MACHINE_ID, StateDirLock, machine_host, simulated_host
from ..sysfs import Kernel, Roots, SysfsReader
from . import journald
from .claims import apply_claims, publish_early
from .notify import sd_notify
from .service import Service

__all__ = ["Service", "make_kernel", "sd_notify", "serve"]

log = logging.getLogger("vfiod")

DEFAULT_POLICY_DIR = "/etc/vfiod/policy.d"
DEFAULT_STATE_DIR = "/var/lib/vfiod"


def resolve_dirs(args: argparse.Namespace) -> None:
    """Fill in the directories not given.  A simulation never defaults to the production
    ones: its state and policy directories live in its --sim-dir (a new temporary one
    if none is given), and it refuses the production state directory even when named."""
    if not args.simulate:
        args.state_dir = args.state_dir or DEFAULT_STATE_DIR
        args.policy_dir = args.policy_dir or DEFAULT_POLICY_DIR
        return
    production = os.path.realpath(DEFAULT_STATE_DIR)
    for given in (args.state_dir, args.sim_dir):
        if given is not None and os.path.commonpath((os.path.realpath(given), production)) == production:
            raise InvalidArgument(f"a simulated host never uses {DEFAULT_STATE_DIR} (the journal of this "
                                  f"machine's leases), and {given} is there: give another directory")
    args.sim_dir = os.path.abspath(args.sim_dir or tempfile.mkdtemp(prefix="vfiod-sim-"))
    if args.state_dir is None:
        args.state_dir = os.path.join(args.sim_dir, "state")
    if args.policy_dir is None:
        args.policy_dir = os.path.join(args.sim_dir, "policy.d")
        os.makedirs(args.policy_dir, mode=0o755, exist_ok=True)


def make_kernel(args: argparse.Namespace) -> tuple[Kernel, str | None]:
    """The real kernel below the given roots, or a simulated host laid out in --sim-dir
    (`resolve_dirs` chose it)."""
    if not args.simulate:
        roots = Roots(args.sysfs_root, args.proc_root, args.dev_root)
        SysfsReader(roots).require_pci()
        return Kernel(roots), None
    from ..sim import hosts, simdir
    from ..sim.kernel import SimKernel

    spec = hosts.spec(args.simulate)
    sim_dir = args.sim_dir
    simdir.claim(sim_dir, spec)
    root = os.path.join(sim_dir, "host")
    if os.path.isdir(root):
        roots = Roots(os.path.join(root, "sys"), os.path.join(root, "proc"), os.path.join(root, "dev"),
                      run=os.path.join(root, "run/vfiod"), etc=os.path.join(root, "etc"))
    else:
        roots = hosts.build_spec(spec, root)
    kernel = SimKernel.for_spec(spec, roots)
    kernel.write_log = os.path.join(sim_dir, "writes.log")
    return kernel, sim_dir


def _is_owner_gone(msg: Message) -> str | None:
    """The unique name a NameOwnerChanged signal says has left the bus, if it says so."""
    if (msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged"
            and msg.interface == "org.freedesktop.DBus" and msg.sender == "org.freedesktop.DBus"):
        name, _old, new = msg.body
        if isinstance(name, str) and name.startswith(":") and not new:
            return name
    return None


async def serve(args: argparse.Namespace, machine_id: str = MACHINE_ID) -> int:
    """Run the daemon: the directories, the state directory's lock (one daemon per
    journal), then `_serve`.  `machine_id` is the file that names this machine."""
    _setup_logging()
    if not args.simulate and os.geteuid() != 0:
        raise PermissionDenied("vfiod rebinds drivers and must run as root "
                               "(--simulate runs it on a simulated host instead)")
    resolve_dirs(args)
    lock = StateDirLock.acquire(args.state_dir)
    try:
        host = simulated_host(args.simulate, args.sim_dir) if args.simulate else machine_host(machine_id)
        return await _serve(args, host)
    finally:
        lock.release()


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else
                        "%(asctime)s %(name)s: %(message)s")
    # Audit records as structured journal entries where journald runs (the log line elsewhere).
    root_handlers = logging.getLogger().handlers
    journald.send_audit_to_journal(logging.getLogger("vfiod.audit"), root_handlers[0] if root_handlers else None)


async def _serve(args: argparse.Namespace, host: str) -> int:
    loop = asyncio.get_running_loop()

    # Step 1: the kernel (real, or a simulated host), the backends and the policy.
    kernel, sim_dir = make_kernel(args)
    if sim_dir:
        log.info("simulated host %s in %s", args.simulate, sim_dir)
    backends = load_backends()
    # Policy may name every backend vfiod knows, loaded or not (a request for one that
    # is not loaded is refused then, with its name); plugins may add more names.
    store = PolicyStore(args.policy_dir, backends=tuple(dict.fromkeys((*KNOWN_BACKENDS, *backends))))
    try:
        store.reload()
    except PolicyError as e:
        log.error("policy not loaded, denying every request until it is fixed: %s", e)

    # Step 2: the journal, the service and its event feed; the early claims for udev.
    journal = Journal(os.path.join(args.state_dir, "state.db"), host=host)
    service = Service(kernel, journal, store, backends)
    service.early_dir = os.path.join(args.state_dir, early.DIRECTORY)
    publish_early(store, service.early_dir)
    service.loop = loop
    if sim_dir:       # the simulated kernel sends its uevents straight to the handler
        from ..sim.kernel import SimKernel
        assert isinstance(kernel, SimKernel)     # make_kernel made one: there is a sim_dir
        kernel.event_sink = lambda *event: loop.call_soon_threadsafe(service.on_pci_event, *event)
    else:
        from .. import udev
        service.monitor = udev.watch(loop, service.on_pci_event)

    # Step 3: the bus connection (no name yet: nobody can call before step 6).
    try:
        bus = VfiodBus(negotiate_unix_fd=True, **bus_args(args.bus))
        await bus.connect()
    except Exception as e:      # no bus, a bad address, no session bus, refused authentication
        journal.close()
        raise BackendFailed(f"cannot reach the {args.bus} bus: {str(e).strip() or type(e).__name__}") from None
    service.attach(bus)
    install_caller_tracking(bus)
    bus_daemon = await service.callers.bus_daemon_pid()
    if bus_daemon is not None:
        service.manager.protected_pids.add(bus_daemon)

    def on_message(msg: Message) -> None:
        gone = _is_owner_gone(msg)
        if gone:
            bus.forget_sender(gone)
            asyncio.ensure_future(service.owner_gone(gone))
        return None
    bus.add_message_handler(on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"]))

    # Step 4: reconcile the journal with the kernel before anyone can ask for anything.
    alive = set()
    for lease in journal.leases():
        if lease.owner and await service.callers.present(lease.owner):
            alive.add(lease.owner)
    service.manager.owner_alive = lambda lease: lease.owner in alive
    # Each lease is judged against the devices there now first (vfiod.leases.identity).
    for ended in await service._run(reconcile_at_start, service.manager):
        log.info("lease %s of uid %s ended on start: %s", ended.lease.id, ended.lease.uid, ended.reason)

    # Step 5: the boot claims, then the objects.
    await apply_claims(service.manager, store, service.snapshot)
    service.export_all()

    # Step 6: the name, then tell systemd.
    try:
        reply = await bus.request_name(BUS_NAME)
    except DBusError as e:          # the bus's policy says who may own the name: root, as installed
        raise PermissionDenied(
            f"the bus does not let uid {os.getuid()} own {BUS_NAME} ({e.text}): its D-Bus policy "
            f"(org.vfiod1.conf) gives the name to root; run vfiod as root, or on a bus whose policy "
            f"lets this user own it") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("cannot own %s on the bus (%s): is another vfiod running?", BUS_NAME, reply)
        return 1
    service.update_status()
    sd_notify("READY=1")
    _give_back_free_memory()
    log.info("ready on %s: %d groups, %d leases", args.bus, len(service.host.groups), len(journal.leases()))
    service.objects.prepare_soon()      # GetManagedObjects' entries, between calls, for the first client

    # Step 7: serve until SIGTERM; SIGHUP reloads the policy; expiry every second.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def hup() -> None:
        try:
            await service.reload_policy(None)
        except PolicyError:
            pass            # said in the log; the last good policy stays
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(hup()) and None)

    async def expire() -> None:
        while True:
            await asyncio.sleep(1)
            expired = await service._run(service.manager.expire_due)
            if expired:
                service.refresh_soon([e.lease.group for e in expired])
            await service.turn_ladders()
            service.update_status()      # hotplug and rescans change the groups too
    ticker = asyncio.ensure_future(expire())
    watchdog = asyncio.ensure_future(feed_watchdog())
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(bus.wait_for_disconnect())
    await asyncio.wait((stopped, lost), return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if lost.done():
        # The connection is gone (the bus daemon stopped, or the socket failed): this
        # process can serve nobody any more, so it ends and says so; the journal keeps
        # every lease, and the service manager starts a new one that reconciles.
        err = lost.exception() if not lost.cancelled() else None
        log.error("lost the %s bus connection (%s); exiting so the service manager restarts vfiod",
                  args.bus, str(err).strip() if err else "closed by the bus")
        status = 1
    stopped.cancel()
    lost.cancel()

    # Step 8: stop. Non-persistent leases end with the daemon; persistent ones stay recorded.
    # After a lost connection every lease stays recorded: the next start reconciles them
    # (their clients lost the bus too, so their plain leases end there).
    ticker.cancel()
    watchdog.cancel()
    sd_notify("STOPPING=1")
    if status == 0:
        for lease in journal.leases():
            if not lease.persistent and lease.state == "granted":
                try:
                    await service._run(service.manager.release, lease.id, None, "shutdown")
                except VfiodError as e:
                    log.error("ending lease %s on shutdown: %s", lease.id, e)
        await _finish_ladders(service)
        bus.disconnect()
    service.stop()
    journal.close()
    return status


#: The longest a stopping vfiod runs the revoke ladder of its leases (systemd's stop timeout is 90 s).
SHUTDOWN_LADDER = 45.0


async def _finish_ladders(service: Service) -> None:
    """On stop: turn the revoke ladder until every lease on it ended, or until its holders'
    grace and the SIGKILL after it are over (capped at `SHUTDOWN_LADDER`); what is left
    stays ``revoking`` in the journal, and the next start resumes it."""
    manager = service.manager
    waiting = [lease for lease in manager.leases() if lease.state == "revoking"]
    if not waiting:
        return
    until = min(max(lease.deadline for lease in waiting) + manager.kill_after + 2.0,
                manager.clock() + SHUTDOWN_LADDER)
    log.info("stopping: %d lease(s) on the revoke ladder; waiting for them up to %.0f s", len(waiting),
             max(0.0, until - manager.clock()))
    while manager.clock() < until and any(lease.state == "revoking" for lease in manager.leases()):
        await service._run(manager.advance_all)
        await asyncio.sleep(0.5)
    for lease in manager.leases():
        if lease.state == "revoking":
            log.warning("lease %s stays on the revoke ladder (%s); the next start goes on with it", lease.id,
                        lease.revoke_reason)


def _give_back_free_memory() -> None:
    """Return the start-up scan's freed heap to the system (glibc keeps it otherwise:
    about 10 MB on a 4,096-function host)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


def watchdog_interval() -> float | None:
    """Half the service manager's watchdog timeout, if it set one for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def feed_watchdog() -> None:
    """Tell the service manager the event loop is alive, twice per watchdog timeout: a
    loop that stops turning (wedged on a call) stops feeding, and systemd restarts vfiod."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)
