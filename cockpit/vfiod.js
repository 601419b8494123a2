/* vfiod in Cockpit: IOMMU groups, leases, access and events, live from the bus.
 *
 * Everything comes from vfiod on the system bus, asked with the logged-in user's own
 * credentials (Cockpit's bridge; with administrative access, as root), so vfiod's policy
 * decides what this page may show and do, as it does for vfioctl:
 *   - the groups: one GroupsJson call (the same JSON as `vfioctl groups --json`), then only
 *     the groups a signal names are asked again;
 *   - the leases: ObjectManager proxies of /org/vfiod1/lease (added, changed, removed);
 *   - what changes: vfiod's signals (LeaseGranted, LeaseRevoking, LeaseEnded,
 *     PropertiesChanged, InterfacesAdded/Removed from /org/vfiod1). Nothing is polled; the
 *     only timer counts down the time left, locally.
 */
"use strict";

const BUS_NAME = "org.vfiod1";
const ROOT = "/org/vfiod1";
const MANAGER = "org.vfiod1.Manager";
const GROUP_PREFIX = ROOT + "/group/";
const DEVICE_PREFIX = ROOT + "/device/";
const LEASE_PREFIX = ROOT + "/lease/";
const MAX_TARGETS = 64;            /* GroupsJson takes at most this many targets a call */
const BUSY_PREFIX = "busy now: ";  /* CheckAccess: the policy allows it, a lease is refused now (vfiod.policy.BUSY_PREFIX) */
const PAGE = 200;                  /* groups drawn at a time */

const $ = id => document.getElementById(id);

const state = {
    client: null,
    me: null,                      /* cockpit.user(): {id, name} */
    admin: false,                  /* root, or Cockpit's administrative access */
    groups: new Map(),             /* number -> group JSON */
    deviceGroup: new Map(),        /* address -> group number */
    open: new Set(),               /* groups whose detail is shown */
    explained: new Map(),          /* group number -> Explain text, as vfiod gave it to this user */
    dirty: new Set(),
    dirtyTimer: null,
    leases: null,                  /* Cockpit proxies of org.vfiod1.Lease */
    revoking: null,                /* the lease path the revoke dialog is for */
    limit: PAGE,                   /* how many matching groups the table draws */
};

/* ------------------------------------------------------------------ small helpers */

function esc(text) {
    return String(text === null || text === undefined ? "" : text)
            .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
            .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function badge(cls, text, title) {
    return `<span class="badge ${cls}"${title ? ` title="${esc(title)}"` : ""}>${esc(text)}</span>`;
}

function unvariant(v) {
    return v && typeof v === "object" && "t" in v && "v" in v ? v.v : v;
}

function groupNumber(path) {
    return path.startsWith(GROUP_PREFIX) ? Number(path.slice(GROUP_PREFIX.length)) : null;
}

function addressOfPath(path) {   /* /org/vfiod1/device/0000_04_00_0 -> 0000:04:00.0 */
    const p = path.slice(DEVICE_PREFIX.length).split("_");
    return p.length === 4 ? `${p[0]}:${p[1]}:${p[2]}.${p[3]}` : null;
}

function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
}

function when(unix) {
    return unix ? new Date(unix * 1000).toLocaleString() : "";
}

function problem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.hidden = !text;
}

function event(kind, text) {
    const li = document.createElement("li");
    li.dataset.kind = kind;
    li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    const list = $("events");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 100)
        list.removeChild(list.lastChild);
}

function call(path, iface, member, args, signature) {
    return state.client.call(path, iface, member, args, signature ? { type: signature } : {});
}

/* ------------------------------------------------------------------ the groups */

function deviceKind(d) {
    return d.class_name || (d.class ? "class " + d.class.slice(0, 2) : "unknown class");
}

function groupMatches(g, cls, text) {
    if (cls && !g.devices.some(d => deviceKind(d) === cls))
        return false;
    if (!text)
        return true;
    const t = text.toLowerCase();
    return String(g.group) === t || g.devices.some(d =>
        [d.address, d.name, d.driver, d.vendor + ":" + d.device].some(v => v && v.toLowerCase().includes(t)));
}

