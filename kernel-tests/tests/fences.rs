//! The agent's eBPF fences as one unit (`butte_isolators::fences`), on this
//! kernel: a fenced container is held to its ports and counted, an unfenced
//! one is forgotten by every program (and then binds nothing: deny by
//! default), and a fence that fails halfway leaves no entry behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use butte_agent_ebpf::FenceError;
use butte_agent_ebpf::devices::{DeviceRule, Kind, RWM};
use butte_isolators::cgroups::Isolator;
use butte_isolators::container::{Exit, spawn, wait};
use butte_isolators::fences::{Fences, TaskFence};

mod common;
use common::{isolator_at, limits, sandbox, shell_spec, unique};

/// Runs a task in `id`'s cgroup that binds `port` on loopback and prints
/// `bound` or the errno name it got.
fn try_bind(isolator: &dyn Isolator, id: &str, port: u16) -> String {
    try_python(
        isolator,
        id,
        &format!("s=socket.socket()\n  s.bind((\"127.0.0.1\",{port})); print(\"bound\")"),
    )
}

/// Runs a task in `id`'s cgroup that opens /dev/null: `opened` or the errno name.
fn try_open_null(isolator: &dyn Isolator, id: &str) -> String {
    try_python(isolator, id, "open(\"/dev/null\"); print(\"opened\")")
}

/// Runs `attempt` (python, two-space indented after its first line) in
/// `id`'s cgroup; what it printed, or the errno name of its OSError.
fn try_python(isolator: &dyn Isolator, id: &str, attempt: &str) -> String {
    let placement = isolator.create(id, &limits(1.0, 128.0, 64)).unwrap();
    let sandbox = sandbox(id);
    let _ = std::fs::remove_file(sandbox.join("stdout"));
    let script = format!(
        "/usr/bin/python3 -c 'import socket,errno\n\
         try:\n  {attempt}\n\
         except OSError as e: print(errno.errorcode[e.errno])'"
    );
    let child = spawn(&shell_spec(id, &placement, &sandbox, &script)).unwrap();
    assert_eq!(
        wait(&child.pidfd).unwrap(),
        Exit::Code(0),
        "the bind task ran"
    );
    std::fs::read_to_string(sandbox.join("stdout"))
        .unwrap()
        .trim()
        .to_owned()
}

fn one_port(port: u16) -> TaskFence {
    TaskFence {
        ports: vec![(port, port)],
        egress_mbit_per_s: Some(100.0),
        ..TaskFence::default()
    }
}

#[test]
fn a_fenced_container_binds_only_its_ports_and_unfencing_forgets_it_everywhere() {
    let subtree = format!("butte/kt-fences-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut fences = Fences::attach_all(&isolator.v2_subtree()).unwrap();
    let id = unique("fenced");
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    let key = fences
        .fence(&id, &placement.unified, &one_port(31_501))
        .unwrap();
    assert_eq!(fences.key(&id), Some(key));

    assert_eq!(try_bind(&*isolator, &id, 31_501), "bound");
    assert_eq!(
        try_open_null(&*isolator, &id),
        "opened",
        "the default devices"
    );
    assert_eq!(try_bind(&*isolator, &id, 31_602), "EPERM");
    fences.flush();
    let counts = fences.counts();
    assert_eq!(
        counts.denied_binds.get(&key),
        Some(&1),
        "the refused bind is counted"
    );
    let cpu_ns = if fences.cpu_from_books() {
        counts.books.get(&key).map(|b| b.cpu_ns)
    } else {
        counts.cpu.get(&key).map(|cpu| cpu.cpu_ns)
    };
    assert!(
        cpu_ns.is_some_and(|ns| ns > 0),
        "the tasks' CPU time is counted"
    );

    assert_eq!(fences.unfence(&id), Some(key));
    assert_eq!(fences.key(&id), None);
    let counts = fences.counts();
    assert!(
        !counts.cpu.contains_key(&key) && !counts.denied_binds.contains_key(&key),
        "no program keeps an entry for it"
    );
    assert_eq!(
        try_bind(&*isolator, &id, 31_501),
        "EPERM",
        "without its entry the container binds no port at all (deny by default)"
    );
    assert_eq!(
        try_open_null(&*isolator, &id),
        "EPERM",
        "and opens no device, not even /dev/null"
    );
    isolator.destroy(&id).unwrap();
    drop(fences);
    isolator.remove_subtree();
}

#[test]
fn a_fence_that_fails_halfway_leaves_no_entry_behind() {
    let subtree = format!("butte/kt-fences-fail-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut fences = Fences::attach_all(&isolator.v2_subtree()).unwrap();
    let id = unique("half-fenced");
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    // The port entry is written first; the device rules are too many.
    let rule = DeviceRule {
        kind: Kind::Char,
        major: 1,
        minor: 3,
        access: RWM,
    };
    let fence = TaskFence {
        granted_devices: vec![rule; butte_agent_ebpf::devices::MAX_RULES],
        ..one_port(31_503)
    };
    let refused = fences.fence(&id, &placement.unified, &fence).unwrap_err();
    assert!(
        matches!(refused, FenceError::TooMany { .. }),
        "refused for the device rules: {refused}"
    );
    assert_eq!(fences.key(&id), None);
    assert_eq!(
        try_bind(&*isolator, &id, 31_503),
        "EPERM",
        "the port entry written before the failure was removed (else 31503 would bind)"
    );
    isolator.destroy(&id).unwrap();
    drop(fences);
    isolator.remove_subtree();
}
