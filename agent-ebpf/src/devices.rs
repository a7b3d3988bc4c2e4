//! Device fences: a cgroup/dev program lets a task open or mknod only the
//! devices on its allow list (the defaults every container needs, plus what
//! its resources grant, e.g. GPUs); anything else is EPERM.

use std::path::Path;

use aya::maps::{HashMap, MapData};
use std::os::fd::AsFd;

use aya::programs::CgroupDevice;
use aya::{Ebpf, Pod};

use crate::pins::{Links, Pins, attach_cgroup};
use crate::{FenceError, failed};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/devices.bpf.o"));

/// Rules one task may have (the C side's MAX_RULES).
pub const MAX_RULES: usize = 64;
/// Matches any major or minor number.
pub const ANY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Char,
    Block,
    Both,
}

/// What a rule allows: read, write, mknod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub mknod: bool,
}

pub const RWM: Access = Access {
    read: true,
    write: true,
    mknod: true,
};
pub const MKNOD_ONLY: Access = Access {
    read: false,
    write: false,
    mknod: true,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: Kind,
    pub major: u32,
    pub minor: u32,
    pub access: Access,
}

/// What every container may use: mknod of anything (opening is what is
/// fenced), null, zero, full, random, urandom, tty, ptmx and the pty slaves.
pub fn default_rules() -> Vec<DeviceRule> {
    let char_rule = |major, minor| DeviceRule {
        kind: Kind::Char,
        major,
        minor,
        access: RWM,
    };
    vec![
        DeviceRule {
            kind: Kind::Both,
            major: ANY,
            minor: ANY,
            access: MKNOD_ONLY,
        },
        char_rule(1, 3),
        char_rule(1, 5),
        char_rule(1, 7),
        char_rule(1, 8),
        char_rule(1, 9),
        char_rule(5, 0),
        char_rule(5, 2),
        char_rule(136, ANY),
    ]
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawRule {
    kind: u32,
    major: u32,
    minor: u32,
    access: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawRules {
    count: u32,
    rules: [RawRule; MAX_RULES],
}

// SAFETY: plain old data with the C layout of `struct device_rules` (all
// u32: no padding, every bit pattern valid).
#[allow(unsafe_code)]
unsafe impl Pod for RawRules {}

// The kernel's BPF_DEVCG_* values (linux/bpf.h).
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;

fn raw(rule: &DeviceRule) -> RawRule {
    RawRule {
        kind: match rule.kind {
            Kind::Char => DEV_CHAR,
            Kind::Block => DEV_BLOCK,
            Kind::Both => 0,
        },
        major: rule.major,
        minor: rule.minor,
        access: (u32::from(rule.access.read) * ACC_READ)
            | (u32::from(rule.access.write) * ACC_WRITE)
            | (u32::from(rule.access.mknod) * ACC_MKNOD),
    }
}

/// The rule as a v1 `devices.allow` line, e.g. `c 1:3 rwm` or `a *:* m`.
pub fn v1_rule(rule: &DeviceRule) -> String {
    let kind = match rule.kind {
        Kind::Char => "c",
        Kind::Block => "b",
        Kind::Both => "a",
    };
    let number = |n: u32| {
        if n == ANY {
            "*".to_owned()
        } else {
            n.to_string()
        }
    };
    let mut access = String::new();
    for (allowed, letter) in [
        (rule.access.read, 'r'),
        (rule.access.write, 'w'),
        (rule.access.mknod, 'm'),
    ] {
        if allowed {
            access.push(letter);
        }
    }
    format!(
        "{kind} {}:{} {access}",
        number(rule.major),
        number(rule.minor)
    )
}

pub struct DeviceFence {
    _bpf: Ebpf,
    /// Its link (see `pins::Links`).
    links: Links,
    rules: HashMap<MapData, u64, RawRules>,
    denied: HashMap<MapData, u64, u64>,
}

impl DeviceFence {
    /// Loads the program and attaches it to `subtree` (a v2 cgroup
    /// directory); with `pins`, over the pinned maps and link (see `pins`).
    pub fn attach(subtree: &Path, pins: Option<&Pins>) -> Result<Self, FenceError> {
        let (mut bpf, maps_dir) =
            crate::load("devices", OBJECT, pins, &["task_devices", "denied_opens"])?;
        let cgroup = crate::open_cgroup(subtree)?;
        let mut links = Links::new(pins, maps_dir, "devices");
        let program: &mut CgroupDevice = crate::program_mut(&mut bpf, "devices")?;
        program
            .load()
            .map_err(|e| failed("devices", "load into the kernel", &e))?;
        let fd = crate::program_fd(program.fd(), "devices")?;
        const BPF_CGROUP_DEVICE: u32 = 6;
        links.add(attach_cgroup(
            pins,
            "devices",
            "devices",
            fd.as_fd(),
            cgroup.as_fd(),
            BPF_CGROUP_DEVICE,
        )?);
        let rules = crate::take_cgroup_map(&mut bpf, "task_devices")?;
        let denied = crate::take_cgroup_map(&mut bpf, "denied_opens")?;
        Ok(Self {
            _bpf: bpf,
            links,
            rules,
            denied,
        })
    }

    /// Takes over the links an earlier agent pinned (see `pins::Links::commit`).
    pub fn commit(&mut self) -> Result<(), FenceError> {
        self.links.commit()
    }

    /// Lets the task in `cgroup_id` use only `rules`.
    pub fn allow(&mut self, cgroup_id: u64, rules: &[DeviceRule]) -> Result<(), FenceError> {
        if rules.len() > MAX_RULES {
            return Err(FenceError::TooMany {
                what: "device rules",
                count: rules.len(),
                limit: MAX_RULES,
            });
        }
        let mut value = RawRules {
            count: rules.len() as u32,
            rules: [RawRule::default(); MAX_RULES],
        };
        for (slot, rule) in value.rules.iter_mut().zip(rules) {
            *slot = raw(rule);
        }
        self.rules
            .insert(cgroup_id, value, 0)
            .map_err(|e| crate::insert_failed("task_devices", &e))
    }

    /// The denied-opens map (the books read it in their pass).
    pub fn denied_map(&self) -> &aya::maps::MapData {
        aya::maps::IterableMap::map(&self.denied)
    }

    /// Device opens refused: every task's refusals (tasks with none have no entry), in a few syscalls.
    pub fn all_denied(&self) -> Result<std::collections::HashMap<u64, u64>, FenceError> {
        crate::lookup_all(aya::maps::IterableMap::map(&self.denied), "denied_opens")
    }

    pub fn forget(&mut self, cgroup_id: u64) {
        let _ = self.rules.remove(&cgroup_id);
        let _ = self.denied.remove(&cgroup_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_as_v1_devices_lines() {
        let lines: Vec<String> = default_rules().iter().map(v1_rule).collect();
        assert_eq!(lines[0], "a *:* m");
        assert!(lines.contains(&"c 1:3 rwm".to_owned()));
        assert!(lines.contains(&"c 136:* rwm".to_owned()));
    }
}
