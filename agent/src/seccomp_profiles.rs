//! The operator's seccomp profiles (`--seccomp-config-dir`, Docker's JSON
//! format as Mesos reads it): every file in the directory read and checked
//! once at start, so a bad profile stops the agent with its name rather than
//! failing tasks later; compiled per capability set on first use.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use butte_isolators::container::profile::{Profile, parse_kernel};
use butte_isolators::container::{Capabilities, Seccomp};

use crate::users::UserError;

/// Largest profile file read (Docker's default.json is ~20 KB).
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The profiles a task may name, and the one it gets when it names none.
#[derive(Debug, Default)]
pub struct SeccompProfiles {
    profiles: BTreeMap<String, Profile>,
    /// `--seccomp-profile-name`: replaces the built-in filter for tasks
    /// that name no profile.
    default: Option<String>,
    compiled: Mutex<HashMap<(String, u64), Seccomp>>,
}

impl SeccompProfiles {
    /// Reads every regular file in `dir`; `default` must be one of them.
    pub fn load(dir: Option<&Path>, default: Option<&str>) -> Result<Self, String> {
        let Some(dir) = dir else {
            return match default {
                Some(name) => Err(format!(
                    "--seccomp-profile-name {name} needs --seccomp-config-dir, the directory it is in"
                )),
                None => Ok(Self::default()),
            };
        };
        let kernel = kernel_version();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read --seccomp-config-dir {}: {e}", dir.display()))?;
        let mut profiles = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let metadata = entry
                .metadata()
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if !metadata.is_file() {
                continue;
            }
            if metadata.len() > MAX_PROFILE_BYTES {
                return Err(format!(
                    "seccomp profile {} is {} bytes; at most {MAX_PROFILE_BYTES}",
                    path.display(),
                    metadata.len()
                ));
            }
            let text =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let profile = Profile::parse(&text, kernel)
                .map_err(|e| format!("seccomp profile {}: {e}", path.display()))?;
            // Compiling now finds what only the compiler can (too long a filter).
            profile
                .compile(Capabilities(u64::MAX))
                .map_err(|e| format!("seccomp profile {}: {e}", path.display()))?;
            profiles.insert(name, profile);
        }
        if let Some(name) = default
            && !profiles.contains_key(name)
        {
            return Err(format!(
                "--seccomp-profile-name {name} is not a file in --seccomp-config-dir {}",
                dir.display()
            ));
        }
        tracing::info!(dir = %dir.display(), profiles = ?profiles.keys().collect::<Vec<_>>(), "seccomp profiles read");
        Ok(Self {
            profiles,
            default: default.map(str::to_owned),
            compiled: Mutex::default(),
        })
    }

    /// The filter for a task that names `asked` (or none) and may hold
    /// `bounding`.
    pub fn choose(
        &self,
        asked: Option<&str>,
        bounding: Capabilities,
    ) -> Result<Seccomp, UserError> {
        let Some(name) = asked.or(self.default.as_deref()) else {
            return Ok(Seccomp::Default);
        };
        let Some(profile) = self.profiles.get(name) else {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            return Err(UserError::Seccomp(format!(
                "seccomp profile '{name}' is not one of this agent's (--seccomp-config-dir): {}",
                if known.is_empty() {
                    "it has none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        let key = (name.to_owned(), bounding.0);
        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seccomp) = compiled.get(&key) {
            return Ok(seccomp.clone());
        }
        let programs = profile
            .compile(bounding)
            .map_err(|e| UserError::Seccomp(format!("seccomp profile '{name}': {e}")))?;
        let seccomp = Seccomp::Profile {
            name: name.to_owned(),
            programs,
        };
        compiled.insert(key, seccomp.clone());
        Ok(seccomp)
    }
}

/// The running kernel's (major, minor), for profiles' `minKernel`.
fn kernel_version() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|release| parse_kernel(release.trim()))
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_load_from_the_directory_and_unknown_names_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("butte-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(
            dir.join("no-mkdir.json"),
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
        )
        .expect("write");
        let profiles = SeccompProfiles::load(Some(&dir), None).expect("loads");
        let chosen = profiles
            .choose(Some("no-mkdir.json"), Capabilities(0))
            .expect("known");
        assert!(matches!(chosen, Seccomp::Profile { ref name, .. } if name == "no-mkdir.json"));
        assert_eq!(
            profiles.choose(None, Capabilities(0)).expect("default"),
            Seccomp::Default
        );
        let unknown = profiles
            .choose(Some("other.json"), Capabilities(0))
            .expect_err("unknown")
            .to_string();
        assert!(
            unknown.contains("other.json") && unknown.contains("no-mkdir.json"),
            "{unknown}"
        );

        std::fs::write(
            dir.join("bad.json"),
            r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
        )
        .expect("write");
        let bad = SeccompProfiles::load(Some(&dir), None).expect_err("bad profile");
        assert!(
            bad.contains("bad.json") && bad.contains("SCMP_ACT_NOTIFY"),
            "{bad}"
        );
        std::fs::remove_file(dir.join("bad.json")).expect("remove");
        let missing =
            SeccompProfiles::load(Some(&dir), Some("nope.json")).expect_err("missing default");
        assert!(missing.contains("nope.json"), "{missing}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
