//! Spawning a task into its container: clone3 into new pid, mount, uts and
//! ipc namespaces and straight into its v2 cgroup, then, in the child: join
//! the v1 cgroups, make the host's rootfs read-only except the sandbox, give
//! it a private /tmp and its own /proc, set the hostname, and exec.
//!
//! A task group shares one container: `spawn` with an empty argv starts the
//! group's init (pid 1 of its namespaces, reaping orphans), and `join` runs
//! each of its tasks inside that container's namespaces and cgroup.
//!
//! Call `spawn` and `join` only from a single-threaded process (the agent's launcher):
//! the child runs between clone and exec without taking any lock, using
//! only what was prepared before the clone.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, NulError};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

mod child;
pub mod privileges;
pub mod profile;
mod seccomp;
use child::{Child, MASKED_DIRS, MASKED_FILES, READ_ONLY, STEPS, child_main};
pub use privileges::{Capabilities, Privileges, Seccomp, User};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// a string given to the spawn holds a NUL byte
    #[error("{what} contains a NUL byte: {source}")]
    Nul {
        what: &'static str,
        source: NulError,
    },
    /// a preparation step in the parent failed
    #[error("failed to {step}: {source}")]
    Prepare {
        step: &'static str,
        source: io::Error,
    },
    /// the child failed before exec; `step` says where
    #[error("container setup failed at {step}: {source}")]
    Child {
        step: &'static str,
        source: io::Error,
    },
}

/// Everything a container needs, given by the agent.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// argv[0] is the program; resolved through PATH by execvpe.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The task's sandbox: the working directory and the one writable place.
    pub sandbox: PathBuf,
    pub hostname: String,
    /// The v2 cgroup directory to clone into.
    pub cgroup: PathBuf,
    /// v1 `cgroup.procs` files to join before exec.
    pub v1_procs: Vec<PathBuf>,
    /// Size of the private /tmp, in MiB.
    pub tmp_mb: u64,
    /// Who the task runs as and the capabilities it keeps.
    pub privileges: Privileges,
}

/// A spawned container's first process.
#[derive(Debug)]
pub struct Spawned {
    /// Host pid.
    pub pid: i32,
    /// pidfd: readable when the process exits; signals without pid reuse races.
    pub pidfd: OwnedFd,
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn cstring(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|source| SpawnError::Nul { what, source })
}

fn path_cstring(what: &'static str, path: &Path) -> Result<CString, SpawnError> {
    cstring(what, path.as_os_str().as_encoded_bytes().to_vec())
}

