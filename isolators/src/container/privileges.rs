//! Who a task runs as and which capabilities it keeps. Docker's default set
//! is the most a task gets; a task that runs as a user other than root ends
//! with none (the kernel clears them when the uid leaves 0).

/// A Linux capability, by its number in `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability(pub u8);

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
    /// The default seccomp filter (false: unconfined, where the operator allows it).
    pub seccomp: bool,
}

impl Default for Privileges {
    /// Root with Docker's default capabilities and the default seccomp filter.
    fn default() -> Self {
        Self {
            user: None,
            capabilities: Capabilities::docker_default(),
            bounding: Capabilities::docker_default(),
            seccomp: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
