//! A container on this kernel, seen from inside: its cgroups, its pid
//! namespace, its hostname, a read-only host rootfs with a writable sandbox
//! and a private /tmp; its limits enforced; nothing left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use butte_isolators::container::{ContainerSpec, Exit, spawn, wait};
use butte_isolators::fences::{Fences, TaskFence};

mod common;
use common::{cpu_seconds, isolator, isolator_at, limits, run, sandbox, shell_spec, unique};

#[test]
fn task_sees_its_cgroup_pid_namespace_hostname_and_read_only_root() {
    let isolator = isolator();
    let id = unique("inside");
    let script = "cat /proc/self/cgroup; ps -e -o pid=,comm= > $MESOS_SANDBOX/ps; echo host=$(hostname); \
                  touch /etc/butte-must-fail 2>/dev/null && echo etc=writable || echo etc=readonly; \
                  echo data > $MESOS_SANDBOX/written && echo sandbox=writable; \
                  touch /tmp/x && ls /tmp | wc -l | sed 's/^/tmp=/'; echo pid1=$$; sleep 1";
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    let sandbox = sandbox(&id);
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    // From the host: the task is in our cgroups.
    let outside = std::fs::read_to_string(format!("/proc/{}/cgroup", child.pid)).unwrap();
    let exit = wait(&child.pidfd).unwrap();
    let out = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    assert_eq!(exit, Exit::Code(0), "{out}");
    assert!(
        outside.contains(&format!("/butte/{id}")),
        "the host sees the task in our cgroup:\n{outside}"
    );
    assert!(
        outside.contains(&format!("memory:/butte/{id}"))
            || !Path::new("/sys/fs/cgroup/memory").exists(),
        "{outside}"
    );
    // From inside: a cgroup namespace rooted at those cgroups.
    let inside: Vec<&str> = out.lines().filter(|l| l.contains(":/")).collect();
    assert!(
        !inside.is_empty() && inside.iter().all(|l| l.ends_with(":/")),
        "the task sees its own cgroups as /, nothing above them:\n{out}"
    );
    // The shell (pid 1) and ps itself: the task's own processes only.
    let ps = std::fs::read_to_string(sandbox.join("ps")).unwrap();
    let seen: Vec<Vec<&str>> = ps.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        seen,
        vec![vec!["1", "sh"], vec![seen[1][0], "ps"]],
        "ps sees only the task's processes:\n{ps}"
    );
    assert!(out.contains(&format!("host={id}")), "{out}");
    assert!(out.contains("etc=readonly"), "{out}");
    assert!(out.contains("sandbox=writable"), "{out}");
    assert!(out.contains("tmp=1"), "a private, empty /tmp:\n{out}");
    assert!(
        out.contains("pid1=1"),
        "the task is pid 1 of its namespace:\n{out}"
    );
    assert!(!Path::new("/etc/butte-must-fail").exists());
    assert_eq!(
        std::fs::read_to_string(sandbox.join("written")).unwrap(),
        "data\n"
    );
    isolator.destroy(&id).unwrap();
    assert!(!isolator.list().unwrap().contains(&id));
    std::fs::remove_dir_all(sandbox).unwrap();
}

#[test]
fn cpu_quota_of_half_a_core_holds_a_busy_loop_to_half_a_core_and_books_the_throttling() {
    let isolator = isolator();
    let id = unique("quota");
    let placement = isolator.create(&id, &limits(0.5, 64.0, 16)).unwrap();
    let sandbox = sandbox(&id);
    let spec = shell_spec(&id, &placement, &sandbox, "while :; do :; done");
    let child = spawn(&spec).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (start_cpu, start) = (cpu_seconds("butte", &id), Instant::now());
    let before = isolator.cpu_throttling(&id).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let elapsed = start.elapsed().as_secs_f64();
    let used = (cpu_seconds("butte", &id) - start_cpu) / elapsed;
    let after = isolator.cpu_throttling(&id).unwrap();
    butte_isolators::container::signal(&child.pidfd, libc::SIGKILL).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Signal(libc::SIGKILL));
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    assert!(
        (0.45..=0.55).contains(&used),
        "busy loop under a 0.5 cpu quota used {used:.3} cpu"
    );
    // 3 s of 100 ms periods, the quota spent in every one, and about half
    // of each spent waiting for the next.
    let (periods, throttled) = (
        after.periods - before.periods,
        after.throttled - before.throttled,
    );
    assert!(
        periods >= 25 && throttled >= periods * 3 / 4,
        "a busy loop over its quota is throttled in most periods: {before:?} then {after:?}"
    );
    let waited = (after.throttled_ns - before.throttled_ns) as f64 / 1e9;
    assert!(
        (0.3 * elapsed..=0.7 * elapsed).contains(&waited),
        "throttled {waited:.3} s of {elapsed:.3} s: {before:?} then {after:?}"
    );
}

