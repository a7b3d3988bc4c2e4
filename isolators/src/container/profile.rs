//! Seccomp profiles in Docker's JSON format, as Mesos's linux/seccomp
//! isolator reads them from `--seccomp_config_dir`: `defaultAction`, and
//! `syscalls` entries of names, an action, argument conditions and the
//! `includes`/`excludes` (capabilities, architectures, minimum kernel) that
//! Docker's own default.json relies on. Compiled with seccompiler into the
//! same BPF programs the default filter is.
//!
//! A profile becomes one filter per action, because a seccompiler filter has
//! one match action: first the "default" filter (every rule that takes
//! another action than the default, matched → allow; anything else → the
//! default action), then one filter per other non-allow action (its rules →
//! that action; anything else → allow). The kernel runs them all and keeps
//! the most restrictive answer, the later filter winning between equal
//! ones, so a syscall gets the action of the rule it matches, else the
//! default. Names this architecture does not have are skipped, as
//! libseccomp (and so Docker and Mesos) skip them.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

use super::privileges::{Capabilities, Capability};

/// A compiled profile: BPF programs as `(code, jt, jf, k)`, in the order
/// they are installed. Small enough to travel to the launcher per launch.
pub type Programs = Vec<Vec<(u16, u8, u8, u32)>>;

/// A profile read and checked, not yet compiled (that depends on the
/// task's capabilities, which `includes.caps` may name).
#[derive(Debug, Clone)]
pub struct Profile {
    default: SeccompAction,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    syscalls: Vec<i64>,
    action: SeccompAction,
    /// Conditions, all of which must hold (empty: always).
    conditions: Vec<Condition>,
    /// Capabilities the task must hold all of / must hold none of.
    needs_caps: Capabilities,
    refused_caps: Capabilities,
}

#[derive(Debug, Clone)]
struct Condition {
    index: u8,
    op: SeccompCmpOp,
    value: u64,
}

/// Why a profile cannot be used; names the entry and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("not a Docker seccomp profile: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot compile the profile: {0}")]
    Compile(String),
}

