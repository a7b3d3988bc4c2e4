//! Who a task runs as: its CommandInfo.user, else its framework's user,
//! looked up on this agent (uid, gid and supplementary groups), as Mesos's
//! --switch_user does.

use butte_api::mesos::v1::capability_info::Capability as Named;
use butte_api::mesos::v1::{CapabilityInfo, LinuxInfo};
use butte_isolators::container::{Capabilities, Privileges, Seccomp, User};
use nix::unistd;

use crate::seccomp_profiles::SeccompProfiles;

/// Capability names, as Mesos spells them (`CHOWN`, `NET_ADMIN`...), to a
/// set; for the agent's --bounding-capabilities and --effective-capabilities.
pub fn parse_capabilities(text: &str) -> Result<Capabilities, String> {
    let mut set = Capabilities(0);
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let named = Named::from_str_name(&name.to_ascii_uppercase())
            .filter(|n| *n != Named::Unknown)
            .ok_or_else(|| format!("{name:?} is not a Linux capability (e.g. CHOWN, NET_ADMIN)"))?;
        set.0 |= 1 << number(named);
    }
    Ok(set)
}

/// Mesos numbers capabilities from 1000 (CHOWN = 1000 is the kernel's 0).
fn number(named: Named) -> u32 {
    (named as i32 - 1000).clamp(0, 63) as u32
}

fn set_of(info: &CapabilityInfo) -> Capabilities {
    Capabilities(info.capabilities().fold(0, |mask, named| {
        if named == Named::Unknown {
            mask
        } else {
            mask | 1 << number(named)
        }
    }))
}

/// Names of the capabilities in `set`, for messages.
fn names(set: Capabilities) -> String {
    set.numbers()
        .map(|n| {
            Named::try_from(1000 + i32::from(n))
                .map_or_else(|_| n.to_string(), |c| c.as_str_name().to_owned())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the agent lets tasks hold (its flags).
#[derive(Debug, Clone, Copy)]
pub struct Allowed<'a> {
    /// The most any task may hold (--bounding-capabilities).
    pub bounding: Capabilities,
    /// What a root task gets when it asks for none (--effective-capabilities).
    pub effective: Capabilities,
    /// Whether a task may ask to run without the seccomp filter.
    pub unconfined_seccomp: bool,
    /// The seccomp profiles a task may name (--seccomp-config-dir).
    pub profiles: &'a SeccompProfiles,
}

/// Applies a task's `LinuxInfo` to `privileges`, within what the agent allows.
pub fn apply_linux_info(
    privileges: &mut Privileges,
    linux: Option<&LinuxInfo>,
    allowed: Allowed<'_>,
) -> Result<(), UserError> {
    let asked_effective = linux.and_then(|l| {
        l.effective_capabilities
            .as_ref()
            .or(l.capability_info.as_ref())
    });
    let effective = asked_effective.map_or(allowed.effective, set_of);
    let bounding = linux
        .and_then(|l| l.bounding_capabilities.as_ref())
        .map_or(allowed.bounding, set_of);
    for (what, set) in [("effective", effective), ("bounding", bounding)] {
        if !set.within(allowed.bounding) {
            let beyond = Capabilities(set.0 & !allowed.bounding.0);
            return Err(UserError::Capabilities(format!(
                "the task asks for {what} capabilities {} beyond what this agent allows (--bounding-capabilities)",
                names(beyond)
            )));
        }
    }
    if !effective.within(bounding) {
        return Err(UserError::Capabilities(format!(
            "the task's effective capabilities {} are not all in its bounding set",
            names(Capabilities(effective.0 & !bounding.0))
        )));
    }
    privileges.capabilities = effective;
    privileges.bounding = bounding;
    let seccomp = linux.and_then(|l| l.seccomp.as_ref());
    let profile_name = seccomp.and_then(|s| s.profile_name.as_deref());
    if seccomp.and_then(|s| s.unconfined) == Some(true) {
        if profile_name.is_some() {
            return Err(UserError::Seccomp(
                "the task sets both seccomp.unconfined and seccomp.profile_name; give one"
                    .to_owned(),
            ));
        }
        if !allowed.unconfined_seccomp {
            return Err(UserError::Seccomp(
                "the task asks to run without the seccomp filter (seccomp.unconfined) and this agent does not allow it (--allow-unconfined-seccomp)".to_owned(),
            ));
        }
        privileges.seccomp = Seccomp::Unconfined;
    } else {
        privileges.seccomp = allowed.profiles.choose(profile_name, privileges.bounding)?;
    }
    Ok(())
}

/// Why a task's user cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// the name is not a user on this agent
    #[error(
        "user '{0}' does not exist on this agent; create it there, or run the task as another user (CommandInfo.user or FrameworkInfo.user)"
    )]
    Unknown(String),
    /// a seccomp setting the agent does not allow or does not have
    #[error("{0}")]
    Seccomp(String),
    /// capabilities the agent does not allow
    #[error("{0}")]
    Capabilities(String),
    /// the user database could not be read
    #[error("cannot look up user '{name}': {source}")]
    Lookup { name: String, source: nix::Error },
}

