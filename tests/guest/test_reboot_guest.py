"""A persistent lease across reboots and a card swap, on the real kernel: three boots.

Each boot has an e1000e at 0000:01:00.0 below the pcie-root-port 00:02.0; the
boots share vfiod's state directory: the guest leaves it in ``$OUT/state`` and the
next boot gets it back as ``inputs`` (inside the guest it is copied to a tmpfs for
the daemon's run and back after it stopped, so the journal is read and written on a
local file system, as on a host).  In each boot one root python3 process starts a
private system-type bus and ``vfiod --bus ... --state-dir ... --policy-dir ...`` as
root on the guest's sysfs (tests/guest/instack.py), with a policy that lets uid 1000
lease the NIC persistently, and records what the kernel shows:

* boot A (``rootport``: the e1000e with MAC 52:54:00:00:01:00): uid 1000 takes a
  persistent lease with ``vfioctl lease --persistent``; vfiod is stopped with
  SIGTERM (the lease stays, the NIC stays on vfio-pci); the journal is recorded.
* boot B, the same NIC (same model, same MAC): before vfiod reports READY (when it
  takes its bus name, and at READY) the NIC is on vfio-pci again and the lease
  object is there; ``vfioctl leases`` lists it for uid 1000.
* boot C, another e1000e at the same address (another MAC: QEMU derives the
  e1000e's Device Serial Number from its MAC): the lease ends as ``replaced``, and
  the NIC stays on e1000e with its ``driver_override`` untouched (sampled every
  20 ms from before vfiod starts until uid 1000 leases the new NIC, which it may).
  Then vfiod is stopped, the NIC is removed through sysfs, and vfiod started again
  ends that lease as ``removed``.  (A lease that ends at start ends before vfiod is
  on the bus: no ``LeaseEnded`` is sent for it; the journal's audit row and the
  daemon's log say why.)

The serial is read from the DSN extended capability (0x0003) in the device's config
space (past 0x100: root only).  The tests read the records on the host side.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.guest.harness import Guest, guest_available

_ok, _why = guest_available()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _ok, reason=f"guest not available: {_why}")]

NIC = "0000:01:00.0"
UID = 1000
MAC_A = "52:54:00:00:01:00"        # the rootport topology's e1000e
MAC_C = "52:54:00:00:01:99"        # another card of the same model
# Boot C: the rootport topology's root port, with another e1000e below it.
SWAPPED = [
    "-device", "pcie-root-port,id=rp1,chassis=1,slot=101,bus=pcie.0,addr=0x2",
    "-device", f"e1000e,id=rp1_nic,bus=rp1,addr=0x0,romfile=,mac={MAC_C}",
]

GUEST_PY = r'''
import asyncio, json, os, shutil, sqlite3, struct, sys, threading, time, traceback
sys.path.insert(0, os.environ["VFIOD_CHECKOUT"])
from tests.guest.instack import Stack, driver, ensure_user, group_of, managed_objects, node
OUT = os.environ["OUT"]
PHASE, NIC, UID = %(phase)r, %(nic)r, %(uid)d
W = "/run/vfiod-reboot"
res = {"phase": PHASE, "errors": []}
t0 = time.monotonic()

def save():
    with open(os.path.join(OUT, f"boot-{PHASE}.json"), "w") as f:
        json.dump(res, f)

def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"error: {e}"

def dsn():
    """The Device Serial Number from the extended capability 0x0003, as vfiod writes it."""
    with open(f"/sys/bus/pci/devices/{NIC}/config", "rb") as f:
        cfg = f.read()
    off, seen = 0x100, set()
    while len(cfg) >= off + 12 and off and off not in seen:
        seen.add(off)
        header, = struct.unpack_from("<I", cfg, off)
        if header & 0xFFFF == 0x0003:
            low, high = struct.unpack_from("<II", cfg, off + 4)
            value = high << 32 | low
            return "-".join(f"{(value >> s) & 0xFF:02x}" for s in range(56, -8, -8))
        off = header >> 20
    return None if len(cfg) > 0x100 else "config space past 0x100 not readable"

def kernel_view():
    d = f"/sys/bus/pci/devices/{NIC}"
    if not os.path.exists(d):
        return {"present": False}
    g = group_of(NIC)
    return {"present": True, "driver": driver(NIC), "override": read(f"{d}/driver_override"),
            "ids": read(f"{d}/vendor")[2:] + ":" + read(f"{d}/device")[2:],
            "subsystem": read(f"{d}/subsystem_vendor")[2:] + ":" + read(f"{d}/subsystem_device")[2:],
            "class": read(f"{d}/class")[2:], "group": g, "node": node(g)}

def journal(path):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for table in ("meta", "leases", "held", "identity", "membership", "audit"):
            cur = db.execute(f"SELECT * FROM {table}")
            names = [c[0] for c in cur.description]
            out[table] = [dict(zip(names, row)) for row in cur.fetchall()]
        return out
    finally:
        db.close()

class Watch:
    """From before vfiod starts until after it stops: the NIC's driver and driver_override,
    every 20 ms, and the bus: the kernel's view the moment vfiod owns org.vfiod1,
    and every org.vfiod1.Manager signal."""

    def __init__(self, address):
        self.address = address
        self.samples = []          # [seconds, driver, override] at each change
        self.at_name = None
        self.signals = []
        self.count = 0             # samples taken
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.threads = [threading.Thread(target=self.sample, daemon=True),
                        threading.Thread(target=lambda: asyncio.run(self.bus()), daemon=True)]
        for t in self.threads:
            t.start()
        if not self.ready.wait(60):
            raise RuntimeError("the bus watcher did not connect")

    def sample(self):
        d = f"/sys/bus/pci/devices/{NIC}"
        last = None
        while not self.stop.is_set():
            try:
                now = [driver(NIC), read(f"{d}/driver_override")] if os.path.exists(d) else ["absent", None]
            except OSError:         # the driver link went between islink and readlink
                continue
            self.count += 1
            if now != last:
                self.samples.append([round(time.monotonic() - t0, 3)] + now)
                last = now
            time.sleep(0.02)

    async def bus(self):
        from dbus_next import Message
        from dbus_next.aio import MessageBus
        bus = await MessageBus(bus_address=self.address).connect()
        def on(msg):
            if msg.member == "NameOwnerChanged" and msg.body[0] == "org.vfiod1" and msg.body[2]:
                self.at_name = kernel_view()
            elif msg.interface == "org.vfiod1.Manager" and msg.message_type.name == "SIGNAL":
                self.signals.append([msg.member, [str(b) for b in msg.body]])
        bus.add_message_handler(on)
        for rule in ("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='org.vfiod1'",
                     "type='signal',interface='org.vfiod1.Manager'"):
            await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        self.ready.set()
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        bus.disconnect()

    def close(self):
        """Stop watching; were both watchers still running?"""
        alive = [t.is_alive() for t in self.threads]
        self.stop.set()
        for t in self.threads:
            t.join(10)
        return alive

def at_ready():
    objs = managed_objects(stack.address)
    return {"kernel": kernel_view(), "t": round(time.monotonic() - t0, 3),
            "leases": sorted(p.rsplit("/", 1)[1] for p, i in objs.items() if "org.vfiod1.Lease" in i)}

def vfioctl(*args, uid=UID):
    p = stack.vfioctl(uid, *args, timeout=180)
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}

stack = watch = None
try:
    res["boot_id"] = read("/proc/sys/kernel/random/boot_id")
    res["dsn"] = dsn()
    res["before"] = kernel_view()
    ensure_user(UID, "lessee")
    rule = f'[[rule]]\naddress = ["{NIC}"]\nuids = [{UID}]\nbackends = ["vfio"]\npersistent = true\n'
    stack = Stack(W, {"50-nic.toml": rule})
    # The state the last boot left.
    if os.path.isdir(f"{OUT}/state"):
        shutil.copytree(f"{OUT}/state", f"{W}/state", dirs_exist_ok=True)   # early.d/ too
        res["journal_at_boot"] = journal(f"{W}/state/state.db")
    watch = Watch(stack.address)
    res["ready"] = stack.start(on_ready=at_ready)
    res["at_name"] = watch.at_name
    res["leases"] = vfioctl("leases", "--json")
    res["after_ready"] = kernel_view()
    if PHASE == "A":
        res["lease"] = vfioctl("lease", NIC, "--persistent")
        res["leased"] = kernel_view()
        res["leases_after_grant"] = vfioctl("leases", "--json")
    if PHASE == "C":
        # The new card is free to lease; then, with vfiod stopped, it is removed.
        res["samples_before_lease"] = list(watch.samples)
        res["lease"] = vfioctl("lease", NIC, "--persistent")
        res["leased"] = kernel_view()
        res["vfiod_rc_first"] = stack.stop()
        with open(f"/sys/bus/pci/devices/{NIC}/remove", "w") as f:
            f.write("1")
        res["removed"] = kernel_view()
        watch.at_name = None
        res["ready_again"] = stack.start(on_ready=at_ready)
        res["leases_again"] = vfioctl("leases", "--json")
except Exception:
    res["errors"].append(traceback.format_exc())
finally:
    if stack is not None:
        try:
            res["vfiod_rc"] = stack.stop()        # SIGTERM
        except Exception:
            res["errors"].append("stopping vfiod: " + traceback.format_exc())
        res["after_stop"] = kernel_view()
        res["log"] = stack.read_log()
        stack.bus.stop()
    if watch is not None:
        res["watching"] = watch.close()
        res["samples"], res["signals"], res["sample_count"] = watch.samples, watch.signals, watch.count
    try:
        res["journal"] = journal(f"{W}/state/state.db")
        shutil.rmtree(f"{OUT}/state", ignore_errors=True)
        shutil.copytree(f"{W}/state", f"{OUT}/state")
    except Exception:
        res["errors"].append("keeping the state: " + traceback.format_exc())
    res["seconds"] = round(time.monotonic() - t0, 1)
    save()
'''


def _boot(phase: str, state: dict[str, bytes], **guest) -> dict:
    script = "python3 - <<'EOF'\n" + GUEST_PY % {"phase": phase, "nic": NIC, "uid": UID} + "\nEOF\n"
    res = Guest(**guest).run(script, timeout=900, inputs=state)
    name = f"boot-{phase}.json"
    assert res.returncode == 0 and name in res.files, res.output[-4000:] + res.console[-3000:]
    r = json.loads(res.files[name])
    r["_wall_seconds"] = round(res.wall_seconds, 1)
    r["_state"] = {k: v for k, v in res.files.items() if k.startswith("state/")}
    assert not r["errors"], _context(r)
    return r


@pytest.fixture(scope="module")
def boots():
    t = time.monotonic()
    a = _boot("A", {}, topology="rootport")
    b = _boot("B", a["_state"], topology="rootport")
    c = _boot("C", b["_state"], topology="none", extra_qemu_args=SWAPPED)
    return {"A": a, "B": b, "C": c, "_wall_seconds": round(time.monotonic() - t, 1)}


def _context(r) -> str:
    return (f"\n--- boot {r['phase']} errors ---\n" + "\n".join(r.get("errors", []))
            + "\n--- vfiod log ---\n" + r.get("log", "")[-6000:])


def _serial_of(mac: str) -> str:
    """QEMU's e1000e serial for `mac`: the MAC's halves around ff-ff."""
    b = mac.split(":")
    return "-".join(b[:3] + ["ff", "ff"] + b[3:])


def _identity(journal: dict, lease: str) -> dict:
    rows = [r for r in journal["identity"] if r["lease"] == lease and r["addr"] == NIC]
    assert len(rows) == 1, journal["identity"]
    return json.loads(rows[0]["data"])


def _log_lines(r, *words) -> list[str]:
    return [line for line in r["log"].splitlines() if all(w in line for w in words)]


def _lease_id(a) -> str:
    assert a["lease"]["rc"] == 0, (a["lease"], _context(a))
    return a["lease"]["stdout"].split()[-1].rsplit("/", 1)[-1]


def test_the_e1000e_serial_is_read_from_config_space_and_follows_the_mac(boots):
    a, b, c = boots["A"], boots["B"], boots["C"]
    assert a["dsn"] == b["dsn"] == _serial_of(MAC_A), (a["dsn"], b["dsn"])
    assert c["dsn"] == _serial_of(MAC_C), c["dsn"]
    assert a["dsn"] != c["dsn"]
    # Same model, same ids: only the serial tells the cards apart.
    assert a["before"]["ids"] == c["before"]["ids"] == "8086:10d3"


def test_boot_a_a_persistent_lease_is_journaled_with_the_nics_identity_and_outlives_vfiod(boots):
    a = boots["A"]
    assert a["before"]["driver"] == "e1000e" and a["before"]["override"] == "(null)", a["before"]
    lease = _lease_id(a)
    # uid 1000's lease: the NIC on vfio-pci, the group node its own.
    assert a["leased"]["driver"] == "vfio-pci", a["leased"]
    assert a["leased"]["node"] == [UID, "0o600"], a["leased"]
    rows = json.loads(a["leases_after_grant"]["stdout"])["leases"]
    assert [(r["id"], r["owner"], r["persistent"]) for r in rows] == [(lease, UID, True)], rows
    # SIGTERM: vfiod stops cleanly and the persistent lease keeps the NIC on vfio-pci.
    assert a["vfiod_rc"] == 0, _context(a)
    assert a["after_stop"]["driver"] == "vfio-pci", a["after_stop"]
    j = a["journal"]
    assert [(r["id"], r["uid"], r["persistent"], r["state"]) for r in j["leases"]] == [(lease, UID, 1, "granted")]
    # What identifies the NIC, as sysfs and its config space show it.
    assert _identity(j, lease) == {"ids": a["before"]["ids"], "subsystem": a["before"]["subsystem"],
                                   "class_code": a["before"]["class"], "serial": a["dsn"]}, _identity(j, lease)
    assert {r["key"]: r["value"] for r in j["meta"]}["boot_id"] == a["boot_id"]
    assert [json.loads(r["members"]) for r in j["membership"]] == [[NIC]], j["membership"]


def test_boot_b_the_same_nic_is_bound_again_before_vfiod_is_ready(boots):
    a, b = boots["A"], boots["B"]
    lease = _lease_id(a)
    assert b["boot_id"] != a["boot_id"]
    # A fresh boot: the kernel probed the NIC with its own driver, nothing overridden.
    assert b["before"]["driver"] == "e1000e" and b["before"]["override"] == "(null)", b["before"]
    assert [r["id"] for r in b["journal_at_boot"]["leases"]] == [lease]
    # The moment vfiod owns its bus name, and at READY: on vfio-pci, the lease object exported.
    assert b["at_name"] is not None and b["at_name"]["driver"] == "vfio-pci", (b["at_name"], _context(b))
    assert b["ready"]["kernel"]["driver"] == "vfio-pci", b["ready"]
    assert b["ready"]["kernel"]["node"] == [UID, "0o600"], b["ready"]
    assert b["ready"]["leases"] == [lease], b["ready"]
    rows = json.loads(b["leases"]["stdout"])["leases"]
    assert [(r["id"], r["owner"], r["persistent"], r["state"]) for r in rows] == [(lease, UID, True, "granted")]
    # The daemon said it bound the NIC again, before it said it was ready.
    lines = b["log"].splitlines()
    again = [i for i, line in enumerate(lines) if lease in line and NIC in line and "binding it again" in line]
    ready = [i for i, line in enumerate(lines) if "ready on" in line]
    assert again and ready and again[0] < ready[0], _context(b)
    # The sampled driver: e1000e before vfiod, then (perhaps through no driver) vfio-pci.
    assert b["watching"] == [True, True] and b["sample_count"] > 50, (b["watching"], b["sample_count"])
    drivers = [s[1] for i, s in enumerate(b["samples"]) if i == 0 or s[1] != b["samples"][i - 1][1]]
    assert drivers in (["e1000e", "vfio-pci"], ["e1000e", None, "vfio-pci"]), b["samples"]
    assert b["vfiod_rc"] == 0 and b["after_stop"]["driver"] == "vfio-pci", _context(b)
    j = b["journal"]
    assert {r["key"]: r["value"] for r in j["meta"]}["boot_id"] == b["boot_id"]
    assert [r["id"] for r in j["leases"]] == [lease]
    assert not _log_lines(b, "Traceback"), _context(b)


def test_boot_c_another_card_at_the_address_ends_the_lease_as_replaced_and_is_not_touched(boots):
    a, b, c = boots["A"], boots["B"], boots["C"]
    lease = _lease_id(a)
    assert c["boot_id"] not in (a["boot_id"], b["boot_id"])
    assert [r["id"] for r in c["journal_at_boot"]["leases"]] == [lease]
    # The new NIC stays on its own driver, its driver_override never written, from before
    # vfiod started until the new lease was asked for; no group node was made.
    assert c["before"]["driver"] == "e1000e" and c["before"]["override"] == "(null)", c["before"]
    assert c["watching"] == [True, True] and c["sample_count"] > 50, (c["watching"], c["sample_count"])
    assert [s[1:] for s in c["samples_before_lease"]] == [["e1000e", "(null)"]], c["samples"]
    for view in (c["at_name"], c["ready"]["kernel"], c["after_ready"]):
        assert view["driver"] == "e1000e" and view["override"] == "(null)" and view["node"] is None, view
    assert c["ready"]["leases"] == []
    assert json.loads(c["leases"]["stdout"])["leases"] == []
    # The journal's audit row, and the daemon's log, say why: the serial differs.
    rows = [r for r in c["journal"]["audit"] if r["lease"] == lease and r["outcome"] == "replaced"]
    assert len(rows) == 1 and rows[0]["event"] == "reconcile", c["journal"]["audit"]
    assert f"serial {a['dsn']} -> {c['dsn']}" in rows[0]["detail"], rows[0]
    assert "left untouched: " + NIC in rows[0]["detail"], rows[0]
    assert _log_lines(c, lease, "ends (replaced)", NIC), _context(c)
    assert _log_lines(c, lease, "ended on start: replaced"), _context(c)
    assert not _log_lines(c, "binding it again"), _context(c)
    assert c["vfiod_rc_first"] == 0 and not _log_lines(c, "Traceback"), _context(c)


def test_boot_c_the_new_card_can_be_leased_and_its_removal_ends_that_lease_as_removed(boots):
    a, c = boots["A"], boots["C"]
    new = _lease_id(c)
    assert new != _lease_id(a)
    assert c["leased"]["driver"] == "vfio-pci" and c["leased"]["node"] == [UID, "0o600"], c["leased"]
    # Removed through sysfs while vfiod was down: the next start ends the lease, nothing to give back.
    assert c["removed"] == {"present": False} and c["after_stop"] == {"present": False}
    assert c["ready_again"]["leases"] == [] and json.loads(c["leases_again"]["stdout"])["leases"] == []
    rows = [r for r in c["journal"]["audit"] if r["lease"] == new and r["outcome"] == "removed"]
    assert len(rows) == 1 and rows[0]["event"] == "reconcile", c["journal"]["audit"]
    assert _log_lines(c, new, "ended on start: removed"), _context(c)
    assert c["journal"]["leases"] == [] and c["journal"]["identity"] == []
    assert c["vfiod_rc"] == 0 and not _log_lines(c, "Traceback"), _context(c)
