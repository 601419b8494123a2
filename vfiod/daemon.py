"""The daemon: wiring.  Loads policy, reconciles the journal, applies claims,
exports the bus objects, then tells systemd it is ready.

`Service` is what the bus edge calls: every method takes the `Caller` the
edge resolved from the bus, runs the blocking domain work in a thread, and
keeps the exported objects in step with the host.
"""

from __future__ import annotations

import asyncio
import logging

import attrs
import os
import signal
import socket
import sys
import tempfile

from dbus_next import Message, MessageType
from dbus_next.constants import RequestNameReply

from . import bus as busmod
from .address import PciAddress
from .backends import load_backends
from .errors import InvalidArgument, PermissionDenied, PolicyError, VfiodError
from .leases import Ended, LeaseManager
from .pciids import PciIds
from .policy import Caller, PolicyStore, format_size
from .state import Journal
from .sysfs import Kernel, Roots
from .topology import Host

log = logging.getLogger("vfiod")

DEFAULT_POLICY_DIR = "/etc/vfiod/policy.d"
DEFAULT_STATE_DIR = "/var/lib/vfiod"


def sd_notify(state: str) -> bool:
    """Send `state` to systemd's notify socket, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:       # the manager went away: nothing to tell, and no reason to fail
        log.warning("cannot notify the service manager (%s): %s", state.split("=")[0], e)
        return False
    return True


class Service:
    def __init__(self, kernel: Kernel, journal: Journal, policy_store: PolicyStore, backends: dict):
        self.kernel = kernel
        self.journal = journal
        self.policy_store = policy_store
        self.backends = backends
        self.names = PciIds()
        self.bus: busmod.VfiodBus | None = None
        self.manager = LeaseManager(kernel, journal, lambda: self.policy_store.current, backends,
                                    on_ended=self._ended_in_thread)
        self.host: Host = self.manager.scan()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._creds: dict[str, Caller] = {}
        self._groups: dict[int, busmod.GroupInterface] = {}
        self._published: dict[int, dict] = {}
        self._dirty: set[int] = set()
        self._ending: set[str] = set()
        self._exported = False
        self.scans = {"full": 0, "partial": 0, "events": 0}
        self._devices: dict[PciAddress, busmod.DeviceInterface] = {}
        self._leases: dict[str, busmod.LeaseInterface] = {}
        self.manager_iface = busmod.ManagerInterface(self)

    # ------------------------------------------------------------ callers

    async def caller_of(self, msg: Message | None) -> Caller:
        if msg is None or not msg.sender:
            raise PermissionDenied("cannot tell who is calling")
        cached = self._creds.get(msg.sender)
        if cached:
            return cached
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionCredentials",
            signature="s", body=[msg.sender]))
        if reply.message_type != MessageType.METHOD_RETURN:
            raise PermissionDenied(f"cannot tell who {msg.sender} is")
        creds = {k: v.value for k, v in reply.body[0].items()}
        uid = creds.get("UnixUserID")
        if uid is None:
            raise PermissionDenied(f"the bus does not know the uid of {msg.sender}")
        gids = creds.get("UnixGroupIDs")
        caller = Caller(uid=int(uid), gids=frozenset(gids) if gids is not None else Caller.from_uid(uid).gids,
                        pid=creds.get("ProcessID"))
        self._creds[msg.sender] = caller
        return caller

    def sender(self) -> str | None:
        msg = busmod._current_msg.get()
        return msg.sender if msg else None

    # ------------------------------------------------------------ blocking work

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _refresh(self, groups=None) -> None:
        """Rescan (only `groups`, if given) and publish what changed.

        A partial rescan keeps each group's isolation from the last whole scan:
        explaining a group needs the bridges above it, which may sit in other groups."""
        old = self.host
        if groups is None:
            self.scans["full"] += 1
            new = self.manager.scan()
        else:
            self.scans["partial"] += 1
            part = self.manager.scan_groups(groups)
            devices, group_map = dict(old.devices), dict(old.groups)
            devices.update(part.devices)
            for n, g in part.groups.items():
                prev = old.groups.get(n)
                group_map[n] = g if prev is None else attrs.evolve(
                    g, isolation=prev.isolation, isolation_text=prev.isolation_text, links=prev.links)
            for n in groups:               # devices that left these groups (removed, say)
                members = set(part.groups[n].members) if n in part.groups else set()
                for a, d in old.devices.items():
                    if d.group == n and a not in members:
                        devices.pop(a, None)
                if n not in part.groups:
                    group_map.pop(n, None)
            new = attrs.evolve(old, devices=devices, groups=group_map)
        self.host = new
        if self.loop:
            self.loop.call_soon_threadsafe(self._publish, old, new)

    def _publish(self, old: Host, new: Host) -> None:
        """PropertiesChanged for what changed, and only that; objects for devices that came or went."""
        if self.bus and self._exported:
            for n in new.groups.keys() - self._groups.keys():
                self._groups[n] = iface = busmod.GroupInterface(self, n)
                self.bus.export(busmod.group_path(n), iface)
            for addr in new.devices.keys() - self._devices.keys():
                self._devices[addr] = iface = busmod.DeviceInterface(self, addr)
                self.bus.export(busmod.device_path(addr), iface)
            for addr in self._devices.keys() - new.devices.keys():
                self.bus.unexport(busmod.device_path(addr), self._devices.pop(addr))
            for n in self._groups.keys() - new.groups.keys():
                self.bus.unexport(busmod.group_path(n), self._groups.pop(n))
        for n, iface in self._groups.items():
            g_old, g_new = old.groups.get(n), new.groups.get(n)
            if g_new is None:
                continue
            changed = {"State": self.group_state(n), "Lease": iface.Lease}
            if g_old is None or g_old.viable != g_new.viable:
                changed["Viable"] = g_new.viable
            if g_old is None or g_old.blockers != g_new.blockers:
                changed["Blockers"] = [[str(a), why] for a, why in g_new.blockers]
            last = self._published.get(n)
            if last != changed or "Viable" in changed or "Blockers" in changed:
                self._published[n] = changed
                iface.emit_properties_changed(changed)
        for addr, iface in self._devices.items():
            d_old, d_new = old.devices.get(addr), new.devices.get(addr)
            if d_new is not None and (d_old is None or d_old.driver != d_new.driver):
                iface.emit_properties_changed({"Driver": d_new.driver or "",
                                               "OriginalDriver": self.original_driver(addr) or ""})

    # ------------------------------------------------------------ hotplug

    def on_pci_event(self, action: str, addr: PciAddress, driver: str | None) -> None:
        """A PCI uevent (from udev, the kernel, or the simulated kernel), on the loop.

        A leased device that goes away ends its lease (``removed``); a leased
        device that changes driver while vfiod is not moving it ends its lease
        (``tampered``), which puts the group back as it was before the lease.
        The snapshot is refreshed for the touched groups only, once per burst."""
        self.scans["events"] += 1
        lease, held = self._lease_holding(addr)
        group = lease.group if lease else self._group_of(addr)
        if (lease is not None and lease.state == "granted" and lease.id not in self._ending
                and not self.manager.is_busy(lease.group)):
            if action == "remove" or not self.kernel.exists(addr):
                self._end_soon(lease, "removed", f"{addr} was removed")
            elif action in ("bind", "unbind"):
                # A removal unbinds first: judge a driver change once the events behind it
                # had time to arrive, so a removed device is not mistaken for a tampered one.
                asyncio.get_running_loop().call_later(self.TAMPER_GRACE, self._judge_driver_change,
                                                      lease.id, addr, held)
        if group is not None:
            if not self._dirty:
                asyncio.get_running_loop().call_soon(self._flush_dirty)
            self._dirty.add(group)

    TAMPER_GRACE = 0.25      # seconds between a leased device's unbind event and the verdict

    def _judge_driver_change(self, lease_id: str, addr: PciAddress, held) -> None:
        lease = self.journal.lease(lease_id)
        if (lease is None or lease.state != "granted" or lease.id in self._ending
                or self.manager.is_busy(lease.group)):
            return
        if not self.kernel.exists(addr):
            self._end_soon(lease, "removed", f"{addr} was removed")
            return
        backend = self.backends.get(lease.backend)
        want = None if held.role == "bridge" or backend is None else backend.driver
        have = self.kernel.driver_of(addr)
        if have != want:
            self._end_soon(lease, "tampered",
                           f"{addr} moved to {have or 'no driver'} behind vfiod's back (lease keeps it on "
                           f"{want or 'no driver'})")

    def _flush_dirty(self) -> None:
        groups, self._dirty = sorted(self._dirty), set()
        self._refresh_soon(groups)

    def _group_of(self, addr: PciAddress) -> int | None:
        dev = self.host.devices.get(addr)
        if dev is not None and dev.group is not None:
            return dev.group
        return self.manager.group_of(addr)

    def _lease_holding(self, addr: PciAddress):
        return self.journal.holdings().get(str(addr), (None, None))

    def _end_soon(self, lease, reason: str, why: str) -> None:
        self._ending.add(lease.id)
        log.warning("lease %s of uid %s ends (%s): %s", lease.id, lease.uid, reason, why)

        def end():
            try:
                self.manager.release(lease.id, None, reason)
            except VfiodError as e:
                log.error("ending lease %s (%s): %s", lease.id, reason, e)
            finally:
                self._ending.discard(lease.id)
            self._refresh([lease.group])
        asyncio.get_running_loop().run_in_executor(None, end)

    def _refresh_soon(self, groups=None) -> None:
        """Refresh after the reply has gone out: callers do not wait for the rescan."""
        asyncio.get_running_loop().run_in_executor(None, self._refresh, groups)

    # ------------------------------------------------------------ the Manager

    async def request(self, caller: Caller, target: str, backend: str, options: dict):
        if not isinstance(target, str) or len(target) > 256:
            raise InvalidArgument("the target is too long")
        owner = self.sender()
        lease = await self._run(self.manager.request, caller, target, backend, options, owner)
        if lease.memlock and caller.pid:
            # The policy's grant goes to the calling process (vfioctl lease -- CMD: CMD inherits it),
            # before the lessee pins any memory.
            try:
                got = self.kernel.grant_memlock(caller.pid, lease.memlock)
                log.info("lease %s: RLIMIT_MEMLOCK of pid %s is now %s", lease.id, caller.pid, got)
            except VfiodError as e:
                log.error("lease %s: %s", lease.id, e)
        self._refresh_soon([lease.group])
        self._export_lease(lease)
        self.manager_iface.LeaseGranted(busmod.lease_path(lease.id))
        return lease

    async def explain(self, caller: Caller, target: str) -> str:
        # Drivers and blockers fresh from the target's group; why the group is shared
        # from the last whole scan (it needs the bridges above, in other groups).
        policy = self.policy_store.current
        host = await self._run(self.manager.host_for, target, policy)
        resolved = policy.resolve(host, target)
        g = host.groups[resolved.group]
        whole = self.host.groups.get(g.number)
        if whole is not None and whole.members == g.members:
            g = attrs.evolve(g, isolation=whole.isolation, isolation_text=whole.isolation_text)
        else:
            host = await self._run(self.manager.scan)     # the topology changed: explain it afresh
            g = host.groups[resolved.group]
        lines = [f"IOMMU group {g.number}: {', '.join(map(str, g.members))}"]
        if not target.startswith("group:") and len(g.members) > 1:
            lines.append(f"{target} cannot be leased alone: VFIO hands out whole groups.")
        lines.append(f"Why these devices share a group ({g.isolation}): {g.isolation_text}")
        if g.viable:
            lines.append("Viable for VFIO now: every endpoint is on vfio-pci, pci-stub or no driver.")
        else:
            lines.append("Not viable for VFIO now:")
            lines.extend(f"  {a}: {why}" for a, why in g.blockers)
        for a, why in g.protected:
            lines.append(f"Protected: {a} — {why}.")
        lease = self.manager.lease_for_group(g.number)
        if lease:
            lines.append(f"Leased to uid {lease.uid} with the {lease.backend} backend (lease {lease.id}).")
        for f in self.host.findings:
            lines.append(f"Note: {f.text}")
        return "\n".join(lines)

    async def check(self, caller: Caller, target: str, backend: str):
        policy = self.policy_store.current
        host = await self._run(self.manager.host_for, target, policy)     # just the target's group
        resolved = policy.resolve(host, target)
        d = policy.decide(host, caller, resolved.group, backend, {})
        if d.allowed:
            reset = "; each device is reset before it goes back to the host" if d.reset_on_release else ""
            d = attrs.evolve(d, reason=d.reason + self._memlock_advice(caller, d) + reset)
        return d

    def _memlock_advice(self, caller: Caller, decision) -> str:
        """What the lease will do to the caller's locked-memory limit, said before it matters:
        VFIO pins every page the lessee maps for DMA, and fails (DPDK: "DMA remapping failed")
        once RLIMIT_MEMLOCK is exhausted."""
        cur = self.kernel.memlock_of(caller.pid) if caller.pid else None
        have = "unknown" if cur is None else ("unlimited" if cur[0] < 0 else format_size(cur[0]))
        if decision.memlock:
            return (f"; the lease raises RLIMIT_MEMLOCK of your process to {format_size(decision.memlock)} "
                    f"(now {have})")
        if cur is not None and 0 <= cur[0] < (256 << 20):
            return (f"; warning: no memlock grant in the policy and your RLIMIT_MEMLOCK is {have}: "
                    "a VFIO user that pins memory (DPDK, QEMU) will fail to map DMA beyond it")
        return ""

    async def set_vf_count(self, caller: Caller, pf: str, count: int) -> int:
        addr = PciAddress.parse(pf)
        before = await self._run(self.manager.set_vf_count, caller, addr, count)
        log.info("%s: %d -> %d VFs (uid %s)", addr, before, count, caller.uid)
        self._refresh_soon()              # VFs come and go with their groups
        return before

    async def reload_policy(self, caller: Caller) -> None:
        if not caller.is_admin:
            raise PermissionDenied("only root may reload the policy")
        await self._run(self.policy_store.reload)

    # ------------------------------------------------------------ leases

    def _lease_of(self, caller: Caller, lease_id: str, action: str):
        lease = self.manager.get(lease_id)
        if not caller.is_admin and caller.uid != lease.uid:
            raise PermissionDenied(f"lease {lease.id} belongs to uid {lease.uid}; you may not {action} it")
        return lease

    async def open_fd(self, caller: Caller, lease_id: str, which: str) -> int:
        lease = self._lease_of(caller, lease_id, "open")
        be = self.backends[lease.backend]
        ctx = self.manager.context(lease, host=self.host)
        return be.open_group(ctx) if which == "group" else be.open_container(ctx)

    def keep_fd_for_send(self, fd: int) -> int:
        self.bus.close_after_send.add(fd)
        return fd

    async def hostdev_xml(self, caller: Caller, lease_id: str) -> str:
        lease = self._lease_of(caller, lease_id, "read")
        be = self.backends[lease.backend]
        return be.hostdev_xml(self.manager.context(lease, host=self.host))

    async def renew(self, caller: Caller, lease_id: str, seconds: int):
        self._lease_of(caller, lease_id, "renew")
        return await self._run(self.manager.renew, lease_id, caller, int(seconds))

    async def release(self, caller: Caller, lease_id: str) -> None:
        lease = self._lease_of(caller, lease_id, "release")
        await self._run(self.manager.release, lease_id, caller)
        self._refresh_soon([lease.group])

    def _ended_in_thread(self, ended: Ended) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self._ended, ended)

    def _ended(self, ended: Ended) -> None:
        path = busmod.lease_path(ended.lease.id)
        iface = self._leases.pop(ended.lease.id, None)
        if iface is not None and self.bus:
            self.bus.unexport(path, iface)
            self.manager_iface.emit_properties_changed({"Leases": self.manager_iface.Leases})
        self.manager_iface.LeaseEnded(path, ended.reason)

    # ------------------------------------------------------------ objects

    def group_state(self, n: int) -> str:
        if self.manager.lease_for_group(n):
            return "leased"
        g = self.host.groups.get(n)
        return g.state if g else "gone"

    def original_driver(self, addr: PciAddress) -> str | None:
        dev = self.host.devices.get(addr)
        if dev is None or dev.group is None:
            return None
        lease = self.manager.lease_for_group(dev.group)
        if lease:
            for h in self.journal.held(lease.id):
                if h.addr == str(addr):
                    return h.driver
        return dev.driver

    def exported_leases(self) -> list[str]:
        return list(self._leases)

    def _export_lease(self, lease) -> None:
        if lease.id in self._leases or not self.bus:
            return
        iface = busmod.LeaseInterface(self, lease)
        self._leases[lease.id] = iface
        self.bus.export(busmod.lease_path(lease.id), iface)
        self.manager_iface.emit_properties_changed({"Leases": self.manager_iface.Leases})

    def export_all(self) -> None:
        self._exported = True
        self.bus.export(busmod.ROOT, self.manager_iface)
        for n in self.host.groups:
            iface = busmod.GroupInterface(self, n)
            self._groups[n] = iface
            self.bus.export(busmod.group_path(n), iface)
        for addr in self.host.devices:
            iface = busmod.DeviceInterface(self, addr)
            self._devices[addr] = iface
            self.bus.export(busmod.device_path(addr), iface)
        for lease in self.manager.leases():
            self._export_lease(lease)

    # ------------------------------------------------------------ bus events

    def on_message(self, msg: Message):
        if (msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.interface == "org.freedesktop.DBus" and msg.sender == "org.freedesktop.DBus"):
            name, _old, new = msg.body
            if name.startswith(":") and not new:
                self._creds.pop(name, None)
                asyncio.ensure_future(self._owner_gone(name))
        return None

    async def _owner_gone(self, name: str) -> None:
        ended = await self._run(self.manager.end_owned_by, name)
        if ended:
            self._refresh_soon([e.lease.group for e in ended])

    async def name_has_owner(self, name: str) -> bool:
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s", body=[name]))
        return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])

    async def apply_claims(self) -> None:
        policy = self.policy_store.current
        for claim in policy.claims:
            caller = Caller.from_uid(claim.uid)
            try:
                existing = [l for l in self.manager.leases() if l.target == claim.target and l.uid == claim.uid]
                if existing:
                    log.info("claim %s for uid %s: already held (lease %s)", claim.target, claim.uid, existing[0].id)
                    continue
                lease = await self._run(self.manager.request, caller, claim.target, claim.backend,
                                        {"persistent": True}, None)
                log.info("claim %s for %s applied: lease %s", claim.target, claim.user, lease.id)
            except VfiodError as e:
                log.error("claim %s for %s (%s) not applied: %s", claim.target, claim.user, claim.source, e)
            except Exception:
                # A claim must never keep the daemon from starting: log it and go on.
                log.exception("claim %s for %s (%s) not applied: internal error", claim.target, claim.user,
                              claim.source)
        await self._run(self._refresh)


def make_kernel(args):
    """The real kernel below the given roots, or a simulated host laid out in --sim-dir."""
    if not args.simulate:
        return Kernel(Roots(args.sysfs_root, args.proc_root, args.dev_root)), None
    from . import hosts
    from .simkernel import SimKernel

    spec = hosts.EXAMPLES[args.simulate]
    sim_dir = args.sim_dir or tempfile.mkdtemp(prefix="vfiod-sim-")
    root = os.path.join(sim_dir, "host")
    if os.path.isdir(root):
        roots = Roots(os.path.join(root, "sys"), os.path.join(root, "proc"), os.path.join(root, "dev"))
    else:
        roots = hosts.build_spec(spec, root)
    kernel = SimKernel.for_spec(spec, roots)
    kernel.write_log = os.path.join(sim_dir, "writes.log")
    return kernel, sim_dir


async def serve(args) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else
                        "%(asctime)s %(name)s: %(message)s")
    kernel, sim_dir = make_kernel(args)
    loop = asyncio.get_running_loop()
    if sim_dir:
        log.info("simulated host %s in %s", args.simulate, sim_dir)
    backends = load_backends()
    # Policy may name every backend vfiod knows, loaded or not (a request for one that
    # is not loaded is refused then, with its name); plugins may add more names.
    from .policy import KNOWN_BACKENDS
    store = PolicyStore(args.policy_dir, backends=tuple(dict.fromkeys((*KNOWN_BACKENDS, *backends))))
    try:
        store.reload()
    except PolicyError as e:
        log.error("policy not loaded, denying every request until it is fixed: %s", e)
    journal = Journal(os.path.join(args.state_dir, "state.db"))
    service = Service(kernel, journal, store, backends)
    service.loop = loop
    if sim_dir:       # the simulated kernel sends its uevents straight to the handler
        kernel.event_sink = lambda *event: loop.call_soon_threadsafe(service.on_pci_event, *event)
    else:
        from . import udev
        service.monitor = udev.watch(loop, service.on_pci_event)
    bus = await busmod.VfiodBus(negotiate_unix_fd=True, **busmod.bus_args(args.bus)).connect()
    service.bus = bus
    busmod.install_caller_tracking(bus)
    bus.add_message_handler(service.on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"]))
    # Reconcile the journal with the kernel before anyone can ask for anything.
    alive = set()
    for lease in journal.leases():
        if lease.owner and await service.name_has_owner(lease.owner):
            alive.add(lease.owner)
    service.manager.owner_alive = lambda lease: lease.owner in alive
    ended = await service._run(service.manager.reconcile)
    for e in ended:
        log.info("lease %s of uid %s ended on start: %s", e.lease.id, e.lease.uid, e.reason)
    await service.apply_claims()
    service.export_all()
    reply = await bus.request_name(busmod.BUS_NAME)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("cannot own %s on the bus (%s): is another vfiod running?", busmod.BUS_NAME, reply)
        return 1
    sd_notify("READY=1")
    log.info("ready on %s: %d groups, %d leases", args.bus, len(service.host.groups), len(journal.leases()))

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def hup():
        try:
            store.reload()
            log.info("policy reloaded")
        except PolicyError as e:
            log.error("policy reload refused, the last good one stays: %s", e)
    loop.add_signal_handler(signal.SIGHUP, hup)

    async def expire():
        while True:
            await asyncio.sleep(1)
            ended = await service._run(service.manager.expire_due)
            if ended:
                service._refresh_soon([e.lease.group for e in ended])
    ticker = asyncio.ensure_future(expire())
    await stop.wait()
    ticker.cancel()
    sd_notify("STOPPING=1")
    # Non-persistent leases end with the daemon; persistent ones stay recorded.
    for lease in journal.leases():
        if not lease.persistent and lease.state == "granted":
            try:
                await service._run(service.manager.release, lease.id, None, "shutdown")
            except VfiodError as e:
                log.error("ending lease %s on shutdown: %s", lease.id, e)
    bus.disconnect()
    journal.close()
    return 0
