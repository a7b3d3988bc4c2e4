//! The agent's hold on its running containers: a pidfd for each one's first
//! process, checked against its recorded start (signals go through it), and
//! a watch on its supervisor, whose end brings the container's exit record.
//! The same path serves containers this agent launched and those it
//! re-adopts after a restart.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use butte_isolators::container;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use butte_isolators::process::{Process, has_exited};

use crate::launcher::{Started, read_exit};
use crate::launcher_client::ContainerExit;

/// Container ends, as (container id, how it ended).
pub type Exits = mpsc::UnboundedReceiver<(String, ContainerExit)>;

/// A running container as the agent holds it.
struct Held {
    started: Started,
    /// Its first process (None: it had ended when it was adopted).
    process: Option<Arc<OwnedFd>>,
}

pub struct Containers {
    held: Mutex<HashMap<String, Held>>,
    exits: mpsc::UnboundedSender<(String, ContainerExit)>,
}

impl Containers {
    pub fn new() -> (Self, Exits) {
        let (exits, received) = mpsc::unbounded_channel();
        (
            Self {
                held: Mutex::default(),
                exits,
            },
            received,
        )
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a started container and reports its end on the exits channel
    /// (at once when it ended already). Call inside the runtime.
    pub fn watch(&self, container_id: &str, record_dir: &Path, started: Started) {
        let process = open(&started.process, container_id).map(Arc::new);
        self.held().insert(
            container_id.to_owned(),
            Held {
                started,
                process: process.clone(),
            },
        );
        let exits = self.exits.clone();
        let container_id = container_id.to_owned();
        let record_dir = record_dir.to_owned();
        tokio::spawn(async move {
            let exit = ended(&container_id, started, process, record_dir).await;
            let _ = exits.send((container_id, exit));
        });
    }

    /// A container whose start is not known to have happened: its end is
    /// whatever its record says (nothing: not known), reported at once.
    pub fn report_gone(&self, container_id: &str, record_dir: &Path) {
        let exit = recorded_exit(record_dir);
        let _ = self.exits.send((container_id.to_owned(), exit));
    }

    /// Sends `signal` to the container's first process; false when it is
    /// not held (not started yet, or ended).
    pub fn signal(&self, container_id: &str, signal: i32) -> bool {
        let process = self
            .held()
            .get(container_id)
            .and_then(|held| held.process.clone());
        process.is_some_and(|pidfd| container::signal(&pidfd, signal).is_ok())
    }

    /// What a running container started (a task group's init, which its
    /// tasks join).
    pub fn started(&self, container_id: &str) -> Option<Started> {
        self.held().get(container_id).map(|held| held.started)
    }

    /// Lets go of an ended container.
    pub fn forget(&self, container_id: &str) {
        self.held().remove(container_id);
    }
}

/// A pidfd for `process`; None when it is gone. Any other error (no fd
/// left, say) is not taken for its end: it is logged and tried again.
fn open(process: &Process, container_id: &str) -> Option<OwnedFd> {
    match process.open() {
        Ok(pidfd) => Some(pidfd),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::error!(container_id, %error, "cannot open a pidfd; the container is watched by polling");
            None
        }
    }
}

/// Until `process` has ended: through a pidfd, or, where none can be
/// opened for a reason other than its end, by looking every second.
async fn gone(process: &Process, container_id: &str) {
    loop {
        match process.open() {
            Ok(pidfd) => return readable(pidfd).await,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => {
                tracing::debug!(container_id, %error, "cannot open a pidfd yet");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waits for the supervisor to end, then reads the record it left; a
/// supervisor that died without one leaves the container's own end to wait
/// for, and an exit not known.
async fn ended(
    container_id: &str,
    started: Started,
    process: Option<Arc<OwnedFd>>,
    record_dir: PathBuf,
) -> ContainerExit {
    gone(&started.supervisor, container_id).await;
    if let Some(exit) = read_exit(&record_dir) {
        return exit;
    }
    tracing::warn!(
        container_id,
        "a container's supervisor ended without recording its exit; waiting for the container itself"
    );
    match process {
        Some(process) => readable_shared(process).await,
        None => gone(&started.process, container_id).await,
    }
    recorded_exit(&record_dir)
}

fn recorded_exit(record_dir: &Path) -> ContainerExit {
    read_exit(record_dir).unwrap_or(ContainerExit {
        code: None,
        signal: None,
    })
}

/// Until the process behind the pidfd exits (a pidfd polls readable then).
async fn readable(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the pidfd, which stays open, and as_raw_fd
    // returns that same fd, for as long as it is registered.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(error) => {
            let (pidfd, cause) = error.into_parts();
            tracing::error!(%cause, "cannot watch a pidfd; polling it");
            while !has_exited(&pidfd) {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

async fn readable_shared(pidfd: Arc<OwnedFd>) {
    match pidfd.try_clone() {
        Ok(owned) => readable(owned).await,
        Err(error) => {
            tracing::error!(%error, "cannot watch a pidfd; polling it");
            while !has_exited(&pidfd) {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
