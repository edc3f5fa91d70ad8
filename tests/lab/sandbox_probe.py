#!/usr/bin/env python3
"""A workload that tries what an attacker with code execution in it would, records what each
move gave (JSON in OUT/result.json), then serves HTTP on port 80 through `exec SERVER...`.

    sandbox_probe.py OUT STATE_DIR MESHD_PID OTHER_PID HOST_MARKER HOST_DISK SERVER...

Each entry is "ok" (the move worked) or the error it met.
"""
import ctypes
import json
import os
import socket
import subprocess
import sys

out, state_dir, meshd_pid, other_pid, marker, disk = sys.argv[1:7]
server = sys.argv[7:]
meshd_pid, other_pid = int(meshd_pid), int(other_pid)
result = {}


def attempt(name, move):
    try:
        value = move()
        result[name] = "ok" if value is None else value
    except Exception as e:  # what the move met is the record
        result[name] = f"{type(e).__name__}: {e}"


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path):
    with open(path, "w") as f:
        f.write("x")


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


def command(*args):
    p = subprocess.run(args, capture_output=True, text=True, timeout=10)
    return f"exit {p.returncode}: {(p.stdout + p.stderr).strip()[:200]}"


libc = ctypes.CDLL(None, use_errno=True)


def ptrace_attach(pid):
    PTRACE_ATTACH = 16
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        return None
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def setns(path):
    CLONE_NEWNET = 0x40000000
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) == 0:
        return None
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


# Who it is.
result["uid"] = os.getuid()
result["gid"] = os.getgid()
result["groups"] = os.getgroups()
for field in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "NoNewPrivs"]:
    result[field] = status(field)
result["fds"] = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
result["hostname"] = socket.gethostname()
result["environ"] = dict(os.environ)
# The node's secrets.
attempt("read_node_key", lambda: read(os.path.join(state_dir, "node.key")) and None)
attempt("list_state_dir", lambda: os.listdir(state_dir))
# Other namespaces, the host's and other workloads'.
attempt("list_run_netns", lambda: os.listdir("/run/netns"))
attempt("list_var_run_netns", lambda: os.listdir("/var/run/netns"))
attempt("setns_pid1_net", lambda: setns("/proc/1/ns/net"))
attempt("setns_own_net", lambda: setns("/proc/self/ns/net"))
attempt("pid1_is", lambda: read("/proc/1/cmdline").split(b"\0")[0].decode())
attempt("pid1_cmdline", lambda: read("/proc/1/cmdline").decode())
attempt("pids_seen", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
# Processes outside: meshd and another workload.
attempt("signal_meshd", lambda: os.kill(meshd_pid, 0))
attempt("ptrace_meshd", lambda: ptrace_attach(meshd_pid))
attempt("signal_other_workload", lambda: os.kill(other_pid, 0))
attempt("meshd_environ", lambda: read(f"/proc/{meshd_pid}/environ") and None)
# The interception and the network.
attempt("nft_flush", lambda: command("nft", "flush", "ruleset"))
attempt("ip_route_flush", lambda: command("ip", "route", "flush", "table", "main"))
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) and None)
attempt("sysctl_write", lambda: write("/proc/sys/net/ipv4/ip_forward"))
# Devices: only the harmless ones; no disk, no terminal, no tun; a session of its own.
attempt("dev_listing", lambda: sorted(os.listdir("/dev")))
attempt("open_host_disk", lambda: os.close(os.open(f"/dev/{disk}", os.O_RDONLY)))
attempt("open_tty", lambda: os.close(os.open("/dev/tty", os.O_RDWR)))
attempt("open_tun", lambda: os.close(os.open("/dev/net/tun", os.O_RDWR)))
attempt("mknod_disk", lambda: os.mknod("/tmp/disk", 0o600 | 0o060000, os.makedev(8, 0)))
attempt("write_dev_null", lambda: write("/dev/null"))
result["session"] = os.getsid(0)
import resource
result["core_limit"] = list(resource.getrlimit(resource.RLIMIT_CORE))
st = os.statvfs("/tmp")
result["tmp_bytes"] = st.f_blocks * st.f_frsize
attempt("list_etc_netns", lambda: os.listdir("/etc/netns"))
# No user namespace of its own (every capability over what it would make), no keyrings.
attempt("unshare_user", lambda: command("unshare", "--user", "--map-root-user", "true"))
attempt("unshare_user_net", lambda: command("unshare", "-Urn", "nft", "list", "ruleset"))


def keyctl_session():
    import platform
    if platform.machine() != "x86_64":
        return "skipped: not x86_64"
    SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING = 250, 0, -3
    if libc.syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) >= 0:
        return None
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


attempt("keyctl_session", keyctl_session)
# Set-user-ID programs give nothing back.
attempt("setuid_mount", lambda: command("mount", "-t", "tmpfs", "none", "/tmp"))
# Files: the host's read-only, scratch private, the writable path writable.
attempt("write_etc", lambda: write("/etc/probe-was-here"))
attempt("write_usr", lambda: write("/usr/probe-was-here"))
attempt("write_root", lambda: write("/probe-was-here"))
attempt("write_tmp", lambda: write("/tmp/probe-was-here"))
attempt("host_tmp_marker_seen", lambda: marker in os.listdir("/tmp"))
attempt("write_writable", lambda: write(os.path.join(out, "probe-was-here")))
# What a service needs still works: names at 127.0.0.11 and ports below 1024 (the server).
attempt("resolv_conf", lambda: read("/etc/resolv.conf").decode())
attempt("resolve_probe", lambda: socket.gethostbyname("probe"))
attempt("bind_port_80_udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("0.0.0.0", 80)))

tmp = os.path.join(out, "result.json.tmp")
with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
os.rename(tmp, os.path.join(out, "result.json"))
os.execv(server[0], server)