/* Whose lease a group is under: for admins, and for the holder; vfiod's Explain keeps another
 * user's lease id and uid from everyone else, and so does this page. */
function leaseWords(g) {
    if (!g.lease || g.lease_owner === null || g.lease_owner === undefined)
        return "";
    if (state.me && g.lease_owner === state.me.id)
        return `your lease ${g.lease}`;
    return state.admin ? `lease ${g.lease} of uid ${g.lease_owner}` : "";
}

function stateBadge(g) {
    if (g.state === "leased")
        return badge("info", "leased", leaseWords(g));
    if (g.state === "parked")
        return badge("warn", "parked");
    return esc(g.state);
}

function groupRow(g) {
    const devs = g.devices.map(d => {
        const marks = (d.bridge ? badge("", d.kind || "bridge") : "") +
            (d.protected ? badge("warn", "protected", d.protected) : "");
        return `<span class="dev"><span class="addr">${esc(d.address)}</span> ${esc(d.name || deviceKind(d))} ${marks}</span>`;
    }).join("");
    const drivers = g.devices.map(d => `<span class="dev">${esc(d.driver || "—")}</span>`).join("");
    const viable = g.viable ? badge("ok", "viable") : badge("no", "not viable", g.blockers.map(b => b.text).join("; "));
    const open = state.open.has(g.group);
    let html = `<tr class="group${open ? " open" : ""}" data-group="${g.group}">` +
        `<td>${g.group}</td><td>${devs}</td><td class="drivers">${drivers}</td><td class="viable">${viable}</td>` +
        `<td class="state">${stateBadge(g)}</td><td class="isolation">${esc(g.isolation)}</td></tr>`;
    if (open)
        html += detailRow(g);
    return html;
}

function detailRow(g) {
    const blockers = g.blockers.length
        ? "<p>What blocks VFIO, and the fix:</p><ul class=\"blockers\">" +
          g.blockers.map(b => `<li><span class="addr">${esc(b.device)}</span> ${esc(b.text)}</li>`).join("") + "</ul>"
        : "<p>Nothing blocks VFIO: every endpoint is on vfio-pci, pci-stub or no driver.</p>";
    const prot = (g.protected || []).map(p => `<li>${esc(p.text || p.device || JSON.stringify(p))}</li>`).join("");
    const devices = g.devices.map(d => {
        const extra = [];
        if (d.original_driver && d.original_driver !== d.driver)
            extra.push(`goes back to ${d.original_driver}`);
        if (d.physfn)
            extra.push(`SR-IOV VF of ${d.physfn}`);
        if (d.virtfns && d.virtfns.length)
            extra.push(`${d.virtfns.length} VFs`);
        if (d.net && d.net.length)
            extra.push(`interfaces ${d.net.join(", ")}`);
        if (d.reset_methods && d.reset_methods.length)
            extra.push(`reset: ${d.reset_methods.join(", ")}`);
        if (d.protected)
            extra.push(`protected: ${d.protected}`);
        return `<li><span class="addr">${esc(d.address)}</span> [${esc(d.vendor)}:${esc(d.device)}] ` +
            `${esc(d.class_name || "")}, ${esc(d.kind || "")}, driver ${esc(d.driver || "none")}` +
            (extra.length ? ` (${esc(extra.join("; "))})` : "") + "</li>";
    }).join("");
    const lease = g.state === "leased"
        ? `<p>Leased${leaseWords(g) ? " (" + esc(leaseWords(g)) + ")" : ""}; the group node is /dev/vfio/${g.group}.</p>`
        : "";
    const explained = state.explained.get(g.group);
    return `<tr class="detail" data-detail="${g.group}"><td></td><td colspan="5">` +
        `<p><b>Why shared:</b> ${esc(g.isolation_text || g.isolation)}</p>${blockers}` +
        (prot ? `<p>Devices the host needs:</p><ul class="blockers">${prot}</ul>` : "") +
        `<ul class="blockers">${devices}</ul>${lease}` +
        `<pre class="explain">${esc(explained === undefined ? "Asking vfiod…" : explained)}</pre></td></tr>`;
}

/* The table draws at most `state.limit` groups (a server's thousands of rows would take the
 * browser seconds to lay out, again at every change); the filters find the rest. */
