//! The child between clone and exec: only syscalls on what the parent
//! prepared, no allocation and no lock (the parent may hold any). It joins
//! the v1 cgroups, makes the host's rootfs read-only but for the sandbox,
//! mounts a private /tmp and /proc, sets the hostname, and execs; or runs a
//! task group's init, or joins one. A failed step is reported on the error
//! pipe as [step, errno].
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::RawFd;

// Steps the child reports on failure (index into STEPS).
pub(super) const STEPS: [&str; 18] = [
    "joining a v1 cgroup",
    "making / private",
    "making the rootfs read-only",
    "binding the sandbox",
    "making the sandbox writable",
    "mounting /tmp",
    "mounting /proc",
    "setting the hostname",
    "entering the sandbox and its stdio",
    "exec",
    "joining the group's namespaces",
    "forking into the group's pid namespace",
    "entering a cgroup namespace",
    "masking /proc and /sys",
    "making /proc/sys, /proc/irq and /proc/bus read-only",
    "dropping capabilities",
    "switching user",
    "installing the seccomp filter",
];

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

#[derive(Clone, Copy)]
pub(super) struct Child<'a> {
    pub(super) v1_procs: &'a [CString],
    pub(super) root: &'a std::ffi::CStr,
    pub(super) sandbox: &'a CString,
    pub(super) tmp: &'a std::ffi::CStr,
    pub(super) tmp_options: &'a CString,
    pub(super) proc_: &'a std::ffi::CStr,
    pub(super) hostname: &'a [u8],
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    pub(super) devnull: RawFd,
    pub(super) error_pipe: RawFd,
    pub(super) program: &'a CString,
    pub(super) argv: &'a [*const libc::c_char],
    pub(super) env: &'a [*const libc::c_char],
    /// A group init's pidfd to join, or -1 for a new container.
    pub(super) join: RawFd,
    /// Run as a group's init instead of exec'ing a command.
    pub(super) init: bool,
    /// uid, gid to switch to (None: stay root).
    pub(super) user: Option<(u32, u32)>,
    pub(super) groups: &'a [libc::gid_t],
    /// The capability mask kept (permitted and effective).
    pub(super) capabilities: u64,
    /// The bounding set.
    pub(super) bounding: u64,
    /// Seccomp filters installed last, before exec.
    pub(super) filters: &'a [libc::sock_fprog],
    /// Of MASKED_FILES, MASKED_DIRS and READ_ONLY, those this kernel has.
    pub(super) masked_files: &'a [&'static std::ffi::CStr],
    pub(super) masked_dirs: &'a [&'static std::ffi::CStr],
    pub(super) read_only: &'a [&'static std::ffi::CStr],
    /// The highest capability this kernel knows (cap_last_cap).
    pub(super) cap_last: libc::c_ulong,
}

/// Files under /proc a task must not read (host memory, keys, timers,
/// scheduler internals) or write (sysrq): /dev/null is bound over each.
pub(super) const MASKED_FILES: [&std::ffi::CStr; 6] = [
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/timer_list",
    c"/proc/sched_debug",
    c"/proc/sysrq-trigger",
    c"/proc/latency_stats",
];
/// Directories hidden under an empty read-only tmpfs.
pub(super) const MASKED_DIRS: [&std::ffi::CStr; 2] = [c"/sys/firmware", c"/proc/acpi"];
/// Parts of the task's own /proc that stay readable but not writable.
pub(super) const READ_ONLY: [&std::ffi::CStr; 3] = [c"/proc/sys", c"/proc/irq", c"/proc/bus"];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// mount_setattr(2) on `path`: sets and clears mount attributes, recursively
/// with AT_RECURSIVE. Allocation-free, for the child.
unsafe fn set_mount_attr(path: &std::ffi::CStr, flags: libc::c_uint, set: u64, clear: u64) -> bool {
    let mut attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
    }
}

/// Reports the failed step and errno to the parent and exits.
unsafe fn fail(child: &Child<'_>, step: usize) -> ! {
    // SAFETY: errno location is thread-local and valid; write/_exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(child.error_pipe, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

/// The child between clone and exec: only syscalls, no allocation.
pub(super) unsafe fn child_main(child: &Child<'_>) -> ! {
    // SAFETY: every pointer passed below comes from a live CString/CStr or
    // array prepared by the parent; nothing here allocates or takes a lock.
    unsafe {
        for procs in child.v1_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(child, 0);
            }
            libc::close(fd);
        }
        if child.join >= 0 {
            join_and_run(child);
        }
        // After the v1 joins: the task's cgroups are the namespace's root.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail(child, 12);
        }
        if libc::mount(
            std::ptr::null(),
            child.root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(child, 1);
        }
        // The sandbox gets its own mount first, so it can be made writable again.
        if libc::mount(
            child.sandbox.as_ptr(),
            child.sandbox.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            fail(child, 3);
        }
        if !set_mount_attr(child.root, AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0) {
            fail(child, 2);
        }
        if !set_mount_attr(child.sandbox, 0, 0, MOUNT_ATTR_RDONLY) {
            fail(child, 4);
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            child.tmp.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            child.tmp_options.as_ptr().cast(),
        ) != 0
        {
            fail(child, 5);
        }
        if libc::mount(
            c"proc".as_ptr(),
            child.proc_.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(child, 6);
        }
        mask_paths(child);
        if libc::sethostname(child.hostname.as_ptr().cast(), child.hostname.len()) != 0 {
            fail(child, 7);
        }
        if child.init {
            init_loop(child);
        }
        enter_and_exec(child)
    }
}