fn open_fd(path: &Path, flags: libc::c_int, step: &'static str) -> Result<OwnedFd, SpawnError> {
    let c = path_cstring("a path", path)?;
    // SAFETY: `c` is a valid NUL-terminated string; the fd returned is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(SpawnError::Prepare {
            step,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Spawns the container. Returns once the child has exec'd (or failed, with
/// the step and errno it failed at). An empty argv starts a task group's
/// init instead of a command.
pub fn spawn(spec: &ContainerSpec) -> Result<Spawned, SpawnError> {
    launch(spec, None)
}

/// Runs a task inside the container whose init is `group_init` (its pid,
/// mount, uts and ipc namespaces); `spec.cgroup` should be that container's.
/// The process behind the returned pidfd stands in for the task outside the
/// namespace: it exits as the task does, and killing it kills the task.
pub fn join(group_init: &OwnedFd, spec: &ContainerSpec) -> Result<Spawned, SpawnError> {
    if spec.argv.is_empty() {
        return Err(SpawnError::Prepare {
            step: "read the command",
            source: io::Error::other("a task joining a group needs a command"),
        });
    }
    launch(spec, Some(group_init.as_raw_fd()))
}

fn launch(spec: &ContainerSpec, join: Option<RawFd>) -> Result<Spawned, SpawnError> {
    let prepared = Prepared::new(spec)?;
    let (error_read, error_write) = error_pipe()?;
    let (pid, pidfd) = clone_into(&prepared.cgroup, join)?;
    if pid == 0 {
        let child = prepared.child(join, error_write.as_raw_fd());
        // SAFETY: we are the freshly cloned child; child_main ends in exec or _exit.
        unsafe { child_main(&child) }
    }
    drop(error_write);
    // SAFETY: clone3 stored an owned pidfd for the child.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    await_exec(&error_read, Spawned { pid, pidfd })
}

/// Everything the child touches, made before the clone: the child may not
/// allocate or take a lock. `argv_ptrs` and `env_ptrs` point into `argv`
/// and `env`, whose heap buffers stay put while this lives.
struct Prepared {
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    env_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    program: CString,
    v1_procs: Vec<CString>,
    sandbox: CString,
    hostname: Vec<u8>,
    tmp_options: CString,
    stdout: OwnedFd,
    stderr: OwnedFd,
    devnull: OwnedFd,
    cgroup: OwnedFd,
    groups: Vec<libc::gid_t>,
    user: Option<(u32, u32)>,
    capabilities: u64,
    bounding: u64,
    /// The seccomp filters to install, pointing into the compiled ones
    /// (the default's, or `profile_programs`).
    filters: Vec<libc::sock_fprog>,
    /// A profile's programs, owned here for `filters` to point into (the
    /// heap buffers stay put when `Prepared` moves).
    #[expect(dead_code, reason = "owns the buffers `filters` points into")]
    profile_programs: Vec<Vec<libc::sock_filter>>,
}

impl Prepared {
    fn new(spec: &ContainerSpec) -> Result<Self, SpawnError> {
        if spec.sandbox.starts_with("/tmp") || spec.sandbox.is_relative() {
            return Err(SpawnError::Prepare {
                step: "place the sandbox",
                source: io::Error::other(format!(
                    "sandbox {} must be an absolute path outside /tmp (the task gets a private /tmp that would hide it); move the work dir",
                    spec.sandbox.display()
                )),
            });
        }
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| cstring("an argument", a.as_str()))
            .collect::<Result<_, _>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring("an environment variable", format!("{k}={v}")))
            .collect::<Result<_, _>>()?;
        let null_terminated = |strings: &[CString]| {
            let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            ptrs
        };
        let path_var = spec.env.iter().find(|(k, _)| k == "PATH").map_or(
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            |(_, v)| v.as_str(),
        );
        // execvpe uses the caller's PATH; resolve the program here, where allocating is safe.
        let program = resolve(spec.argv.first().map_or("/", String::as_str), path_var);
        let hostname = spec.hostname.as_bytes();
        let append = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND;
        let stdout = open_fd(
            &spec.sandbox.join("stdout"),
            append,
            "open the sandbox's stdout",
        )?;
        let stderr = open_fd(
            &spec.sandbox.join("stderr"),
            append,
            "open the sandbox's stderr",
        )?;
        if let Some(user) = &spec.privileges.user {
            // The task's own output files, as its sandbox is.
            for fd in [&stdout, &stderr] {
                // SAFETY: fchown on an fd we own.
                if unsafe { libc::fchown(fd.as_raw_fd(), user.uid, user.gid) } != 0 {
                    return Err(SpawnError::Prepare {
                        step: "give the sandbox's stdout and stderr to the task's user",
                        source: io::Error::last_os_error(),
                    });
                }
            }
        }
        let profile_programs: Vec<Vec<libc::sock_filter>> = match &spec.privileges.seccomp {
            Seccomp::Profile { programs, .. } => programs
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
                        .collect()
                })
                .collect(),
            Seccomp::Default | Seccomp::Unconfined => Vec::new(),
        };
        let filters = match &spec.privileges.seccomp {
            Seccomp::Default => {
                seccomp_programs(seccomp::default_filters().map_err(|e| SpawnError::Prepare {
                    step: "build the seccomp filter",
                    source: io::Error::other(e),
                })?)?
            }
            Seccomp::Unconfined => Vec::new(),
            Seccomp::Profile { .. } => seccomp_programs(&profile_programs)?,
        };
        Ok(Self {
            argv_ptrs: null_terminated(&argv),
            env_ptrs: null_terminated(&env),
            argv,
            _env: env,
            program: path_cstring("the program", &program)?,
            v1_procs: spec
                .v1_procs
                .iter()
                .map(|p| path_cstring("a cgroup path", p))
                .collect::<Result<_, _>>()?,
            sandbox: path_cstring("the sandbox", &spec.sandbox)?,
            hostname: hostname[..hostname.len().min(64)].to_vec(),
            tmp_options: cstring(
                "tmp options",
                format!("size={}m,mode=1777", spec.tmp_mb.max(1)),
            )?,
            stdout,
            stderr,
            devnull: open_fd(Path::new("/dev/null"), libc::O_RDONLY, "open /dev/null")?,
            cgroup: open_fd(
                &spec.cgroup,
                libc::O_RDONLY | libc::O_DIRECTORY,
                "open the task's v2 cgroup",
            )?,
            groups: spec
                .privileges
                .user
                .as_ref()
                .map(|u| u.groups.clone())
                .unwrap_or_default(),
            user: spec.privileges.user.as_ref().map(|u| (u.uid, u.gid)),
            capabilities: spec.privileges.capabilities.0,
            bounding: spec.privileges.bounding.0 | spec.privileges.capabilities.0,
            filters,
            profile_programs,
        })
    }

    fn child(&self, join: Option<RawFd>, error_pipe: RawFd) -> Child<'_> {
        Child {
            v1_procs: &self.v1_procs,
            root: c"/",
            sandbox: &self.sandbox,
            tmp: c"/tmp",
            tmp_options: &self.tmp_options,
            proc_: c"/proc",
            hostname: &self.hostname,
            stdout: self.stdout.as_raw_fd(),
            stderr: self.stderr.as_raw_fd(),
            devnull: self.devnull.as_raw_fd(),
            error_pipe,
            program: &self.program,
            argv: &self.argv_ptrs,
            env: &self.env_ptrs,
            join: join.unwrap_or(-1),
            init: self.argv.is_empty(),
            user: self.user,
            groups: &self.groups,
            capabilities: self.capabilities,
            bounding: self.bounding,
            filters: &self.filters,
            masked_files: &host().masked_files,
            masked_dirs: &host().masked_dirs,
            read_only: &host().read_only,
            cap_last: host().cap_last,
        }
    }
}

