"""Applies a CDI spec the way a container runtime does, for the real-kernel tier.

``python3 -m tests.dra.runtime SPEC DEVICE_ID... --uid U -- CMD...`` as root:

1. a private mount namespace (``unshare -m``) with a tmpfs of its own on ``/dev/vfio``,
   where each ``deviceNodes`` entry of the spec and of the named devices is made
   (mknod with its type, major and minor, chmod ``fileMode``, chown ``uid``/``gid``),
   as runc makes a container's device nodes;
2. the environment: the spec's ``env`` then each device's;
3. the container's first process is forked and held; each ``createRuntime`` hook
   runs with the OCI state (``pid`` of that process) on stdin, as the runtime runs
   it; then the process drops to uid U (its own gid, no supplementary groups) and
   execs CMD.

Exit status: CMD's; 125 if a hook or a device node failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def edits_for(spec: dict, device_ids: list[str]) -> dict:
    kind = spec["kind"]
    names = {i.split("=", 1)[1] for i in device_ids if i.startswith(kind + "=")}
    missing = names - {d["name"] for d in spec["devices"]}
    if missing:
        raise SystemExit(f"runtime: unresolvable CDI devices {sorted(missing)}")
    out: dict = {"env": [], "deviceNodes": [], "hooks": []}
    for edits in [spec.get("containerEdits", {})] + [d["containerEdits"] for d in spec["devices"]
                                                      if d["name"] in names]:
        for key in out:
            out[key] += edits.get(key, [])
    return out


def make_nodes(nodes: list[dict]) -> None:
    # the host's nodes are read before the container's /dev/vfio hides them
    host = [os.stat(n.get("hostPath", n["path"])) for n in nodes]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "cdi-vfio", "/dev/vfio"], check=True)
    for n, st in zip(nodes, host):
        major = n.get("major", os.major(st.st_rdev))
        minor = n.get("minor", os.minor(st.st_rdev))
        mode = n.get("fileMode", st.st_mode & 0o777)
        os.mknod(n["path"], 0o600 | 0o020000, os.makedev(major, minor))     # S_IFCHR
        os.chmod(n["path"], mode)
        os.chown(n["path"], n.get("uid", 0), n.get("gid", 0))


def main(argv: list[str]) -> int:
    cut = argv.index("--")
    head, cmd = argv[:cut], argv[cut + 1:]
    uid = int(head[head.index("--uid") + 1])
    spec_path, device_ids = head[0], [a for a in head[1:head.index("--uid")]]
    if os.environ.get("_CDI_STAGE") != "ns":
        env = dict(os.environ, _CDI_STAGE="ns")
        return subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-m",
                               "tests.dra.runtime", *argv], env=env).returncode
    with open(spec_path) as f:
        spec = json.load(f)
    edits = edits_for(spec, device_ids)
    try:
        make_nodes(edits["deviceNodes"])
    except OSError as e:
        print(f"runtime: device node: {e}", file=sys.stderr)
        return 125
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}
    env.update(e.split("=", 1) for e in edits["env"])
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.read(go_r, 1)                  # held until the hooks ran
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os.chdir("/tmp")
        os.execvpe(cmd[0], cmd, env)
    os.close(go_r)
    state = json.dumps({"ociVersion": "1.0.2", "id": "cdi-test", "status": "created", "pid": pid, "bundle": "/"})
    for hook in edits["hooks"]:
        if hook["hookName"] != "createRuntime":
            continue
        p = subprocess.run([hook["path"], *hook.get("args", [])[1:]], input=state, text=True,
                           capture_output=True, env=dict(e.split("=", 1) for e in hook.get("env", [])) or None)
        sys.stderr.write(p.stderr)
        if p.returncode != 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return 125
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
