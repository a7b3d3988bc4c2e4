//! The launcher: a single-threaded process (this binary again, exec'd by the
//! agent with `LAUNCHER_FD_ENV` naming its socket) that starts every
//! container, so that nothing forks from the agent's multi-threaded runtime.
//!
//! Each container gets a supervisor: a process forked by the launcher, in a
//! session of its own, that spawns the container, records it in the
//! container's record directory (`started.json`), waits for it and records
//! how it ended (`exit.json`). Supervisors outlive the launcher and the
//! agent, so a container keeps running, and its end is known, while no agent
//! runs; the launcher itself ends when the agent's end of its socket closes,
//! and the agent starts another whenever it finds it gone.
//!
//! Agent and launcher speak length-prefixed JSON over a Unix socket pair.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use butte_isolators::container::{self, ContainerSpec, Exit};
use butte_isolators::process::Process;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_replace;
use crate::launcher_client::ContainerExit;

/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Set (to its socket's fd number) in the environment of the launcher process.
pub const LAUNCHER_FD_ENV: &str = "BUTTE_LAUNCHER_FD";

/// In a container's record directory: the supervisor's `Started`.
pub const STARTED_FILE: &str = "started.json";
/// In a container's record directory: the supervisor's `ContainerExit`.
pub const EXIT_FILE: &str = "exit.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub container_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sandbox: PathBuf,
    pub hostname: String,
    pub cgroup: PathBuf,
    pub v1_procs: Vec<PathBuf>,
    pub tmp_mb: u64,
    /// Run inside this running container (a task group's init) instead of a new one.
    pub join: Option<Process>,
    /// Who the task runs as and the capabilities it keeps.
    pub privileges: butte_isolators::container::Privileges,
    /// Where the supervisor records the container's start and end.
    pub record_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Launch(Box<LaunchRequest>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The container exec'd; `micros` is clone-to-exec time.
    Launched {
        container_id: String,
        started: Started,
        micros: u64,
    },
    LaunchFailed {
        container_id: String,
        error: String,
    },
}

/// A running container: its first process and the supervisor waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub process: Process,
    pub supervisor: Process,
}

pub fn write_message<T: Serialize>(stream: &mut impl Write, message: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(body.len() + 4);
    framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
    framed.extend_from_slice(&body);
    stream.write_all(&framed)
}

