//! Pins in bpffs, so that the fences outlive the agent: while no agent runs
//! its programs stay attached (a pinned link holds them) and its maps keep
//! every task's entries and counts. A starting agent loads its programs
//! again over the same maps and swaps each pinned link to the new program
//! in one step (`BPF_LINK_UPDATE`), so no packet, bind or open goes
//! unchecked in between.
//!
//! Links are made here (BPF_LINK_CREATE) rather than through aya, whose
//! device-program link cannot be pinned.
//!
//! Layout, under `/sys/fs/bpf/butte/<agent>/`: `maps/<object>-<hash>/<map>`
//! (a changed object gets new maps: a layout may have changed) and
//! `links/<object>-<program>`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::{FenceError, failed};

/// Where bpffs is mounted (as systemd does).
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One agent's pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

fn pin_error(path: &Path, detail: impl std::fmt::Display) -> FenceError {
    FenceError::Pin {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl Pins {
    /// The pin directory of the agent named `name` (its cgroup subtree,
    /// `/` made `_`); bpffs is mounted at /sys/fs/bpf where it is not.
    pub fn open(name: &str) -> Result<Self, FenceError> {
        mount_bpffs()?;
        let name = name.trim_matches('/').replace('/', "_");
        let dir = Path::new(BPFFS).join("butte").join(name);
        for sub in ["maps", "links"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| pin_error(&dir, e))?;
        }
        Ok(Self { dir })
    }

    /// The directory of an object's maps: one per build of the object.
    pub(crate) fn maps_dir(&self, object: &str, bytes: &[u8]) -> Result<PathBuf, FenceError> {
        let dir = self
            .dir
            .join("maps")
            .join(format!("{object}-{:016x}", fnv1a(bytes)));
        std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir, e))?;
        Ok(dir)
    }

    /// Removes the maps of an object's other builds (their programs are
    /// no longer attached: every link now runs this build).
    pub(crate) fn prune_maps(&self, object: &str, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("maps")) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path != keep && name.starts_with(&format!("{object}-")) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    /// The pin of an object's program's link.
    fn link_path(&self, object: &str, program: &str) -> PathBuf {
        self.dir.join("links").join(format!("{object}-{program}"))
    }

    /// Removes every pin: the programs detach once nothing else holds them.
    pub fn remove(&self) {
        if let Err(error) = std::fs::remove_dir_all(&self.dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(dir = %self.dir.display(), %error, "cannot remove the eBPF pins");
        }
    }
}

/// A loaded cgroup program's place at its hook.
pub(crate) enum Attached {
    /// A link of its own (pinned, with pins): keep it, or the program
    /// detaches when it is dropped and not pinned.
    Link(OwnedFd),
    /// A link an earlier agent pinned, still running that agent's program
    /// over that agent's maps until `Switch::commit`.
    Pending(Switch),
}

/// A pinned link to be switched to a new program once the new program's
/// maps hold every task's entries (until then the old program, with its
/// own maps, keeps enforcing).
pub(crate) struct Switch {
    path: PathBuf,
    link: OwnedFd,
    program: OwnedFd,
    cgroup: OwnedFd,
    attach_type: u32,
    name: &'static str,
}

impl Switch {
    /// BPF_LINK_UPDATE: the hook runs the new program from this instant.
    /// Where the kernel refuses, the new program gets a link of its own
    /// first (both run a moment, each denying what it must), then the old
    /// pin goes and the new link is pinned in its place.
    pub(crate) fn commit(self) -> Result<OwnedFd, FenceError> {
        let Err(error) = link_update(self.link.as_fd(), self.program.as_fd()) else {
            return Ok(self.link);
        };
        tracing::warn!(path = %self.path.display(), %error, "cannot switch the pinned link to the new program; attaching it beside, then replacing the pin");
        let link = link_create(self.program.as_fd(), self.cgroup.as_fd(), self.attach_type)
            .map_err(|e| failed(self.name, "attach", &e))?;
        let _ = std::fs::remove_file(&self.path);
        obj_pin(link.as_fd(), &self.path)
            .map_err(|e| pin_error(&self.path, format!("cannot pin the link: {e}")))?;
        Ok(link)
    }
}