/// The privileges of a task run as `name`: root keeps Docker's default
/// capabilities, any other user none (an empty name: root).
pub fn privileges_of(name: &str) -> Result<Privileges, UserError> {
    if name.is_empty() || name == "root" {
        return Ok(Privileges::default());
    }
    let lookup = |source| UserError::Lookup {
        name: name.to_owned(),
        source,
    };
    let user = unistd::User::from_name(name)
        .map_err(lookup)?
        .ok_or_else(|| UserError::Unknown(name.to_owned()))?;
    let c_name = std::ffi::CString::new(name).map_err(|_| UserError::Unknown(name.to_owned()))?;
    let groups = unistd::getgrouplist(&c_name, user.gid).map_err(lookup)?;
    Ok(Privileges {
        user: Some(User {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups: groups.iter().map(|g| g.as_raw()).collect(),
        }),
        ..Privileges::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(effective: &[Named], bounding: Option<&[Named]>, unconfined: bool) -> LinuxInfo {
        let info = |caps: &[Named]| CapabilityInfo {
            capabilities: caps.iter().map(|c| *c as i32).collect(),
        };
        LinuxInfo {
            effective_capabilities: Some(info(effective)),
            bounding_capabilities: bounding.map(info),
            seccomp: unconfined.then(|| butte_api::mesos::v1::SeccompInfo {
                unconfined: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn linux_info_is_honoured_within_the_agents_flags_and_refused_beyond() {
        let docker = Capabilities::docker_default();
        let profiles = SeccompProfiles::default();
        let allowed = Allowed {
            bounding: docker,
            effective: docker,
            unconfined_seccomp: false,
            profiles: &profiles,
        };
        let mut privileges = Privileges::default();
        apply_linux_info(
            &mut privileges,
            Some(&linux(&[Named::Chown], None, false)),
            allowed,
        )
        .expect("within");
        assert_eq!(privileges.capabilities, Capabilities(1));
        assert_eq!(privileges.bounding, docker);

        let mut privileges = Privileges::default();
        let beyond = apply_linux_info(
            &mut privileges,
            Some(&linux(
                &[Named::Chown, Named::NetAdmin, Named::SysAdmin],
                None,
                false,
            )),
            allowed,
        )
        .expect_err("NET_ADMIN and SYS_ADMIN are not Docker's");
        let message = beyond.to_string();
        assert!(
            message.contains("NET_ADMIN") && message.contains("SYS_ADMIN"),
            "{message}"
        );
        assert!(!message.contains("CHOWN"), "only what is beyond: {message}");

        let outside_bounding = apply_linux_info(
            &mut Privileges::default(),
            Some(&linux(&[Named::Kill], Some(&[Named::Chown]), false)),
            allowed,
        )
        .expect_err("KILL not in its own bounding set");
        assert!(
            outside_bounding.to_string().contains("KILL"),
            "{outside_bounding}"
        );

        let unconfined = apply_linux_info(
            &mut Privileges::default(),
            Some(&linux(&[], None, true)),
            allowed,
        )
        .expect_err("not allowed by the agent");
        assert!(
            unconfined
                .to_string()
                .contains("--allow-unconfined-seccomp")
        );
        let mut privileges = Privileges::default();
        let lenient = Allowed {
            unconfined_seccomp: true,
            ..allowed
        };
        apply_linux_info(&mut privileges, Some(&linux(&[], None, true)), lenient).expect("allowed");
        assert_eq!(privileges.seccomp, Seccomp::Unconfined);
    }

    #[test]
    fn capability_flags_parse_mesos_names() {
        assert_eq!(
            parse_capabilities("CHOWN, kill").expect("names"),
            Capabilities(1 | 1 << 5)
        );
        assert!(parse_capabilities("CHOWN,NOT_A_CAP").is_err());
    }

    #[test]
    fn nobody_resolves_root_stays_and_a_stranger_is_named() {
        let nobody = privileges_of("nobody").expect("nobody exists on Debian");
        let user = nobody.user.expect("a user");
        assert_eq!((user.uid, user.gid), (65534, 65534));
        assert!(user.groups.contains(&65534));
        assert_eq!(privileges_of("root").expect("root").user, None);
        let error = privileges_of("no-such-user-here").expect_err("unknown");
        assert!(error.to_string().contains("'no-such-user-here'"), "{error}");
    }
}