pub fn read_message<T: for<'de> Deserialize<'de>>(stream: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "launcher message of {len} bytes is over the limit"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

/// Starts a launcher process; the agent's end of its socket, and the child
/// to reap once that socket closes.
#[allow(unsafe_code)]
pub fn start() -> std::io::Result<(UnixStream, std::process::Child)> {
    let (agent_end, launcher_end) = UnixStream::pair()?;
    let fd = launcher_end.as_raw_fd();
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0("butte-launcher")
        .env(LAUNCHER_FD_ENV, fd.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: fcntl is async-signal-safe; it only lets the socket survive exec.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(launcher_end);
    Ok((agent_end, child))
}

/// When this process was started as a launcher: serves its socket and
/// returns the exit code. None when it is the agent.
pub fn run_if_launcher() -> Option<i32> {
    let fd: RawFd = std::env::var(LAUNCHER_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: the agent passed this fd, the launcher's end of its socket,
    // and nothing else in this process owns it.
    #[allow(unsafe_code)]
    let socket = unsafe {
        // Containers and supervisors must not inherit it.
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        // Supervisors are reaped by the kernel: nobody waits for them here.
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::prctl(libc::PR_SET_NAME, c"butte-launcher".as_ptr());
        UnixStream::from_raw_fd(fd)
    };
    Some(match serve(socket) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("butte launcher: {error}");
            1
        }
    })
}

/// The launcher's loop: one launch at a time, until the agent goes.
fn serve(mut socket: UnixStream) -> std::io::Result<()> {
    loop {
        let request: Request = match read_message(&mut socket) {
            Ok(request) => request,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let Request::Launch(launch) = request;
        let reply = launch_one(*launch, socket.as_raw_fd());
        write_message(&mut socket, &reply)?;
    }
}

/// Forks the container's supervisor and waits for its word on the launch.
#[allow(unsafe_code)]
fn launch_one(launch: LaunchRequest, socket: RawFd) -> Reply {
    let container_id = launch.container_id.clone();
    let failed = |error: String| Reply::LaunchFailed {
        container_id: container_id.clone(),
        error,
    };
    let mut pipe = [0; 2];
    // SAFETY: pipe2 fills two fds, owned below.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return failed(format!(
            "cannot make the supervisor's pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both fds were just made and are owned nowhere else.
    let (report_read, report_write) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    // The record directory, made just before the fork, tells a launch the
    // launcher died during before it forked (none: nothing started, the
    // launch may go again) from one it died during after.
    if let Err(error) = std::fs::create_dir_all(&launch.record_dir) {
        return failed(format!(
            "cannot make the container's record directory {}: {error}",
            launch.record_dir.display()
        ));
    }
    // SAFETY: the launcher is single-threaded; the child runs `supervise` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return failed(format!(
            "cannot fork the supervisor: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        drop(report_read);
        // SAFETY: the agent's socket must close when the launcher goes, so
        // no supervisor may hold it.
        unsafe { libc::close(socket) };
        supervise(launch, report_write);
    }
    drop(report_write);
    match read_message::<Reply>(&mut std::fs::File::from(report_read)) {
        Ok(reply) => reply,
        Err(error) => failed(format!(
            "the container's supervisor ended before it reported: {error}"
        )),
    }
}

/// The supervisor: spawns the container, reports on `report`, waits for it
/// and records its end. Never returns.
#[allow(unsafe_code)]
fn supervise(launch: LaunchRequest, report: OwnedFd) -> ! {
    // SAFETY: setsid/signal/prctl have no memory effects. A session of its
    // own keeps the supervisor from a terminal's Ctrl-C aimed at the agent;
    // SIGCHLD back to default so that it can wait for its container.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_NAME, c"butte-supervise".as_ptr());
    }
    let mut report = std::fs::File::from(report);
    let container_id = launch.container_id.clone();
    let record_dir = launch.record_dir.clone();
    let started = Instant::now();
    let spawned = spawn(launch);
    let micros = started.elapsed().as_micros() as u64;
    let (pidfd, started) = match spawned.and_then(|spawned| {
        let started = Started {
            process: Process::of(spawned.pid)
                .map_err(|e| format!("cannot read the container's start: {e}"))?,
            supervisor: Process::current()
                .map_err(|e| format!("cannot read the supervisor's start: {e}"))?,
        };
        let recorded = serde_json::to_vec(&started)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_replace(&record_dir.join(STARTED_FILE), &bytes));
        if let Err(error) = recorded {
            // A container the next agent could not find again is not started.
            let _ = container::signal(&spawned.pidfd, libc::SIGKILL);
            let _ = container::wait(&spawned.pidfd);
            return Err(format!(
                "cannot record the container's start in {}: {error}",
                record_dir.display()
            ));
        }
        Ok((spawned.pidfd, started))
    }) {
        Ok(running) => running,
        Err(error) => {
            let _ = write_message(
                &mut report,
                &Reply::LaunchFailed {
                    container_id,
                    error,
                },
            );
            std::process::exit(1);
        }
    };
    let _ = write_message(
        &mut report,
        &Reply::Launched {
            container_id,
            started,
            micros,
        },
    );
    drop(report);
    let code = match container::wait(&pidfd) {
        Ok(exit) => {
            let (code, signal) = match exit {
                Exit::Code(c) => (Some(c), None),
                Exit::Signal(s) => (None, Some(s)),
            };
            let record = ContainerExit { code, signal };
            let written = serde_json::to_vec(&record)
                .map_err(std::io::Error::other)
                .and_then(|bytes| write_replace(&record_dir.join(EXIT_FILE), &bytes));
            i32::from(written.is_err())
        }
        Err(_) => 1,
    };
    std::process::exit(code)
}

fn spawn(launch: LaunchRequest) -> Result<container::Spawned, String> {
    let spec = ContainerSpec {
        argv: launch.argv,
        env: launch.env,
        sandbox: launch.sandbox,
        hostname: launch.hostname,
        cgroup: launch.cgroup,
        v1_procs: launch.v1_procs,
        tmp_mb: launch.tmp_mb,
        privileges: launch.privileges,
    };
    let spawned = match &launch.join {
        None => container::spawn(&spec),
        Some(init) => {
            let init = init
                .open()
                .map_err(|e| format!("the task group's container is not running: {e}"))?;
            container::join(&init, &spec)
        }
    };
    spawned.map_err(|e| e.to_string())
}

/// A container's recorded start, if its supervisor wrote one.
pub fn read_started(record_dir: &Path) -> Option<Started> {
    let bytes = std::fs::read(record_dir.join(STARTED_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A container's recorded end, if its supervisor wrote one.
pub fn read_exit(record_dir: &Path) -> Option<ContainerExit> {
    let bytes = std::fs::read(record_dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
