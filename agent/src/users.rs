//! Who a task runs as: its CommandInfo.user, else its framework's user,
//! looked up on this agent (uid, gid and supplementary groups), as Mesos's
//! --switch_user does.

use butte_isolators::container::{Privileges, User};
use nix::unistd;

/// Why a task's user cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// the name is not a user on this agent
    #[error(
        "user '{0}' does not exist on this agent; create it there, or run the task as another user (CommandInfo.user or FrameworkInfo.user)"
    )]
    Unknown(String),
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
