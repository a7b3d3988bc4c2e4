//! The default seccomp filter every task gets: the system calls Docker's
//! default profile keeps from an unprivileged container return EPERM (the
//! rest are allowed), and clone3 returns ENOSYS so that libc falls back to
//! clone, whose flags can be checked. Compiled once per launcher process.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Refused outright: mounts and the new mount API, module loading, kexec,
/// reboot, swap, clock setting, BPF and perf, keyrings, handle-based opens,
/// port I/O, accounting, quotas, namespace joining.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_lookup_dcookie,
    libc::SYS_userfaultfd,
    libc::SYS_setns,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_uselib,
];

/// Why the filter could not be built (a bug in the rules above).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the default seccomp filter: {0}")]
pub struct FilterError(String);

/// The compiled default filters, in the order they are installed: the
/// EPERM list (with clone/unshare of a user namespace), then clone3 ENOSYS.
pub(super) fn default_filters() -> Result<&'static [Vec<libc::sock_filter>], FilterError> {
    static FILTERS: OnceLock<Result<Vec<Vec<libc::sock_filter>>, String>> = OnceLock::new();
    FILTERS
        .get_or_init(|| build().map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| FilterError(e.clone()))
}

fn build() -> Result<Vec<Vec<libc::sock_filter>>, seccompiler::BackendError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let new_user_ns = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let flag = libc::CLONE_NEWUSER as u64;
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?;
        Ok(vec![SeccompRule::new(vec![condition])?])
    };
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    denied.insert(libc::SYS_clone, new_user_ns()?);
    denied.insert(libc::SYS_unshare, new_user_ns()?);
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    [eperm, clone3]
        .into_iter()
        .map(|filter| Ok(to_libc(&BpfProgram::try_from(filter)?)))
        .collect()
}

fn to_libc(program: &BpfProgram) -> Vec<libc::sock_filter> {
    program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_filters_compile_once_and_hold_every_rule() {
        let filters = default_filters().expect("the rules are valid");
        assert_eq!(filters.len(), 2);
        // One comparison at least per denied syscall, plus the clone checks.
        assert!(filters[0].len() > DENIED.len() + 4, "{}", filters[0].len());
        let again = default_filters().expect("cached");
        assert!(std::ptr::eq(filters, again), "compiled once");
    }
}
