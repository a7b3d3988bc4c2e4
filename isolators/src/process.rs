//! A process named so that a pid reused by someone else is never mistaken
//! for it: its pid and its start time (clock ticks after boot, field 22 of
//! `/proc/PID/stat`). A pidfd opened through `Process::open` is checked
//! against the start time, so it refers to this process and no other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: i32,
    pub start_time: u64,
}

impl Process {
    /// The process with this pid now (it must exist).
    pub fn of(pid: i32) -> io::Result<Self> {
        Ok(Self {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// This process itself.
    pub fn current() -> io::Result<Self> {
        Self::of(std::process::id() as i32)
    }

    /// A pidfd for this very process; `NotFound` when it is gone (its pid
    /// may since name another process).
    pub fn open(&self) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        #[allow(unsafe_code)]
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            let error = io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::ESRCH) => gone(self.pid),
                _ => error,
            });
        }
        // SAFETY: the fd was just returned to us and is owned nowhere else.
        #[allow(unsafe_code)]
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pidfd holds the pid: if the start time matches now, it is ours.
        match start_time(self.pid) {
            Ok(start) if start == self.start_time => Ok(pidfd),
            Ok(_) => Err(gone(self.pid)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Err(gone(self.pid)),
            Err(error) => Err(error),
        }
    }
}

fn gone(pid: i32) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("process {pid} is gone"))
}

/// Whether the process behind `pidfd` has exited (it polls readable then).
pub fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    #[allow(unsafe_code)]
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last ')'.
fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat has no command name")))?;
    // After the name: state is field 3, so start time (22) is the 20th.
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat has no start time")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_opens_and_a_wrong_start_time_does_not() {
        let me = Process::current().expect("own stat");
        assert!(me.start_time > 0);
        let pidfd = me.open().expect("pidfd");
        assert!(!has_exited(&pidfd));
        let impostor = Process {
            start_time: me.start_time + 1,
            ..me
        };
        assert_eq!(
            impostor.open().map(|_| ()).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn an_exited_child_reads_as_exited() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let process = Process::of(child.id() as i32).expect("stat");
        let pidfd = process.open().expect("pidfd");
        child.wait().expect("reap");
        assert!(has_exited(&pidfd));
        assert_eq!(
            process.open().map(|_| ()).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound),
            "a reaped process is gone"
        );
    }
}
