# Run inside a container by kernel-tests/tests/confinement.rs: tries each way
# out and prints `name=RESULT`, RESULT being the errno's name or `ok`.
import ctypes
import errno
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND = 32, 4096
SYS_INIT_MODULE, SYS_PTRACE, SYS_BPF = 175, 101, 321
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


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
    return "none"


outside_pid = int(sys.argv[1])
attempt("remount_rw", lambda: result(libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None)))
attempt("write_host_root", lambda: write("/butte-escape"))
attempt("mount_tmpfs", lambda: result(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None)))
attempt("mkdir_cgroupfs", lambda: os.mkdir("/sys/fs/cgroup/unified/butte-escape") or "ok")
attempt("write_sysctl", lambda: write("/proc/sys/kernel/hostname"))
attempt("init_module", lambda: result(libc.syscall(SYS_INIT_MODULE, None, 0, b"")))
attempt("ptrace_outside", lambda: result(libc.syscall(SYS_PTRACE, PTRACE_ATTACH, outside_pid, None, None)))
attempt("read_timer_list", lambda: read_len("/proc/timer_list"))
attempt("read_keys", lambda: read_len("/proc/keys"))
attempt("read_firmware", lambda: "entries:%d" % len(os.listdir("/sys/firmware")))
attempt("uid", lambda: str(os.getuid()))
attempt("cap_eff", lambda: status("CapEff"))
attempt("cap_bnd", lambda: status("CapBnd"))
attempt("no_new_privs", lambda: status("NoNewPrivs"))
attempt("write_sandbox", lambda: write(os.path.join(os.environ["MESOS_SANDBOX"], "mine")))