function renderGroups() {
    const cls = $("class-filter").value;
    const text = $("text-filter").value.trim();
    const matching = [];
    for (const g of [...state.groups.values()].sort((a, b) => a.group - b.group))
        if (groupMatches(g, cls, text))
            matching.push(g);
    const shown = matching.slice(0, state.limit);
    $("groups").tBodies[0].innerHTML = shown.map(groupRow).join("");
    const more = matching.length - shown.length;
    $("groups-count").textContent = more
        ? `the first ${shown.length} of ${matching.length} matching groups (${state.groups.size} in all)`
        : `${shown.length} of ${state.groups.size} groups`;
    $("show-more").hidden = !more;
    $("show-more").textContent = `Show ${Math.min(more, PAGE)} more`;
    renderClasses();
}

function renderClasses() {
    const select = $("class-filter");
    const have = new Set([...select.options].map(o => o.value));
    const kinds = new Set();
    for (const g of state.groups.values())
        for (const d of g.devices)
            kinds.add(deviceKind(d));
    for (const k of [...kinds].sort())
        if (!have.has(k))
            select.add(new Option(k, k));
}

function renderHost() {
    let functions = 0;
    for (const g of state.groups.values())
        functions += g.devices.length;
    const who = state.me ? `${state.me.name} (uid ${state.me.id})${state.admin ? ", administrator" : ""}` : "";
    $("host").textContent = `${state.groups.size} IOMMU groups, ${functions} PCI functions. Signed in as ${who}.`;
}

function setGroups(list) {
    for (const g of list) {
        const old = state.groups.get(g.group);
        if (old)
            for (const d of old.devices)
                state.deviceGroup.delete(d.address);
        state.groups.set(g.group, g);
        for (const d of g.devices)
            state.deviceGroup.set(d.address, g.group);
    }
}

function dropGroup(n) {
    const g = state.groups.get(n);
    if (!g)
        return;
    for (const d of g.devices)
        if (state.deviceGroup.get(d.address) === n)
            state.deviceGroup.delete(d.address);
    state.groups.delete(n);
    state.open.delete(n);
    state.explained.delete(n);
    state.dirty.delete(n);
}

/* When each part of the first load was done (ms since navigation start): for benchmarks. */
const timing = window.vfiodTiming = {};

function loadAllGroups() {
    return call(ROOT, MANAGER, "GroupsJson", [[]], "as").then(([json]) => {
        timing.answered = performance.now();
        state.groups.clear();
        state.deviceGroup.clear();
        setGroups(JSON.parse(json));
        timing.parsed = performance.now();
    });
}

/* A signal named these groups: ask vfiod for them again, a moment later, all at once. */
function touch(n) {
    if (n === null || n === undefined || Number.isNaN(n))
        return;
    state.dirty.add(n);
    state.explained.delete(n);
    if (!state.dirtyTimer)
        state.dirtyTimer = window.setTimeout(refreshDirty, 80);
}

function fetchGroups(numbers) {
    const targets = numbers.map(n => "group:" + n);
    return call(ROOT, MANAGER, "GroupsJson", [targets], "as")
            .then(([json]) => setGroups(JSON.parse(json)))
            .catch(ex => {
                if (numbers.length > 1)      /* one of them is gone: ask one by one */
                    return Promise.all(numbers.map(n => fetchGroups([n])));
                if (ex.name === "org.vfiod1.Error.NotFound" || ex.name === "org.vfiod1.Error.InvalidArgument")
                    dropGroup(numbers[0]);
                else
                    problem(`vfiod did not answer for group ${numbers[0]}: ${ex.message}`);
            });
}

function refreshDirty() {
    state.dirtyTimer = null;
    const numbers = [...state.dirty];
    state.dirty.clear();
    const batches = [];
    for (let i = 0; i < numbers.length; i += MAX_TARGETS)
        batches.push(fetchGroups(numbers.slice(i, i + MAX_TARGETS)));
    return Promise.all(batches).then(() => {
        renderGroups();
        renderHost();
        for (const n of numbers)
            if (state.open.has(n))
                explain(n);
    });
}