/// Attaches a loaded cgroup program (`attach_type` as the kernel numbers
/// them) to `cgroup` through a bpf_link. With `pins` the link is pinned, so
/// that it outlives the agent; where an earlier agent pinned one, that link
/// is taken over at `Switch::commit` instead.
pub(crate) fn attach_cgroup(
    pins: Option<&Pins>,
    object: &str,
    program: &'static str,
    program_fd: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<Attached, FenceError> {
    let create =
        || link_create(program_fd, cgroup, attach_type).map_err(|e| failed(program, "attach", &e));
    let Some(pins) = pins else {
        return create().map(Attached::Link);
    };
    let path = pins.link_path(object, program);
    if path.exists() {
        let owned = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
        match (obj_get(&path), owned(program_fd), owned(cgroup)) {
            (Ok(link), Ok(program_copy), Ok(cgroup_copy)) => {
                return Ok(Attached::Pending(Switch {
                    path,
                    link,
                    program: program_copy,
                    cgroup: cgroup_copy,
                    attach_type,
                    name: program,
                }));
            }
            (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
                tracing::warn!(path = %path.display(), %error, "a pin that cannot be taken over; attaching anew");
                let link = create()?;
                let _ = std::fs::remove_file(&path);
                obj_pin(link.as_fd(), &path)
                    .map_err(|e| pin_error(&path, format!("cannot pin the link: {e}")))?;
                return Ok(Attached::Link(link));
            }
        }
    }
    let link = create()?;
    obj_pin(link.as_fd(), &path)
        .map_err(|e| pin_error(&path, format!("cannot pin the link: {e}")))?;
    Ok(Attached::Link(link))
}

/// A fence's links: its own, and the pinned ones it takes over at `commit`.
#[derive(Default)]
pub(crate) struct Links {
    held: Vec<OwnedFd>,
    pending: Vec<Switch>,
    /// The maps of this build, once every link runs it: the other builds'
    /// maps are removed then.
    maps: Option<(Pins, PathBuf, &'static str)>,
}

impl Links {
    pub(crate) fn new(
        pins: Option<&Pins>,
        maps_dir: Option<PathBuf>,
        object: &'static str,
    ) -> Self {
        Self {
            maps: pins.cloned().zip(maps_dir).map(|(p, d)| (p, d, object)),
            ..Self::default()
        }
    }

    pub(crate) fn add(&mut self, attached: Attached) {
        match attached {
            Attached::Link(link) => self.held.push(link),
            Attached::Pending(switch) => self.pending.push(switch),
        }
    }

    /// Switches every pinned link taken over to this agent's programs (call
    /// once their maps hold every task's entries), then drops the maps of
    /// other builds. The first error, after trying them all.
    pub(crate) fn commit(&mut self) -> Result<(), FenceError> {
        let mut first = None;
        for switch in self.pending.drain(..) {
            match switch.commit() {
                Ok(link) => self.held.push(link),
                Err(error) => {
                    first.get_or_insert(error);
                }
            }
        }
        if first.is_none()
            && let Some((pins, dir, object)) = &self.maps
        {
            pins.prune_maps(object, dir);
        }
        first.map_or(Ok(()), Err)
    }
}

/// The bpf(2) syscall; its return value.
#[allow(unsafe_code)]
pub(crate) fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> std::io::Result<libc::c_long> {
    // SAFETY: the callers pass a pointer to an attr struct of `size` bytes
    // that lives across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// BPF_LINK_CREATE for a cgroup program.
#[allow(unsafe_code)]
fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(
        BPF_LINK_CREATE,
        (&raw mut attr).cast(),
        std::mem::size_of::<LinkCreateAttr>(),
    )?;
    // SAFETY: the fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
}

/// BPF_OBJ_PIN: pins the object behind `fd` at `path`.
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    let c_path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(
        BPF_OBJ_PIN,
        (&raw mut attr).cast(),
        std::mem::size_of::<ObjAttr>(),
    )
    .map(drop)
}

/// BPF_OBJ_GET: a new fd for the object pinned at `path`.
#[allow(unsafe_code)]
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(
        BPF_OBJ_GET,
        (&raw mut attr).cast(),
        std::mem::size_of::<ObjAttr>(),
    )?;
    // SAFETY: the fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: the link runs `program` from now on (one step: the
/// hook never runs without a program).
fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(
        BPF_LINK_UPDATE,
        (&raw mut attr).cast(),
        std::mem::size_of::<LinkUpdateAttr>(),
    )
    .map(drop)
}

/// Mounts bpffs at /sys/fs/bpf unless it is there.
#[allow(unsafe_code)]
pub(crate) fn mount_bpffs() -> Result<(), FenceError> {
    let path = Path::new(BPFFS);
    let c_path = c"/sys/fs/bpf";
    // SAFETY: statfs fills the struct for a valid path.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0
        && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    // SAFETY: mount(2) with valid strings; bpffs takes no device.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(pin_error(
            path,
            format!("cannot mount bpffs: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

/// 64-bit FNV-1a: names a build of an object.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