// Docker's profile format, only the fields we act on; unknown ones are
// ignored as Docker ignores them (`architectures`, `archMap`, comments).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    syscalls: Vec<EntryFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryFile {
    #[serde(default)]
    names: Vec<String>,
    name: Option<String>,
    action: String,
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<ArgFile>,
    #[serde(default)]
    includes: FilterFile,
    #[serde(default)]
    excludes: FilterFile,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct FilterFile {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArgFile {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// Most entries and names a profile may hold (Docker's default has ~60
/// entries and ~400 names); a bound, since the operator's file sizes a loop.
const MAX_ENTRIES: usize = 4096;

impl Profile {
    /// Reads a profile; `kernel` is the running kernel's (major, minor),
    /// for `minKernel`.
    pub fn parse(text: &[u8], kernel: (u32, u32)) -> Result<Self, ProfileError> {
        let file: ProfileFile = serde_json::from_slice(text)?;
        if file.syscalls.len() > MAX_ENTRIES {
            return Err(ProfileError::Invalid(format!(
                "{} syscalls entries; at most {MAX_ENTRIES}",
                file.syscalls.len()
            )));
        }
        let default = action(&file.default_action, None, file.default_errno_ret)
            .map_err(|e| ProfileError::Invalid(format!("defaultAction: {e}")))?;
        let mut entries = Vec::new();
        for (i, entry) in file.syscalls.into_iter().enumerate() {
            let at = |e: String| ProfileError::Invalid(format!("syscalls[{i}]: {e}"));
            let action =
                action(&entry.action, entry.errno_ret, file.default_errno_ret).map_err(at)?;
            if !applies_here(&entry.includes, &entry.excludes, kernel) {
                continue;
            }
            let conditions = entry
                .args
                .iter()
                .map(condition)
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let names = entry.names.iter().chain(entry.name.as_ref());
            let syscalls: Vec<i64> = names
                .filter_map(|name| syscalls::Sysno::from_str(name).ok())
                .map(|sysno| i64::from(sysno.id()))
                .collect();
            if entry.names.len() > MAX_ENTRIES {
                return Err(at(format!("more than {MAX_ENTRIES} names")));
            }
            entries.push(Entry {
                syscalls,
                action,
                conditions,
                needs_caps: caps(&entry.includes.caps).map_err(at)?,
                refused_caps: caps(&entry.excludes.caps).map_err(at)?,
            });
        }
        Ok(Self { default, entries })
    }

    /// The BPF programs for a task that may hold `bounding`.
    pub fn compile(&self, bounding: Capabilities) -> Result<Programs, ProfileError> {
        let compile_error = |e: seccompiler::BackendError| ProfileError::Compile(e.to_string());
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_error)?;
        // Rules grouped by action, in the order the actions first appear.
        let mut groups: Vec<(SeccompAction, BTreeMap<i64, Vec<SeccompRule>>)> = Vec::new();
        for entry in &self.entries {
            let applies =
                entry.needs_caps.within(bounding) && entry.refused_caps.0 & bounding.0 == 0;
            if !applies || entry.action == self.default {
                continue;
            }
            let index = match groups.iter().position(|(a, _)| *a == entry.action) {
                Some(index) => index,
                None => {
                    groups.push((entry.action.clone(), BTreeMap::new()));
                    groups.len() - 1
                }
            };
            for &nr in &entry.syscalls {
                add_rule(&mut groups[index].1, nr, &entry.conditions).map_err(compile_error)?;
            }
        }
        let mut filters = Vec::new();
        if self.default != SeccompAction::Allow {
            let mut any_rule: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
            for (_, rules) in &groups {
                for (&nr, alternatives) in rules {
                    merge(&mut any_rule, nr, alternatives);
                }
            }
            filters.push(
                SeccompFilter::new(any_rule, self.default.clone(), SeccompAction::Allow, arch)
                    .map_err(compile_error)?,
            );
        }
        for (action, rules) in groups {
            if action != SeccompAction::Allow {
                filters.push(
                    SeccompFilter::new(rules, SeccompAction::Allow, action, arch)
                        .map_err(compile_error)?,
                );
            }
        }
        filters
            .into_iter()
            .map(|filter| {
                let program = BpfProgram::try_from(filter).map_err(compile_error)?;
                Ok(program.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
            })
            .collect()
    }
}

/// Adds one alternative for `nr`; an unconditional one makes the syscall
/// match whatever else is listed (seccompiler: an empty list is "always").
fn add_rule(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    nr: i64,
    conditions: &[Condition],
) -> Result<(), seccompiler::BackendError> {
    let rule = if conditions.is_empty() {
        None
    } else {
        let conditions = conditions
            .iter()
            .map(|c| SeccompCondition::new(c.index, SeccompCmpArgLen::Qword, c.op.clone(), c.value))
            .collect::<Result<Vec<_>, _>>()?;
        Some(SeccompRule::new(conditions)?)
    };
    merge(rules, nr, &rule.into_iter().collect::<Vec<_>>());
    Ok(())
}

fn merge(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, nr: i64, alternatives: &[SeccompRule]) {
    match rules.get_mut(&nr) {
        // Already unconditional: stays so.
        Some(existing) if existing.is_empty() => {}
        Some(existing) if alternatives.is_empty() => existing.clear(),
        Some(existing) => existing.extend(alternatives.iter().cloned()),
        None => {
            rules.insert(nr, alternatives.to_vec());
        }
    }
}

fn action(
    name: &str,
    errno: Option<u32>,
    default_errno: Option<u32>,
) -> Result<SeccompAction, String> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => {
            SeccompAction::Errno(errno.or(default_errno).unwrap_or(libc::EPERM as u32))
        }
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        other => {
            return Err(format!(
                "action {other:?} is not supported (SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, SCMP_ACT_KILL_THREAD, SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_LOG)"
            ));
        }
    })
}