function explain(n) {
    call(ROOT, MANAGER, "Explain", ["group:" + n], "s")
            .then(([text]) => { state.explained.set(n, text) })
            .catch(ex => { state.explained.set(n, `vfiod refused: ${ex.message}`) })
            .then(() => {
                const pre = document.querySelector(`tr[data-detail="${n}"] pre.explain`);
                if (pre)
                    pre.textContent = state.explained.get(n);
            });
}

function toggleGroup(n) {
    if (state.open.has(n)) {
        state.open.delete(n);
    } else {
        state.open.add(n);
        explain(n);
    }
    renderGroups();
}

/* ------------------------------------------------------------------ the leases */

function visibleLeases() {
    const out = [];
    for (const path of Object.keys(state.leases || {})) {
        const p = state.leases[path];
        if (!p || !p.valid || !path.startsWith(LEASE_PREFIX))
            continue;
        /* a non-admin's page lists their own leases; the groups table shows which are leased */
        if (!state.admin && state.me && p.Owner !== state.me.id)
            continue;
        out.push([path, p]);
    }
    return out.sort((a, b) => (a[1].Created || 0) - (b[1].Created || 0));
}

function renderLeases() {
    const now = Date.now() / 1000;
    const rows = visibleLeases().map(([path, p]) => {
        const left = p.Expires ? duration(p.Expires - now) : "no limit";
        let st = esc(p.State || "granted");
        if (p.State === "revoking") {
            st = badge("warn", "revoking") + ` ${esc(p.RevokeReason || "")}; holders must let go in ` +
                 `${duration((p.RevokeDeadline || now) - now)}` +
                 (p.RevokeWaiting ? `<br><span class="muted">waits for: ${esc(p.RevokeWaiting)}</span>` : "");
        }
        const mine = state.me && p.Owner === state.me.id;
        const actions = [];
        if (state.admin && p.State !== "revoking")
            actions.push(`<button class="danger revoke" data-lease="${esc(path)}">Revoke</button>`);
        if (mine && p.State === "granted")
            actions.push(`<button class="plain release" data-lease="${esc(path)}">Release</button>`);
        const holder = mine ? `you (uid ${p.Owner})` : `uid ${p.Owner}`;
        return `<tr data-lease="${esc(path)}" data-state="${esc(p.State)}"><td class="addr">${esc(p.Id)}</td>` +
            `<td>${esc(groupNumber(p.Group || ""))}</td><td>${esc(holder)}</td>` +
            `<td>${esc(p.Backend)}${p.Persistent ? " " + badge("info", "persistent") : ""}</td>` +
            `<td title="${esc(when(p.Created))}">${esc(duration(now - (p.Created || now)))} ago</td>` +
            `<td>${esc(left)}</td><td class="lease-state">${st}</td><td>${actions.join(" ")}</td></tr>`;
    });
    $("leases").tBodies[0].innerHTML = rows.join("");
    $("leases").hidden = rows.length === 0;
    $("no-leases").hidden = rows.length !== 0;
}

function openRevoke(path) {
    state.revoking = path;
    $("revoke-title").textContent = `Revoke lease ${path.slice(LEASE_PREFIX.length)}`;
    $("revoke-dialog").showModal();
}

function revoke() {
    const path = state.revoking;
    const reason = $("revoke-reason").value.trim() || "revoked by the administrator";
    state.revoking = null;
    call(ROOT, MANAGER, "Revoke", [path, reason], "os")
            .then(() => event("revoke", `revoke of ${path.slice(LEASE_PREFIX.length)} begun: ${reason}`))
            .catch(ex => problem(`vfiod refused to revoke: ${ex.message}`));
}

function release(path) {
    call(path, "org.vfiod1.Lease", "Release", [], "")
            .catch(ex => problem(`vfiod refused to release: ${ex.message}`));
}

/* ------------------------------------------------------------------ access */

