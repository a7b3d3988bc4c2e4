//! Hard disk limits per sandbox with project quotas, as Mesos's disk/xfs
//! isolator: each sandbox directory gets a project id that its files
//! inherit, and the filesystem refuses a write past the project's block
//! limit (XFS answers ENOSPC, ext4 EDQUOT). The project's usage is the
//! kernel's own count, so measuring a sandbox walks nothing.
//!
//! Needs a filesystem with project quotas enforced (XFS mounted with
//! `prjquota`, ext4 made with `-O quota,project` and mounted with
//! `prjquota`) and quotactl_fd (5.14+); elsewhere `probe` says why and the
//! agent falls back to measuring (disk/du).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

// Kernel ABI (include/uapi/linux/quota.h, dqblk_xfs.h, fs.h).
const PRJQUOTA: u32 = 2;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_SETQUOTA: u32 = 0x80_0008;
const Q_XGETQSTAT: u32 = (b'X' as u32) << 8 | 5;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
const QIF_BLIMITS: u32 = 1;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
/// Quota block limits are in 1 KiB units.
const QUOTA_BLOCK: u64 = 1024;

fn qcmd(command: u32, kind: u32) -> libc::c_int {
    // The kernel takes the command as an int with the high bit set.
    (command << 8 | (kind & 0xff)) as libc::c_int
}

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// Why a sandbox could not be given its limit.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "no free project id in {first}-{last} (--disk-project-range): every one holds a sandbox"
    )]
    Exhausted { first: u32, last: u32 },
    #[error("cannot {action} for {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The project quotas of the filesystem the work dir is on.
pub struct ProjectQuotas {
    /// The work dir, open: quotactl_fd's handle on its filesystem.
    dir: OwnedFd,
    range: RangeInclusive<u32>,
    /// Containers whose sandbox this agent gave a project, and its id.
    assigned: Mutex<HashMap<String, u32>>,
    /// Where the next search for a free id starts: after the last one given,
    /// so a launch does not ask the kernel about every id still in use.
    next: std::sync::atomic::AtomicU32,
}