#[test]
fn process_counts_are_the_processes_and_threads_in_the_cgroup() {
    let isolator = isolator();
    let id = unique("counts");
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    let sandbox = sandbox(&id);
    // The shell, a sleep, and python with three threads besides its main one.
    let script = "sleep 30 & python3 -c 'import threading, time\n\
                  [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(3)]\n\
                  time.sleep(30)' & wait";
    let spec = shell_spec(&id, &placement, &sandbox, script);
    let child = spawn(&spec).unwrap();
    let wanted = butte_isolators::cgroups::ProcessCounts {
        processes: 3,
        threads: 6,
    };
    let started = Instant::now();
    let mut seen = isolator.process_counts(&id).unwrap();
    while seen != wanted && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        seen = isolator.process_counts(&id).unwrap();
    }
    butte_isolators::container::signal(&child.pidfd, libc::SIGKILL).unwrap();
    let _ = wait(&child.pidfd);
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    assert_eq!(seen, wanted);
}

#[test]
fn memory_limit_gets_the_task_oom_killed_and_reported() {
    let isolator = isolator();
    let id = unique("oom");
    // dd allocates and touches a 256 MiB buffer: far past the 32 MiB limit.
    let (exit, _, sandbox) = run(
        &*isolator,
        &id,
        limits(1.0, 32.0, 16),
        "exec dd if=/dev/zero of=/dev/null bs=256M count=1",
    );
    assert_eq!(exit, Exit::Signal(libc::SIGKILL));
    assert!(
        isolator.oom_killed(&id).unwrap(),
        "the cgroup records an OOM kill"
    );
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
}

#[test]
fn failed_setup_names_the_step_and_leaves_no_process() {
    let isolator = isolator();
    let id = unique("badexec");
    let placement = isolator.create(&id, &limits(1.0, 64.0, 16)).unwrap();
    let sandbox = sandbox(&id);
    let spec = ContainerSpec {
        argv: vec!["/no/such/program".into()],
        ..shell_spec(&id, &placement, &sandbox, "")
    };
    let error = spawn(&spec).unwrap_err().to_string();
    assert!(
        error.contains("exec") && error.contains("No such file"),
        "{error}"
    );
    assert!(isolator.pids(&id).unwrap().is_empty());
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
}

#[test]
fn destroy_kills_what_is_left_and_removes_every_cgroup() {
    let isolator = isolator();
    let id = unique("destroy");
    let placement = isolator.create(&id, &limits(1.0, 64.0, 16)).unwrap();
    let sandbox = sandbox(&id);
    let spec = shell_spec(&id, &placement, &sandbox, "sleep 600 & sleep 600");
    let child = spawn(&spec).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(isolator.pids(&id).unwrap().len() >= 2);
    // Reap in the background as a launcher would, while destroy kills.
    let reaper = std::thread::spawn(move || wait(&child.pidfd).unwrap());
    isolator.destroy(&id).unwrap();
    assert_eq!(reaper.join().unwrap(), Exit::Signal(libc::SIGKILL));
    assert!(!isolator.list().unwrap().contains(&id));
    // v1 controllers and unified/ on a hybrid host, the root on pure v2.
    for hierarchy in ["cpu/", "memory/", "pids/", "unified/", ""] {
        assert!(
            !Path::new(&format!("/sys/fs/cgroup/{hierarchy}butte/{id}")).exists(),
            "{hierarchy} left behind"
        );
    }
    std::fs::remove_dir_all(sandbox).unwrap();
}

#[test]
fn task_group_tasks_share_the_init_s_pid_namespace_and_cgroup() {
    use butte_isolators::container::{join, signal};
    let isolator = isolator();
    let id = unique("group");
    let placement = isolator.create(&id, &limits(1.0, 128.0, 64)).unwrap();
    let group_sandbox = sandbox(&id);
    let base = ContainerSpec {
        argv: vec![],
        ..shell_spec(&id, &placement, &group_sandbox, "")
    };
    let init = spawn(&base).unwrap();
    let mut tasks = Vec::new();
    for name in ["a", "b", "c"] {
        let task_sandbox = group_sandbox.join("tasks").join(name);
        std::fs::create_dir_all(&task_sandbox).unwrap();
        let spec = shell_spec(
            &id,
            &placement,
            &task_sandbox,
            "readlink /proc/self/ns/pid > ns; hostname > host; echo $$ > pid",
        );
        tasks.push((task_sandbox, join(&init.pidfd, &spec).unwrap()));
    }
    for (_, task) in &tasks {
        assert_eq!(wait(&task.pidfd).unwrap(), Exit::Code(0));
    }
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    let namespaces: Vec<String> = tasks.iter().map(|(dir, _)| read(dir, "ns")).collect();
    let host_ns = std::fs::read_link("/proc/self/ns/pid")
        .unwrap()
        .display()
        .to_string()
        + "\n";
    assert!(
        namespaces.iter().all(|ns| *ns == namespaces[0]),
        "one pid namespace for the group: {namespaces:?}"
    );
    assert_ne!(namespaces[0], host_ns, "and not the host's");
    for (dir, _) in &tasks {
        assert_eq!(read(dir, "host"), format!("{id}\n"), "the group's hostname");
        let pid: i32 = read(dir, "pid").trim().parse().unwrap();
        assert!(
            pid > 1,
            "tasks are below the group's init (pid 1), got {pid}"
        );
    }
    signal(&init.pidfd, libc::SIGKILL).unwrap();
    assert_eq!(wait(&init.pidfd).unwrap(), Exit::Signal(libc::SIGKILL));
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(group_sandbox).unwrap();
}