fn condition(arg: &ArgFile) -> Result<Condition, String> {
    if arg.index > 5 {
        return Err(format!(
            "args index {} is past the sixth argument",
            arg.index
        ));
    }
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        // Docker: `value` is the mask, `valueTwo` what the masked argument equals.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => return Err(format!("args op {other:?} is not a libseccomp comparison")),
    };
    Ok(Condition {
        index: arg.index,
        op,
        value,
    })
}

fn caps(names: &[String]) -> Result<Capabilities, String> {
    names.iter().try_fold(Capabilities(0), |set, name| {
        Capability::from_name(name)
            .map(|c| Capabilities(set.0 | 1 << c.0))
            .ok_or_else(|| format!("{name:?} is not a Linux capability"))
    })
}

/// Whether an entry's architecture and kernel conditions hold on this host.
fn applies_here(includes: &FilterFile, excludes: &FilterFile, kernel: (u32, u32)) -> bool {
    let ours = docker_arch();
    let arch_ok = (includes.arches.is_empty() || includes.arches.iter().any(|a| a == ours))
        && !excludes.arches.iter().any(|a| a == ours);
    let kernel_ok = includes
        .min_kernel
        .as_deref()
        .and_then(parse_kernel)
        .is_none_or(|min| kernel >= min);
    arch_ok && kernel_ok
}

/// This machine's architecture as Docker's profiles name it.
fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// "6.1" or "6.1.0-40-amd64" → (6, 1).
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(json: &str, bounding: Capabilities) -> Programs {
        Profile::parse(json.as_bytes(), (6, 18))
            .expect("parses")
            .compile(bounding)
            .expect("compiles")
    }

    #[test]
    fn an_allow_list_becomes_one_filter_and_other_actions_their_own() {
        let programs = compile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]}]}"#,
            Capabilities(0),
        );
        assert_eq!(programs.len(), 2, "default filter, then the EACCES one");
        let returns = |p: &Vec<(u16, u8, u8, u32)>| -> Vec<u32> {
            p.iter().filter(|i| i.0 == 0x06).map(|i| i.3).collect()
        };
        // SECCOMP_RET_ERRNO | EPERM as the default; SECCOMP_RET_ERRNO | EACCES in the second.
        assert!(returns(&programs[0]).contains(&(0x0005_0000 | 1)));
        assert!(returns(&programs[1]).contains(&(0x0005_0000 | 13)));
    }

    #[test]
    fn includes_caps_and_arches_decide_which_entries_count() {
        let profile = r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
            {"names":["read"],"action":"SCMP_ACT_ALLOW"},
            {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
            {"names":["umount2"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["s390x"]}}]}"#;
        let without = compile(profile, Capabilities(0));
        let with = compile(profile, Capabilities(1 << 21));
        assert!(
            with[0].len() > without[0].len(),
            "mount is allowed only with SYS_ADMIN"
        );
        let newer = Profile::parse(
            br#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","includes":{"minKernel":"99.0"}}]}"#,
            (6, 1),
        )
        .expect("parses");
        assert!(
            newer.entries.is_empty(),
            "a minKernel above ours drops the entry"
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (json, says) in [
            (r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#, "SCMP_ACT_NOTIFY"),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_TRACE"}]}"#,
                "syscalls[0]",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
                "index 6",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","includes":{"caps":["CAP_FLY"]}}]}"#,
                "CAP_FLY",
            ),
            (r#"{"syscalls":[]}"#, "defaultAction"),
        ] {
            let error = Profile::parse(json.as_bytes(), (6, 18))
                .expect_err(json)
                .to_string();
            assert!(error.contains(says), "{error} should name {says}");
        }
    }

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_kernel("6.1.0-40-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel("6.12"), Some((6, 12)));
        assert_eq!(parse_kernel("six"), None);
    }
}