/// What this host's kernel has, learnt once: which of the paths to mask
/// exist (a launch then makes no mount that must fail) and the highest
/// capability number (the bounding set is cut up to it, not to 63).
struct Host {
    masked_files: Vec<&'static CStr>,
    masked_dirs: Vec<&'static CStr>,
    read_only: Vec<&'static CStr>,
    cap_last: libc::c_ulong,
}

fn host() -> &'static Host {
    static HOST: std::sync::OnceLock<Host> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let present = |paths: &[&'static CStr]| -> Vec<&'static CStr> {
            paths
                .iter()
                .copied()
                .filter(|p| Path::new(p.to_str().unwrap_or("/")).exists())
                .collect()
        };
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(63);
        Host {
            masked_files: present(&MASKED_FILES),
            masked_dirs: present(&MASKED_DIRS),
            read_only: present(&READ_ONLY),
            cap_last,
        }
    })
}

/// Seccomp filters as the kernel takes them; they point into `filters`.
fn seccomp_programs(
    filters: &[Vec<libc::sock_filter>],
) -> Result<Vec<libc::sock_fprog>, SpawnError> {
    filters
        .iter()
        .map(|filter| {
            let len = u16::try_from(filter.len()).map_err(|_| SpawnError::Prepare {
                step: "build the seccomp filter",
                source: io::Error::other("the filter is longer than the kernel takes"),
            })?;
            Ok(libc::sock_fprog {
                len,
                filter: filter.as_ptr().cast_mut(),
            })
        })
        .collect()
}

/// The pipe the child reports a failed step on; it closes on exec.
fn error_pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: `pipe` has room for two fds.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Prepare {
            step: "create the error pipe",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) })
}

/// clone3 straight into the v2 cgroup `cgroup`: into new pid/mount/uts/ipc
/// namespaces, or (joining a group) into none, the child entering the
/// group's itself. (pid, pidfd) in the parent; pid 0 in the child.
fn clone_into(cgroup: &OwnedFd, join: Option<RawFd>) -> Result<(i32, RawFd), SpawnError> {
    let mut pidfd: RawFd = -1;
    let namespaces = if join.is_some() {
        0
    } else {
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
    };
    let mut args = CloneArgs {
        flags: (namespaces | libc::CLONE_PIDFD) as u64 | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without a stack forks this (single-threaded) process; the
    // child only runs `child_main`, which uses no allocator and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(SpawnError::Prepare {
            step: "clone3 into the namespaces",
            source: io::Error::last_os_error(),
        });
    }
    Ok((pid as i32, pidfd))
}

/// Waits for the child's exec: the pipe closes on success, or carries
/// [step, errno] when a step failed (the failed child is reaped).
fn await_exec(error_read: &OwnedFd, spawned: Spawned) -> Result<Spawned, SpawnError> {
    let mut report = [0u8; 8];
    let read = loop {
        // SAFETY: reading into a local buffer of the given size.
        let n = unsafe {
            libc::read(
                error_read.as_raw_fd(),
                report.as_mut_ptr().cast(),
                report.len(),
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if read == 8 {
        let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        // SAFETY: waiting for our own child by pid.
        unsafe { libc::waitpid(spawned.pid, std::ptr::null_mut(), 0) };
        return Err(SpawnError::Child {
            step: STEPS.get(step).copied().unwrap_or("setup"),
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(spawned)
}

fn resolve(program: &str, path_var: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    path_var
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Sends `signal` through a pidfd (no pid-reuse race).
pub fn signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Reaps an exited child through its pidfd; `None` if it is still running.
pub fn try_reap(pidfd: &OwnedFd) -> io::Result<Option<Exit>> {
    const P_PIDFD: libc::idtype_t = 3;
    // SAFETY: siginfo_t is plain data; waitid fills it for our own child.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: si_pid/si_status are valid to read after waitid for SIGCHLD info.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        Exit::Code(status)
    } else {
        Exit::Signal(status)
    }))
}

/// Waits (blocking) for the child behind `pidfd` to exit and reaps it.
pub fn wait(pidfd: &OwnedFd) -> io::Result<Exit> {
    loop {
        if let Some(exit) = try_reap(pidfd)? {
            return Ok(exit);
        }
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a pidfd polls readable when its process exits.
        let rc = unsafe { libc::poll(&mut poll, 1, -1) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
    }
}
