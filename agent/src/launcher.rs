//! The launcher: a single-threaded process, forked by the agent before its
//! runtime starts, that spawns every container (so nothing forks from the
//! multi-threaded tokio runtime), reaps them, and reports their exits. If the
//! agent goes away, the launcher kills every container it started and exits.
//!
//! Agent and launcher speak length-prefixed JSON over a Unix socket pair.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use butte_isolators::container::{self, ContainerSpec, Exit};
use serde::{Deserialize, Serialize};

/// Largest message either side accepts.
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub container_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sandbox: std::path::PathBuf,
    pub hostname: String,
    pub cgroup: std::path::PathBuf,
    pub v1_procs: Vec<std::path::PathBuf>,
    pub tmp_mb: u64,
    /// Run inside this running container (a task group's init) instead of a new one.
    pub join: Option<String>,
    /// Who the task runs as and the capabilities it keeps.
    pub privileges: butte_isolators::container::Privileges,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Launch(Box<LaunchRequest>),
    Signal { container_id: String, signal: i32 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The container exec'd; `micros` is clone-to-exec time.
    Launched {
        container_id: String,
        pid: i32,
        micros: u64,
    },
    LaunchFailed {
        container_id: String,
        error: String,
    },
    /// Its first process ended; `code` or `signal` says how.
    Exited {
        container_id: String,
        code: Option<i32>,
        signal: Option<i32>,
    },
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

/// Forks the launcher. Call before any thread exists (before the runtime).
/// Returns the agent's end of the socket.
#[allow(unsafe_code)]
pub fn fork_launcher() -> std::io::Result<UnixStream> {
    let (agent_end, launcher_end) = UnixStream::pair()?;
    // SAFETY: called while the process is single-threaded; the child only
    // runs `run` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(agent_end);
        // SAFETY: prctl/setsid have no memory effects.
        unsafe {
            // The launcher must not outlive the agent by accident.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        let code = match run(launcher_end) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("butte launcher: {error}");
                1
            }
        };
        std::process::exit(code);
    }
    Ok(agent_end)
}

struct Running {
    pidfd: OwnedFd,
}

/// The launcher's loop: requests from the agent, exits of containers.
fn run(mut socket: UnixStream) -> std::io::Result<()> {
    let mut running: HashMap<String, Running> = HashMap::new();
    let result = serve(&mut socket, &mut running);
    // The agent is gone (or the loop failed): take every container down with us.
    for (_, container) in running.drain() {
        let _ = container::signal(&container.pidfd, libc::SIGKILL);
        let _ = container::wait(&container.pidfd);
    }
    result
}

#[allow(unsafe_code)]
fn serve(socket: &mut UnixStream, running: &mut HashMap<String, Running>) -> std::io::Result<()> {
    loop {
        let mut fds = vec![libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ids: Vec<String> = running.keys().cloned().collect();
        for id in &ids {
            fds.push(libc::pollfd {
                fd: running[id].pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for (i, id) in ids.iter().enumerate() {
            if fds[i + 1].revents == 0 {
                continue;
            }
            let Some(container) = running.get(id) else {
                continue;
            };
            if let Some(exit) = container::try_reap(&container.pidfd)? {
                running.remove(id);
                let (code, signal) = match exit {
                    Exit::Code(c) => (Some(c), None),
                    Exit::Signal(s) => (None, Some(s)),
                };
                write_message(
                    socket,
                    &Reply::Exited {
                        container_id: id.clone(),
                        code,
                        signal,
                    },
                )?;
            }
        }
        if fds[0].revents != 0 {
            let request: Request = match read_message(socket) {
                Ok(request) => request,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            match request {
                Request::Launch(launch) => {
                    let reply = launch_one(*launch, running);
                    write_message(socket, &reply)?;
                }
                Request::Signal {
                    container_id,
                    signal,
                } => {
                    if let Some(container) = running.get(&container_id) {
                        let _ = container::signal(&container.pidfd, signal);
                    }
                }
            }
        }
    }
}

fn launch_one(launch: LaunchRequest, running: &mut HashMap<String, Running>) -> Reply {
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
    let started = Instant::now();
    let spawned = match &launch.join {
        None => container::spawn(&spec),
        Some(group) => match running.get(group) {
            Some(init) => container::join(&init.pidfd, &spec),
            None => {
                return Reply::LaunchFailed {
                    container_id: launch.container_id,
                    error: format!("task group container {group} is not running"),
                };
            }
        },
    };
    match spawned {
        Ok(spawned) => {
            let micros = started.elapsed().as_micros() as u64;
            let pid = spawned.pid;
            running.insert(
                launch.container_id.clone(),
                Running {
                    pidfd: spawned.pidfd,
                },
            );
            Reply::Launched {
                container_id: launch.container_id,
                pid,
                micros,
            }
        }
        Err(error) => Reply::LaunchFailed {
            container_id: launch.container_id,
            error: error.to_string(),
        },
    }
}