function checkAccess(ev) {
    ev.preventDefault();
    const target = $("access-target").value.trim();
    const backend = $("access-backend").value;
    if (!target)
        return;
    $("access-result").hidden = false;
    $("access-verdict").textContent = "Asking vfiod…";
    $("access-rule").textContent = "";
    $("access-explain").textContent = "";
    call(ROOT, MANAGER, "CheckAccess", [target, backend], "ss")
            .then(([[allowed, rule, reason]]) => {
                const busy = !allowed && reason.startsWith(BUSY_PREFIX);
                const verdict = allowed ? badge("ok", "allowed") : busy ? badge("warn", "busy") : badge("no", "denied");
                $("access-verdict").innerHTML = verdict + " " + esc(busy ? reason.slice(BUSY_PREFIX.length) : reason);
                $("access-verdict").dataset.allowed = allowed ? "yes" : busy ? "busy" : "no";
                $("access-rule").textContent = rule ? `Deciding rule: ${rule}` : "";
                return call(ROOT, MANAGER, "Explain", [target], "s");
            })
            .then(r => { if (r) $("access-explain").textContent = r[0] })
            .catch(ex => {
                $("access-verdict").textContent = `vfiod refused: ${ex.message}`;
                $("access-verdict").dataset.allowed = "error";
            });
}

function policyTest(ev) {
    ev.preventDefault();
    const user = $("policy-test-user").value.trim();
    const target = $("policy-test-target").value.trim();
    const out = $("policy-test-result");
    if (!user || !target)
        return;
    out.hidden = false;
    if (user.startsWith("-") || target.startsWith("-")) {      /* words, never options */
        out.textContent = "A user is a name or a uid, a target 0000:04:00.0, group:N or name:RESOURCE.";
        out.dataset.exit = "2";
        return;
    }
    out.textContent = "Testing…";
    /* vfioctl policy test reads the policy files; they are root's to read. */
    cockpit.spawn(["vfioctl", "policy", "test", "--user", user, target], { superuser: "require", err: "out" })
            .then(text => { out.textContent = text; out.dataset.exit = "0" })
            .catch((ex, text) => {
                out.textContent = text || ex.message;
                out.dataset.exit = String(ex.exit_status === undefined ? "error" : ex.exit_status);
            });
}

/* ------------------------------------------------------------------ signals */

function onManagerSignal(path, iface, member, args) {
    const lease = args[0];
    const id = lease ? String(lease).slice(LEASE_PREFIX.length) : "";
    const p = state.leases && state.leases[lease];
    const g = p && p.Group ? groupNumber(p.Group) : null;
    if (member === "LeaseGranted")
        event("lease-granted", `lease ${id} granted` + (g !== null ? ` on group ${g}` : ""));
    else if (member === "LeaseRevoking")
        event("lease-revoking", `lease ${id} is being revoked (${args[1]}): its holders must let go by ${when(args[2])}`);
    else if (member === "LeaseEnded")
        event("lease-ended", `lease ${id} ended: ${args[1]}`);
    else if (member === "PolicyReloaded")
        event("policy", `policy reloaded: ${args[0]} files, ${args[1]} rules`);
    if (g !== null)
        touch(g);
    else if (member !== "PolicyReloaded")
        for (const gr of state.groups.values())          /* which group: the table knows */
            if (gr.lease === id)
                touch(gr.group);
    if (member === "LeaseEnded" && p)
        touch(groupNumber(p.Group));
}

function onPropertiesChanged(path, iface, member, args) {
    const [changedIface, changed] = args;
    if (changedIface === "org.vfiod1.Group") {
        touch(groupNumber(path));
    } else if (changedIface === "org.vfiod1.Device") {
        const addr = addressOfPath(path);
        touch(state.deviceGroup.get(addr));
        if (changed && "Driver" in changed)
            event("driver", `${addr} is now on ${unvariant(changed.Driver) || "no driver"}`);
    } else if (changedIface === "org.vfiod1.Lease") {
        window.setTimeout(renderLeases, 0);
    }
}