impl ProjectQuotas {
    /// Project quotas on `work_dir`'s filesystem, if it enforces them;
    /// else why not (said once by the caller, which then measures instead).
    pub fn probe(work_dir: &Path, range: RangeInclusive<u32>) -> Result<Self, String> {
        let dir =
            open_dir(work_dir).map_err(|e| format!("cannot open {}: {e}", work_dir.display()))?;
        let mut state = [0u8; 128];
        quotactl_fd(
            &dir,
            qcmd(Q_XGETQSTAT, PRJQUOTA),
            0,
            state.as_mut_ptr().cast(),
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => format!(
                "the filesystem of {} has no quota support (or this kernel has no quotactl_fd: before 5.14, or built without quotas)",
                work_dir.display()
            ),
            Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) => format!(
                "the filesystem of {} has no project quotas (XFS or ext4 with prjquota)",
                work_dir.display()
            ),
            Some(libc::ESRCH | libc::ENOENT) => format!(
                "project quotas are off on the filesystem of {} (mount it with prjquota)",
                work_dir.display()
            ),
            _ => format!("cannot read the quota state of {}: {e}", work_dir.display()),
        })?;
        // struct fs_quota_stat: s8 version, (pad), u16 flags.
        let flags = u16::from_ne_bytes([state[2], state[3]]);
        if flags & FS_QUOTA_PDQ_ENFD == 0 {
            return Err(format!(
                "project quotas are counted but not enforced on the filesystem of {} (mount it with prjquota)",
                work_dir.display()
            ));
        }
        Ok(Self {
            dir,
            next: std::sync::atomic::AtomicU32::new(*range.start()),
            range,
            assigned: Mutex::default(),
        })
    }

    /// Gives `container`'s `sandbox` (a directory on this filesystem, still
    /// empty) a free project id and a hard limit of `bytes`; files made in
    /// it from now on count against it. Returns the id.
    pub fn limit(&self, container: &str, sandbox: &Path, bytes: u64) -> Result<u32, QuotaError> {
        let io_error = |action| {
            move |source| QuotaError::Io {
                action,
                path: sandbox.to_owned(),
                source,
            }
        };
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        let in_use: std::collections::HashSet<u32> = assigned.values().copied().collect();
        // A free id: not held by this agent and charged nothing (a sandbox
        // left from before still holds its id until it is removed); the
        // search goes round the range from where the last one ended.
        let start = self
            .next
            .load(std::sync::atomic::Ordering::Relaxed)
            .clamp(*self.range.start(), *self.range.end());
        let project = (start..=*self.range.end())
            .chain(*self.range.start()..start)
            .filter(|id| !in_use.contains(id))
            .find(|&id| {
                self.usage_of(id)
                    .is_ok_and(|(space, inodes)| space == 0 && inodes == 0)
            })
            .ok_or(QuotaError::Exhausted {
                first: *self.range.start(),
                last: *self.range.end(),
            })?;
        let dir = open_dir(sandbox).map_err(io_error("open the sandbox"))?;
        let mut attributes = FsXattr::default();
        ioctl(&dir, FS_IOC_FSGETXATTR, &mut attributes).map_err(io_error("read the project id"))?;
        attributes.projid = project;
        attributes.xflags |= FS_XFLAG_PROJINHERIT;
        ioctl(&dir, FS_IOC_FSSETXATTR, &mut attributes).map_err(io_error("set the project id"))?;
        let mut quota = zeroed_dqblk();
        quota.dqb_bhardlimit = bytes.div_ceil(QUOTA_BLOCK).max(1);
        quota.dqb_bsoftlimit = quota.dqb_bhardlimit;
        quota.dqb_valid = QIF_BLIMITS;
        quotactl_fd(
            &self.dir,
            qcmd(Q_SETQUOTA, PRJQUOTA),
            project,
            (&raw mut quota).cast(),
        )
        .map_err(io_error("set the project's limit"))?;
        assigned.insert(container.to_owned(), project);
        self.next.store(
            project.saturating_add(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(project)
    }

    /// Holds again the sandbox of a container recovered after a restart:
    /// its project id is read back from the directory. Its id, if it had one.
    pub fn restore(&self, container: &str, sandbox: &Path) -> Option<u32> {
        let dir = open_dir(sandbox).ok()?;
        let mut attributes = FsXattr::default();
        ioctl(&dir, FS_IOC_FSGETXATTR, &mut attributes).ok()?;
        let project = attributes.projid;
        if !self.range.contains(&project) {
            return None;
        }
        self.assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container.to_owned(), project);
        Some(project)
    }

    /// Bytes charged to `container`'s sandbox, if this agent gave it a project.
    pub fn usage(&self, container: &str) -> Option<u64> {
        let project = *self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(container)?;
        self.usage_of(project).ok().map(|(space, _)| space)
    }

    /// Stops holding `container`'s sandbox (it ended): the limit is lifted;
    /// the id stays charged, so unused, until the sandbox's files are removed.
    pub fn release(&self, container: &str) {
        let Some(project) = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container)
        else {
            return;
        };
        let mut quota = zeroed_dqblk();
        quota.dqb_valid = QIF_BLIMITS;
        if let Err(error) = quotactl_fd(
            &self.dir,
            qcmd(Q_SETQUOTA, PRJQUOTA),
            project,
            (&raw mut quota).cast(),
        ) {
            tracing::warn!(project, %error, "cannot lift a project's disk limit");
        }
    }

    /// (bytes, inodes) charged to a project.
    fn usage_of(&self, project: u32) -> io::Result<(u64, u64)> {
        let mut quota = zeroed_dqblk();
        quotactl_fd(
            &self.dir,
            qcmd(Q_GETQUOTA, PRJQUOTA),
            project,
            (&raw mut quota).cast(),
        )?;
        Ok((quota.dqb_curspace, quota.dqb_curinodes))
    }
}

fn zeroed_dqblk() -> libc::dqblk {
    // SAFETY: dqblk is plain integers; all zero is a valid value.
    #[allow(unsafe_code)]
    unsafe {
        std::mem::zeroed()
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; the fd returned is ours alone.
    #[allow(unsafe_code)]
    let fd: RawFd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this fd and nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn quotactl_fd(
    dir: &OwnedFd,
    command: libc::c_int,
    id: u32,
    address: *mut libc::c_void,
) -> io::Result<()> {
    // SAFETY: `address` points to a buffer the size the command writes
    // (dqblk, or the 128 bytes given for fs_quota_stat's ~80).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_quotactl_fd, dir.as_raw_fd(), command, id, address) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl(dir: &OwnedFd, request: libc::c_ulong, attributes: &mut FsXattr) -> io::Result<()> {
    // SAFETY: FS_IOC_FS[GS]ETXATTR read or write one struct fsxattr.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, std::ptr::from_mut(attributes)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_commands_encode_as_the_kernel_expects() {
        // QCMD(Q_SETQUOTA, PRJQUOTA) from quota.h: 0x80000802.
        assert_eq!(qcmd(Q_SETQUOTA, PRJQUOTA) as u32, 0x8000_0802);
        assert_eq!(qcmd(Q_XGETQSTAT, PRJQUOTA) as u32, 0x0058_0502);
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
    }
}
