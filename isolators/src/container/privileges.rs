//! Who a task runs as and which capabilities it keeps. Docker's default set
//! is the most a task gets; a task that runs as a user other than root ends
//! with none (the kernel clears them when the uid leaves 0).

/// A Linux capability, by its number in `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability(pub u8);

/// Every capability this code knows, by its number (`linux/capability.h`).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl Capability {
    /// `CAP_SYS_ADMIN` or `SYS_ADMIN` (any case) to its number.
    pub fn from_name(name: &str) -> Option<Self> {
        let upper = name.to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        let number = NAMES.iter().position(|n| *n == bare)?;
        u8::try_from(number).ok().map(Capability)
    }
}

/// Docker's default capabilities, by name and number.
pub const DOCKER_DEFAULT: [(&str, Capability); 14] = [
    ("CHOWN", Capability(0)),
    ("DAC_OVERRIDE", Capability(1)),
    ("FOWNER", Capability(3)),
    ("FSETID", Capability(4)),
    ("KILL", Capability(5)),
    ("SETGID", Capability(6)),
    ("SETUID", Capability(7)),
    ("SETPCAP", Capability(8)),
    ("NET_BIND_SERVICE", Capability(10)),
    ("NET_RAW", Capability(13)),
    ("SYS_CHROOT", Capability(18)),
    ("MKNOD", Capability(27)),
    ("AUDIT_WRITE", Capability(29)),
    ("SETFCAP", Capability(31)),
];

/// A set of capabilities as the kernel's bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    pub fn docker_default() -> Self {
        Self(
            DOCKER_DEFAULT
                .iter()
                .fold(0, |mask, (_, c)| mask | 1 << c.0),
        )
    }

    pub fn contains(self, capability: Capability) -> bool {
        self.0 & (1 << capability.0) != 0
    }

    /// Whether every capability of `self` is in `other`.
    pub fn within(self, other: Capabilities) -> bool {
        self.0 & !other.0 == 0
    }

    /// The capability numbers in the set.
    pub fn numbers(self) -> impl Iterator<Item = u8> {
        (0..64u8).filter(move |&n| self.0 & (1 << n) != 0)
    }
}

/// The uid, gid and supplementary groups a task runs as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Who a task runs as and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Privileges {
    /// None: the launcher's own user (root).
    pub user: Option<User>,
    /// Kept as permitted and effective set (a non-root user ends with none).
    pub capabilities: Capabilities,
    /// The most the task's processes can ever hold (at least `capabilities`).
    pub bounding: Capabilities,
    /// The seccomp filter the task runs under.
    pub seccomp: Seccomp,
}

/// Which seccomp filter a task gets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Seccomp {
    /// The built-in filter (Docker's default profile's denials).
    Default,
    /// None, where the operator allows it (`--allow-unconfined-seccomp`).
    Unconfined,
    /// An operator's profile (`--seccomp-config-dir`), compiled for this
    /// task's capabilities.
    Profile {
        name: String,
        programs: super::profile::Programs,
    },
}

impl Default for Privileges {
    /// Root with Docker's default capabilities and the default seccomp filter.
    fn default() -> Self {
        Self {
            user: None,
            capabilities: Capabilities::docker_default(),
            bounding: Capabilities::docker_default(),
            seccomp: Seccomp::Default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_match_their_kernel_numbers() {
        for (name, number) in DOCKER_DEFAULT {
            assert_eq!(Capability::from_name(name), Some(number), "{name}");
        }
        assert_eq!(Capability::from_name("cap_sys_admin"), Some(Capability(21)));
        assert_eq!(
            Capability::from_name("CAP_CHECKPOINT_RESTORE"),
            Some(Capability(40))
        );
        assert_eq!(Capability::from_name("CAP_FLY"), None);
    }

    #[test]
    fn docker_default_holds_its_fourteen_and_not_sys_admin() {
        let caps = Capabilities::docker_default();
        assert_eq!(caps.0.count_ones(), 14);
        assert!(caps.contains(Capability(0)) && caps.contains(Capability(31)));
        for forbidden in [21, 16, 17, 19, 39] {
            // SYS_ADMIN, SYS_MODULE, SYS_RAWIO, SYS_PTRACE, BPF
            assert!(!caps.contains(Capability(forbidden)), "{forbidden}");
        }
    }
}