function onInterfaces(path, iface, member, args) {
    const [objectPath, what] = args;
    if (objectPath.startsWith(LEASE_PREFIX))
        return;                              /* the lease proxies and LeaseGranted/Ended say it */
    if (member === "InterfacesAdded") {
        if (objectPath.startsWith(GROUP_PREFIX)) {
            touch(groupNumber(objectPath));
        } else if (objectPath.startsWith(DEVICE_PREFIX)) {
            const dev = (what || {})["org.vfiod1.Device"] || {};
            const group = unvariant(dev.Group);
            event("device-added", `${addressOfPath(objectPath)} appeared` + (group && group !== "/" ? ` in group ${groupNumber(group)}` : ""));
            if (group && group !== "/")
                touch(groupNumber(group));
        }
    } else {
        if (objectPath.startsWith(GROUP_PREFIX)) {
            const n = groupNumber(objectPath);
            dropGroup(n);
            renderGroups();
            renderHost();
        } else if (objectPath.startsWith(DEVICE_PREFIX)) {
            const addr = addressOfPath(objectPath);
            event("device-removed", `${addr} went away`);
            touch(state.deviceGroup.get(addr));
        }
    }
}

/* ------------------------------------------------------------------ start */

function wire() {
    $("groups").addEventListener("click", ev => {
        const row = ev.target.closest("tr.group");
        if (row)
            toggleGroup(Number(row.dataset.group));
    });
    $("leases").addEventListener("click", ev => {
        const button = ev.target.closest("button");
        if (!button)
            return;
        if (button.classList.contains("revoke"))
            openRevoke(button.dataset.lease);
        else if (button.classList.contains("release"))
            release(button.dataset.lease);
    });
    $("revoke-form").addEventListener("submit", ev => {
        if (ev.submitter && ev.submitter.value === "ok")
            revoke();
    });
    $("revoke-cancel").addEventListener("click", () => { state.revoking = null; $("revoke-dialog").close() });
    const refilter = () => { state.limit = PAGE; renderGroups() };
    $("class-filter").addEventListener("change", refilter);
    $("text-filter").addEventListener("input", refilter);
    $("show-more").addEventListener("click", () => { state.limit += PAGE; renderGroups() });
    $("access-form").addEventListener("submit", checkAccess);
    $("policy-test-form").addEventListener("submit", policyTest);
    window.setInterval(() => { if (visibleLeases().length) renderLeases() }, 1000);
}

function start() {
    wire();
    const client = state.client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
    client.addEventListener("close", (ev, options) => {
        problem(options && options.problem === "not-found"
            ? "vfiod is not running (org.vfiod1 is not on the system bus)."
            : `The connection to vfiod closed${options && options.problem ? ": " + options.problem : ""}.`);
    });
    /* Subscribe first: nothing that happens while the groups load is missed. */
    client.subscribe({ interface: MANAGER, path: ROOT }, onManagerSignal);
    client.subscribe({ interface: "org.freedesktop.DBus.Properties", member: "PropertiesChanged", path_namespace: ROOT },
                     onPropertiesChanged);
    client.subscribe({ interface: "org.freedesktop.DBus.ObjectManager", path: ROOT }, onInterfaces);

    const leases = state.leases = client.proxies("org.vfiod1.Lease", LEASE_PREFIX.slice(0, -1));
    for (const what of ["added", "changed", "removed"])
        leases.addEventListener(what, () => { renderLeases() });

    const permission = cockpit.permission({ admin: true });
    const who = cockpit.user().then(user => {
        state.me = user;
        state.admin = user.id === 0 || permission.allowed === true;
    });
    permission.addEventListener("changed", () => {
        state.admin = (state.me && state.me.id === 0) || permission.allowed === true;
        $("policy-test-form").hidden = !state.admin;
        renderLeases();
        renderHost();
    });

    timing.started = performance.now();
    Promise.all([who, loadAllGroups(), leases.wait().then(() => { timing.leases = performance.now() })])
            .then(() => {
                $("policy-test-form").hidden = !state.admin;
                $("leases-title").textContent = state.admin ? "Leases" : "Your leases";
                renderGroups();
                renderLeases();
                renderHost();
                timing.rendered = performance.now();
                /* drawn (the frame after this one) and answering (a task after that) */
                window.requestAnimationFrame(() => window.setTimeout(() => {
                    document.body.dataset.ready = String(Math.round(performance.now()));
                }, 0));
            })
            .catch(ex => {
                problem(`vfiod did not answer: ${ex.message || ex}`);
                document.body.dataset.ready = "failed";
            });
}

if (document.readyState === "loading")
    document.addEventListener("DOMContentLoaded", start);
else
    start();