#[test]
fn the_hosts_device_controller_alone_denies_devices_not_allowed() {
    // A hybrid host: the v1 devices controller decides (no eBPF attached).
    // Pure v2 has no such controller: the eBPF device fence alone decides,
    // with the default rules every container gets (null, zero, tty...).
    let v1 = Path::new("/sys/fs/cgroup/devices/cgroup.procs").exists();
    let subtree = format!("butte/kt-devices-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let id = unique("devices");
    let fake = PathBuf::from(format!("/dev/butte-kt-dev-{}", std::process::id()));
    let _ = std::fs::remove_file(&fake);
    let made = std::process::Command::new("mknod")
        .arg(&fake)
        .args(["c", "195", "78"])
        .status()
        .unwrap();
    assert!(made.success());
    let placement = isolator.create(&id, &limits(1.0, 64.0, 16)).unwrap();
    let mut fences = None;
    let denied_too = if v1 {
        isolator
            .restrict_devices(&id, &["c 1:3 rwm".to_owned()])
            .unwrap();
        Some("/dev/zero")
    } else {
        let mut attached = Fences::attach_all(&isolator.v2_subtree()).unwrap();
        attached
            .fence(&id, &placement.unified, &TaskFence::default())
            .unwrap();
        fences = Some(attached);
        None
    };
    let sandbox = sandbox(&id);
    let script = format!(
        "cat /dev/null && echo null=ok; cat {} 2>&1; head -c 1 /dev/zero 2>&1 >/dev/null && echo zero=ok; true",
        fake.display()
    );
    let spec = shell_spec(&id, &placement, &sandbox, &script);
    let child = spawn(&spec).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    let out = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    std::fs::remove_file(&fake).unwrap();
    assert!(out.contains("null=ok"), "{out}");
    assert!(
        out.contains(&format!("{}: Operation not permitted", fake.display())),
        "{out}"
    );
    match denied_too {
        Some(zero) => assert!(
            out.lines()
                .any(|l| l.contains(zero) && l.contains("Operation not permitted")),
            "only /dev/null was allowed:\n{out}"
        ),
        None => assert!(out.contains("zero=ok"), "a default device:\n{out}"),
    }
    if let Some(mut fences) = fences {
        fences.unfence(&id);
    }
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    isolator.remove_subtree();
}

#[test]
fn destroying_a_container_takes_a_forking_task_whole() {
    // cgroup.kill (5.14+: every kernel of the matrix) kills the whole cgroup
    // at once; a fork loop cannot outrun it. Older kernels fall back to
    // killing process by process, which this loop would make race.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap(), version.next().unwrap());
    assert_eq!(
        butte_isolators::cgroups::has_cgroup_kill(),
        (major, minor) >= (5, 14),
        "cgroup.kill is detected on {release}"
    );
    let isolator = isolator();
    let id = unique("forker");
    let placement = isolator.create(&id, &limits(1.0, 256.0, 512)).unwrap();
    let sandbox = sandbox(&id);
    // 300 sleepers, then a shell that never stops forking.
    let spec = shell_spec(
        &id,
        &placement,
        &sandbox,
        "i=0; while [ $i -lt 300 ]; do sleep 100 & i=$((i+1)); done; while :; do /bin/true; done",
    );
    let _child = spawn(&spec).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while isolator.pids(&id).unwrap().len() < 300 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = isolator.pids(&id).unwrap();
    let err = std::fs::read_to_string(sandbox.join("stderr")).unwrap_or_default();
    assert!(pids.len() >= 300, "the loop forked: {} {err}", pids.len());
    let started = Instant::now();
    isolator.destroy(&id).unwrap();
    assert!(!placement.unified.exists(), "the cgroup is gone");
    println!("destroyed in {:?}", started.elapsed());
    std::fs::remove_dir_all(sandbox).unwrap();
}
