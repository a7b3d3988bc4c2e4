# Run inside a container by kernel-tests/tests/confinement.rs: tries each way
# out and prints `name=RESULT`, RESULT being the errno's name or `ok`.
import ctypes
import errno
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND = 32, 4096
SYS_INIT_MODULE, SYS_PTRACE, SYS_BPF, SYS_PERF_EVENT_OPEN, SYS_KEYCTL = 175, 101, 321, 298, 250
PTRACE_ATTACH = 16
CLONE_NEWUSER = 0x10000000


def result(rc):
    return "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def attempt(name, action):
    try:
        outcome = action()
    except OSError as error:
        outcome = errno.errorcode.get(error.errno, str(error.errno))
    print("%s=%s" % (name, outcome), flush=True)


def write(path):
    with open(path, "w") as f:
        f.write("1")
    return "ok"


def read_len(path):
    with open(path, "rb") as f:
        return "bytes:%d" % len(f.read(4096))


def threads():
    import threading
    done = []
    workers = [threading.Thread(target=lambda: done.append(1)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return "ok" if len(done) == 8 else "lost"


def fork_exec():
    import subprocess
    for _ in range(50):
        subprocess.run(["/bin/true"], check=True)
    return "ok"


def tcp_server():
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    client.sendall(b"x")
    return "ok" if peer.recv(1) == b"x" else "lost"


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
    return "none"


outside_pid = int(sys.argv[1])
attempt("remount_rw", lambda: result(libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None)))
attempt("write_host_root", lambda: write("/butte-escape"))
attempt("mount_tmpfs", lambda: result(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None)))
# The v2 hierarchy: under unified/ on a hybrid host, the root on a pure v2 one.
CGROUP2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
attempt("mkdir_cgroupfs", lambda: os.mkdir(CGROUP2 + "/butte-escape") or "ok")
attempt("write_sysctl", lambda: write("/proc/sys/kernel/hostname"))
attempt("init_module", lambda: result(libc.syscall(SYS_INIT_MODULE, None, 0, b"")))
attempt("ptrace_outside", lambda: result(libc.syscall(SYS_PTRACE, PTRACE_ATTACH, outside_pid, None, None)))
attempt("read_timer_list", lambda: read_len("/proc/timer_list"))
attempt("read_keys", lambda: read_len("/proc/keys"))
attempt("read_firmware", lambda: "entries:%d" % len(os.listdir("/sys/firmware")))
attempt("bpf", lambda: result(libc.syscall(SYS_BPF, 0, None, 0)))
attempt("perf_event_open", lambda: result(libc.syscall(SYS_PERF_EVENT_OPEN, None, 0, -1, -1, 0)))
attempt("keyctl", lambda: result(libc.syscall(SYS_KEYCTL, 0, 0, 0, 0, 0)))
attempt("unshare_user_ns", lambda: result(libc.unshare(CLONE_NEWUSER)))
attempt("threads", threads)
attempt("fork_exec", fork_exec)
attempt("tcp_server", tcp_server)
attempt("uid", lambda: str(os.getuid()))
attempt("cap_eff", lambda: status("CapEff"))
attempt("cap_bnd", lambda: status("CapBnd"))
attempt("no_new_privs", lambda: status("NoNewPrivs"))
attempt("write_sandbox", lambda: write(os.path.join(os.environ["MESOS_SANDBOX"], "mine")))