/// Sandbox as working directory, stdio to the sandbox files, a session of its own.
unsafe fn enter_sandbox(child: &Child<'_>) {
    // SAFETY: plain syscalls on fds and paths prepared by the parent.
    unsafe {
        if libc::chdir(child.sandbox.as_ptr()) != 0
            || libc::dup2(child.devnull, 0) < 0
            || libc::dup2(child.stdout, 1) < 0
            || libc::dup2(child.stderr, 2) < 0
        {
            fail(child, 8);
        }
        libc::setsid();
    }
}

/// Enters the sandbox, then exec.
unsafe fn enter_and_exec(child: &Child<'_>) -> ! {
    // SAFETY: as in child_main.
    unsafe {
        enter_sandbox(child);
        drop_privileges(child, child.capabilities, child.bounding);
        for filter in child.filters {
            // After no_new_privs (drop_privileges): allowed without CAP_SYS_ADMIN.
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                filter as *const libc::sock_fprog,
            ) != 0
            {
                fail(child, 17);
            }
        }
        libc::execve(
            child.program.as_ptr(),
            child.argv.as_ptr(),
            child.env.as_ptr(),
        );
        fail(child, 9)
    }
}

/// A task group's pid 1: tells the parent it is up, then reaps whatever is
/// orphaned in the namespace until it is killed (which ends the namespace).
unsafe fn init_loop(child: &Child<'_>) -> ! {
    // SAFETY: plain syscalls on fds and memory we own.
    unsafe {
        enter_sandbox(child);
        // Reaping needs no privilege: the init keeps none a task could borrow.
        drop_privileges(
            &Child {
                user: None,
                ..*child
            },
            0,
            0,
        );
        libc::close(child.error_pipe);
        loop {
            if libc::waitpid(-1, std::ptr::null_mut(), 0) < 0 {
                libc::sleep(1);
            }
        }
    }
}

/// Enters the group's namespaces, forks the task into its pid namespace, and
/// mirrors the task's end: exit code for exit code, signal for signal.
unsafe fn join_and_run(child: &Child<'_>) -> ! {
    // SAFETY: setns/fork/waitpid/kill on our own process; the grandchild only
    // runs enter_and_exec.
    unsafe {
        let namespaces = libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWCGROUP;
        if libc::setns(child.join, namespaces) != 0 {
            fail(child, 10);
        }
        let pid = libc::fork();
        if pid < 0 {
            fail(child, 11);
        }
        if pid == 0 {
            // If the stand-in dies (killed by the agent), the task goes with it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            enter_and_exec(child);
        }
        libc::close(child.error_pipe);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let signal = libc::WTERMSIG(status);
        libc::signal(signal, libc::SIG_DFL);
        libc::kill(libc::getpid(), signal);
        libc::_exit(128 + signal)
    }
}

/// Hides what a task must not see of the host in its /proc and /sys, and
/// makes the kernel's tunables read-only. A path this kernel lacks is skipped.
unsafe fn mask_paths(child: &Child<'_>) {
    // SAFETY: mounts on static paths; nothing allocates.
    unsafe {
        let missing = || *libc::__errno_location() == libc::ENOENT;
        for &file in child.masked_files {
            let bound = libc::mount(
                c"/dev/null".as_ptr(),
                file.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            );
            if bound != 0 && !missing() {
                fail(child, 13);
            }
        }
        for &dir in child.masked_dirs {
            let hidden = libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=0".as_ptr().cast(),
            );
            if hidden != 0 && !missing() {
                fail(child, 13);
            }
        }
        for &dir in child.read_only {
            let bound = libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            );
            if bound != 0 {
                if missing() {
                    continue;
                }
                fail(child, 14);
            }
            if !set_mount_attr(dir, AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0) {
                fail(child, 14);
            }
        }
    }
}

/// The last privileged steps before exec: the bounding set cut to
/// `bounding`, the user switched (which clears every capability when it
/// leaves root), the rest set to `capabilities`, no ambient ones, and
/// no_new_privs so that no setuid or file capability gives any back.
unsafe fn drop_privileges(child: &Child<'_>, capabilities: u64, bounding: u64) {
    // SAFETY: prctl/capset/set*id on our own process with stack memory.
    unsafe {
        for cap in 0..=child.cap_last {
            if bounding & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                fail(child, 15);
            }
        }
        if let Some((uid, gid)) = child.user
            && (libc::setgroups(child.groups.len(), child.groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0)
        {
            fail(child, 16);
        }
        let kept = if matches!(child.user, Some((uid, _)) if uid != 0) {
            0
        } else {
            capabilities
        };
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |shift: u32| {
            let bits = (kept >> shift) as u32;
            CapData {
                effective: bits,
                permitted: bits,
                inheritable: 0,
            }
        };
        let data = [half(0), half(32)];
        if libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        ) != 0
            || libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            fail(child, 15);
        }
    }
}
