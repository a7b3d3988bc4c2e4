//! A task cannot leave its container: each way out a root task would try
//! fails with the errno the kernel gives for it, and the task keeps only
//! Docker's default capabilities (none as another user) and no_new_privs.
//! The attempts run in `escape.py` inside a real container on this kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use butte_isolators::container::profile::Profile;
use butte_isolators::container::{Capabilities, Exit, Privileges, Seccomp, User, spawn, wait};

mod common;
use common::{isolator, limits, sandbox, shell_spec, unique};

/// Runs escape.py in a container with `privileges`; its `name=result` lines.
fn attempts(name: &str, privileges: Privileges) -> HashMap<String, String> {
    let isolator = isolator();
    let id = unique(name);
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    let sandbox = sandbox(&id);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/escape.py");
    std::fs::copy(&script, sandbox.join("escape.py")).unwrap();
    // The sandbox is the task's: as another user, it must be able to write there.
    if let Some(user) = &privileges.user {
        std::os::unix::fs::chown(&sandbox, Some(user.uid), Some(user.gid)).unwrap();
    }
    let command = format!(
        "/usr/bin/python3 $MESOS_SANDBOX/escape.py {}",
        std::process::id()
    );
    let spec = butte_isolators::container::ContainerSpec {
        privileges,
        ..shell_spec(&id, &placement, &sandbox, &command)
    };
    let child = spawn(&spec).unwrap();
    let exit = wait(&child.pidfd).unwrap();
    let out = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    let err = std::fs::read_to_string(sandbox.join("stderr")).unwrap();
    assert_eq!(exit, Exit::Code(0), "{out}{err}");
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn assert_results(seen: &HashMap<String, String>, expected: &[(&str, &str)]) {
    for (name, result) in expected {
        assert_eq!(
            seen.get(*name).map(String::as_str),
            Some(*result),
            "{name}: all results {seen:?}"
        );
    }
}

#[test]
fn a_root_task_cannot_remount_mount_load_modules_or_reach_outside_its_container() {
    let seen = attempts("escape-root", Privileges::default());
    assert_results(
        &seen,
        &[
            ("remount_rw", "EPERM"),
            ("write_host_root", "EROFS"),
            ("mount_tmpfs", "EPERM"),
            ("mkdir_cgroupfs", "EROFS"),
            ("write_sysctl", "EROFS"),
            ("init_module", "EPERM"),
            ("ptrace_outside", "ESRCH"),
            ("read_timer_list", "bytes:0"),
            ("read_keys", "bytes:0"),
            ("read_firmware", "entries:0"),
            ("uid", "0"),
            ("no_new_privs", "1"),
            ("write_sandbox", "ok"),
            // The default seccomp filter.
            ("bpf", "EPERM"),
            ("perf_event_open", "EPERM"),
            ("keyctl", "EPERM"),
            ("unshare_user_ns", "EPERM"),
            // and what ordinary programs need still works under it.
            ("threads", "ok"),
            ("fork_exec", "ok"),
            ("tcp_server", "ok"),
        ],
    );
    let docker = format!("{:016x}", Capabilities::docker_default().0);
    assert_eq!(seen["cap_eff"], docker, "Docker's default set, effective");
    assert_eq!(seen["cap_bnd"], docker, "and bounding");
    assert!(!Path::new("/butte-escape").exists());
}

#[test]
fn a_task_run_as_another_user_has_no_capabilities_and_still_its_sandbox() {
    let nobody = User {
        uid: 65534,
        gid: 65534,
        groups: vec![65534],
    };
    let privileges = Privileges {
        user: Some(nobody),
        ..Privileges::default()
    };
    let seen = attempts("escape-nobody", privileges);
    assert_results(
        &seen,
        &[
            ("uid", "65534"),
            ("cap_eff", "0000000000000000"),
            ("no_new_privs", "1"),
            ("remount_rw", "EPERM"),
            ("write_host_root", "EROFS"),
            ("init_module", "EPERM"),
            ("write_sandbox", "ok"),
            ("unshare_user_ns", "EPERM"),
            ("threads", "ok"),
            ("fork_exec", "ok"),
        ],
    );
}

#[test]
fn without_the_filter_the_same_task_could_make_a_user_namespace() {
    // Shows the filter is what refuses it (unprivileged user namespaces are
    // on in this kernel), so the EPERM above is not the kernel's default.
    let privileges = Privileges {
        seccomp: Seccomp::Unconfined,
        ..Privileges::default()
    };
    let seen = attempts("escape-unfiltered", privileges);
    assert_results(&seen, &[("unshare_user_ns", "ok"), ("remount_rw", "EPERM")]);
}

#[test]
fn an_operator_profile_allow_list_decides_each_call_with_its_own_errno() {
    // Docker's shape: deny by default (EACCES here), an allow list of every
    // call this architecture has but mkdir/mkdirat, and rmdir answered with
    // its own errno (EBUSY), which must win over the default's.
    let allowed: Vec<&str> = syscalls::Sysno::iter()
        .map(|s| s.name())
        .filter(|n| !["mkdir", "mkdirat", "rmdir"].contains(n))
        .collect();
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EACCES,
        "syscalls": [
            {"names": allowed, "action": "SCMP_ACT_ALLOW"},
            {"names": ["rmdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EBUSY},
        ],
    });
    let programs = Profile::parse(profile.to_string().as_bytes(), (6, 18))
        .unwrap()
        .compile(Capabilities::docker_default())
        .unwrap();
    assert_eq!(programs.len(), 2, "the default's filter and the EBUSY one");

    let isolator = isolator();
    let id = unique("seccomp-profile");
    let placement = isolator.create(&id, &limits(1.0, 64.0, 64)).unwrap();
    let sandbox = sandbox(&id);
    std::fs::create_dir(sandbox.join("empty")).unwrap();
    let spec = butte_isolators::container::ContainerSpec {
        privileges: Privileges {
            seccomp: Seccomp::Profile {
                name: "allow-list".into(),
                programs,
            },
            ..Privileges::default()
        },
        ..shell_spec(
            &id,
            &placement,
            &sandbox,
            "mkdir $MESOS_SANDBOX/new; rmdir $MESOS_SANDBOX/empty; echo done > $MESOS_SANDBOX/done",
        )
    };
    let child = spawn(&spec).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    let err = std::fs::read_to_string(sandbox.join("stderr")).unwrap();
    assert!(
        err.contains("Permission denied"),
        "mkdir: the default EACCES\n{err}"
    );
    assert!(err.contains("busy"), "rmdir: its own EBUSY\n{err}");
    assert_eq!(
        std::fs::read_to_string(sandbox.join("done")).unwrap(),
        "done\n"
    );
    assert!(!sandbox.join("new").exists() && sandbox.join("empty").exists());
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
}
