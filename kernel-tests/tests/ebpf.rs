//! The eBPF accounting and network programs on this kernel, without the
//! agent: what they count must agree with the kernel's other books
//! (cpuacct, what iperf3 sent), events must arrive, limits must hold.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use butte_agent_ebpf::accounting::{Accounting, Event, EventKind, Events, TaskStats};
use butte_agent_ebpf::network::{self, Network};
use butte_agent_ebpf::ports::cgroup_id;
use butte_isolators::container::{Exit, spawn, wait};

mod common;
use common::{
    Reaped, cpu_seconds, iperf3_server, isolator_at, limits, mbit_per_s, sandbox, shell_spec,
    unique,
};

/// Events for `cgroup` that arrive within `wait`, until `enough` says stop.
fn collect(
    events: &mut Events,
    cgroup: u64,
    wait: Duration,
    enough: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + wait;
    let mut seen = Vec::new();
    while Instant::now() < deadline && !enough(&seen) {
        seen.extend(events.drain().into_iter().filter(|e| e.cgroup == cgroup));
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// The counts once a task's last threads are done: `wait` returns at the
/// exit, before the thread's last switch banks its runtime, and a flush moves
/// what died since the one before.
fn settled(accounting: &mut Accounting, key: u64) -> TaskStats {
    std::thread::sleep(Duration::from_millis(20));
    accounting.flush().unwrap();
    accounting.stats(key).unwrap()
}

fn within(measured: f64, reference: f64, fraction: f64) -> bool {
    (measured - reference).abs() <= reference * fraction
}

#[test]
fn cpu_time_of_exited_processes_is_counted_to_their_last_slice() {
    let subtree = format!("butte/kt-exits-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut accounting = Accounting::attach(true).unwrap();
    let id = unique("exits");
    let placement = isolator.create(&id, &limits(2.0, 64.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    accounting.track(key, true).unwrap();
    let sandbox = sandbox(&id);
    // Almost all of this task's CPU time is in the last slice of a process:
    // 200 short-lived ones, then a child that wakes once and spins until it
    // exits. (The kernel resets a thread's slice start on its way out, so
    // counting slices at switch-out missed 47-78 % of such a task.)
    let script = "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done; \
                  (sleep 0.05; j=0; while [ $j -lt 90000 ]; do j=$((j+1)); done; exit 0)";
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    let counted = settled(&mut accounting, key).cpu_ns as f64 / 1e9;
    let cpuacct = cpu_seconds(&subtree, &id);
    accounting.forget(key);
    isolator.destroy(&id).unwrap();
    isolator.remove_subtree();
    std::fs::remove_dir_all(sandbox).unwrap();
    assert!(
        cpuacct > 0.1 && within(counted, cpuacct, 0.02),
        "eBPF {counted:.4} s vs cpuacct {cpuacct:.4} s"
    );
}

#[test]
fn cpu_time_and_run_queue_come_from_the_scheduler_and_agree_with_cpuacct() {
    let subtree = format!("butte/kt-acct-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut accounting = Accounting::attach(true).unwrap();
    let mut events = accounting.take_events().unwrap();
    let id = unique("acct");
    let placement = isolator.create(&id, &limits(2.0, 64.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    accounting.track(key, true).unwrap();
    let sandbox = sandbox(&id);
    // A busy loop (runs without switching out) beside a loop of short sleeps
    // (wakeups: run-queue waits, and an exec each).
    let script = "sh -c 'while :; do :; done' & busy=$!; i=0; \
                  while [ $i -lt 60 ]; do sleep 0.02; i=$((i+1)); done; kill $busy";
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // Mid-run: the busy thread has not switched out; flush counts it.
    accounting.flush().unwrap();
    let running = accounting.stats(key).unwrap();
    let running_cpuacct = cpu_seconds(&subtree, &id);
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    let ended = settled(&mut accounting, key);
    let ended_cpuacct = cpu_seconds(&subtree, &id);
    let seen = collect(&mut events, key, Duration::from_secs(2), |seen| {
        seen.iter().filter(|e| e.kind == EventKind::Exit).count() >= 62
    });
    accounting.forget(key);
    isolator.destroy(&id).unwrap();
    isolator.remove_subtree();
    std::fs::remove_dir_all(sandbox).unwrap();

    let running_secs = running.cpu_ns as f64 / 1e9;
    assert!(
        running_secs > 0.5 && within(running_secs, running_cpuacct, 0.02),
        "mid-run: eBPF {running_secs:.4} s vs cpuacct {running_cpuacct:.4} s"
    );
    let ended_secs = ended.cpu_ns as f64 / 1e9;
    assert!(
        within(ended_secs, ended_cpuacct, 0.02),
        "at the end: eBPF {ended_secs:.4} s vs cpuacct {ended_cpuacct:.4} s"
    );
    assert!(
        ended.runq_count >= 60,
        "60 sleeps give 60 wakeups: {ended:?}"
    );
    assert_eq!(ended.runq_slots.iter().sum::<u64>(), ended.runq_count);
    let (user, system) = ended.user_system_ns();
    assert_eq!(user + system, ended.cpu_ns);
    assert!(
        user > system,
        "a shell busy loop runs in user space: {user} vs {system}"
    );
    let execs = seen
        .iter()
        .filter(|e| e.kind == EventKind::Exec && e.comm == "sleep")
        .count();
    assert_eq!(execs, 60, "one exec event per sleep: {seen:?}");
    let exits = seen.iter().filter(|e| e.kind == EventKind::Exit).count();
    assert!(
        exits >= 62,
        "60 sleeps, the busy shell and the script exit: {exits}"
    );
}

#[test]
fn an_oom_kill_arrives_as_an_event_for_the_task() {
    let subtree = format!("butte/kt-oom-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut accounting = Accounting::attach(true).unwrap();
    let mut events = accounting.take_events().unwrap();
    let id = unique("oomevent");
    let placement = isolator.create(&id, &limits(1.0, 32.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    accounting.track(key, true).unwrap();
    let sandbox = sandbox(&id);
    let script = "exec dd if=/dev/zero of=/dev/null bs=256M count=1";
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Signal(libc::SIGKILL));
    let seen = collect(&mut events, key, Duration::from_secs(2), |seen| {
        seen.iter().any(|e| e.kind == EventKind::Exit)
    });
    accounting.forget(key);
    isolator.destroy(&id).unwrap();
    isolator.remove_subtree();
    std::fs::remove_dir_all(sandbox).unwrap();
    let oom = seen
        .iter()
        .find(|e| e.kind == EventKind::OomKill)
        .unwrap_or_else(|| panic!("no OOM event among {seen:?}"));
    assert_eq!(oom.comm, "dd");
    let exit = seen.iter().find(|e| e.kind == EventKind::Exit).unwrap();
    assert_eq!((exit.pid, exit.exit_code & 0x7f), (oom.pid, libc::SIGKILL));
}

/// Runs an iperf3 client with `args` in a fresh container under `network`;
/// returns iperf3's JSON and what the programs counted.
fn iperf3_client(
    subtree: &str,
    network: &mut Network,
    net_limits: network::Limits,
    port: u16,
    args: &str,
) -> (serde_json::Value, network::NetStats) {
    let isolator = isolator_at(subtree);
    let id = unique(&format!("iperf-{port}"));
    let placement = isolator.create(&id, &limits(1.0, 256.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    network.track(key, net_limits, false).unwrap();
    let sandbox = sandbox(&id);
    // The server's own ACKs must not be counted: it runs outside the subtree.
    let server = Reaped(vec![iperf3_server(port)]);
    let script = format!("exec iperf3 -c 127.0.0.1 -p {port} -J {args} > $MESOS_SANDBOX/out.json");
    let child = spawn(&shell_spec(&id, &placement, &sandbox, &script)).unwrap();
    let exit = wait(&child.pidfd).unwrap();
    // What the client wrote last may still be queued after it exits: wait
    // until the count stops moving.
    let mut stats = network.stats(key).unwrap();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        let now = network.stats(key).unwrap();
        if now == stats {
            break;
        }
        stats = now;
    }
    drop(server);
    network.forget(key);
    let out = std::fs::read_to_string(sandbox.join("out.json")).unwrap();
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    assert_eq!(exit, Exit::Code(0), "iperf3 failed: {out}");
    (serde_json::from_str(&out).unwrap(), stats)
}

/// A container writes `bytes` zeros over TCP to a sink in this process;
/// returns what the sink read and what the programs counted.
fn send_to_sink(
    subtree: &str,
    network: &mut Network,
    port: u16,
    bytes: usize,
) -> (usize, network::NetStats) {
    let isolator = isolator_at(subtree);
    let id = unique(&format!("send-{port}"));
    let placement = isolator.create(&id, &limits(1.0, 256.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    network
        .track(key, network::Limits::default(), false)
        .unwrap();
    let sandbox = sandbox(&id);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let sink = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        std::io::copy(&mut stream, &mut std::io::sink()).unwrap() as usize
    });
    let script = format!(
        "exec python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', {port})); \
         s.sendall(bytes({bytes})); s.close()\""
    );
    let child = spawn(&shell_spec(&id, &placement, &sandbox, &script)).unwrap();
    let exit = wait(&child.pidfd).unwrap();
    let received = sink.join().unwrap();
    let stats = network.stats(key).unwrap();
    network.forget(key);
    isolator.destroy(&id).unwrap();
    std::fs::remove_dir_all(sandbox).unwrap();
    assert_eq!(exit, Exit::Code(0));
    (received, stats)
}

#[test]
fn network_bytes_are_counted_and_egress_is_held_to_its_limit() {
    let subtree = format!("butte/kt-net-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let mut network = Network::attach(&isolator.v2_subtree(), None).unwrap();

    // Unlimited: 20 MB sent to a sink on the host. The programs count IP
    // packets: the payload plus 52 B of IPv4 + TCP (timestamps) headers per
    // segment, within 1 %.
    let (received, stats) = send_to_sink(&subtree, &mut network, 15180, 20_000_000);
    assert_eq!(received, 20_000_000);
    let counted = stats.tx_bytes as f64;
    let expected = 20e6 + 52.0 * stats.tx_packets as f64;
    assert!(
        counted >= 20e6 && (counted - expected).abs() <= expected * 0.01,
        "sent 20,000,000 B, tx counted {counted} B in {} packets (expected ~{expected})",
        stats.tx_packets
    );
    assert!(
        stats.tx_packets > 0 && stats.rx_packets > 0 && stats.tx_dropped == 0,
        "{stats:?}"
    );

    // 100 Mbit/s for 3 s.
    let limited = network::Limits {
        egress_mbit_per_s: Some(100.0),
        police_ingress: false,
    };
    let (report, stats) = iperf3_client(&subtree, &mut network, limited, 15181, "-t 3");
    let rate = mbit_per_s(&report);
    drop(network);
    isolator.remove_subtree();
    // Under scripts/vm-test's emulation iperf3's clock and the bucket's
    // (the kernel's) drift apart by a few percent over 3 s (106.5 Mbit/s
    // once, 112.7 sent): there the bound is 10 % over, not 5 %.
    let over = if common::slowdown() > 1 { 110.0 } else { 105.0 };
    assert!(
        (92.0..=over).contains(&rate),
        "100 Mbit/s limit gave {rate:.1} Mbit/s ({stats:?}): {}",
        report["end"]
    );
    assert!(stats.tx_dropped > 0, "the limit dropped packets: {stats:?}");
}

#[test]
fn a_full_task_map_refuses_the_next_task_and_says_the_limit() {
    let mut accounting = Accounting::attach(true).unwrap();
    // Keys far above any real cgroup id, so no thread of this host is counted.
    let first = 1u64 << 40;
    let keys = first..first + butte_agent_ebpf::MAX_TASKS as u64;
    for key in keys.clone() {
        accounting.track(key, true).unwrap();
    }
    let refused = accounting.track(keys.end, true).unwrap_err().to_string();
    for key in keys.clone() {
        accounting.forget(key);
    }
    assert!(
        refused.contains("full") && refused.contains("at most 4096 tasks"),
        "{refused}"
    );
    // Room again once tasks ended.
    accounting.track(keys.end, true).unwrap();
    accounting.forget(keys.end);
}

#[test]
fn sched_switch_runs_only_while_a_task_keeps_a_run_queue_histogram() {
    // As where the kernel's books give CPU time: nothing needs sched_switch
    // until a task asks for its histogram.
    let mut accounting = Accounting::attach(false).unwrap();
    assert!(!accounting.switch_attached(), "nobody asked");
    let key = (1u64 << 41) + 1;
    accounting.track(key, false).unwrap();
    assert!(!accounting.switch_attached(), "a task without a histogram");
    accounting.track(key + 1, true).unwrap();
    assert!(accounting.switch_attached(), "a task keeps one");
    accounting.forget(key + 1);
    assert!(!accounting.switch_attached(), "the last one ended");
    accounting.forget(key);
    let always = Accounting::attach(true).unwrap();
    assert!(always.switch_attached(), "CPU time is counted there");
}

/// Whether this kernel has cgroup local storage (6.2 on).
fn has_cgroup_storage() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 2)
}

#[test]
fn run_queue_histograms_in_cgroup_storage_count_waits_and_run_only_while_kept() {
    use butte_agent_ebpf::books::Books;
    use butte_agent_ebpf::runq::RunqHistograms;
    let mut runq = match RunqHistograms::load() {
        Ok(runq) => runq,
        Err(error) if !has_cgroup_storage() => {
            println!("skipped: no cgroup storage before 6.2 ({error})");
            return;
        }
        Err(error) => panic!("cgroup storage on this kernel: {error}"),
    };
    assert!(!runq.attached(), "nobody asked");
    let subtree = format!("butte/kt-runq-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    let id = unique("runq");
    let placement = isolator.create(&id, &limits(2.0, 64.0, 64)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    // A neighbour that keeps none: its waits are not counted anywhere.
    let other = unique("runq-other");
    let other_placement = isolator.create(&other, &limits(2.0, 64.0, 64)).unwrap();
    let other_key = cgroup_id(&other_placement.unified).unwrap();
    runq.track(key, &placement.unified).unwrap();
    assert!(runq.attached(), "a task keeps one");
    let sandbox = sandbox(&id);
    let other_sandbox = common::sandbox(&other);
    // 60 short sleeps: 60 wakeups, each a wait in the run queue.
    let script = "i=0; while [ $i -lt 60 ]; do sleep 0.01; i=$((i+1)); done";
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    let neighbour = spawn(&shell_spec(
        &other,
        &other_placement,
        &other_sandbox,
        script,
    ))
    .unwrap();
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    assert_eq!(wait(&neighbour.pidfd).unwrap(), Exit::Code(0));
    let all = runq.all();
    // The books' walk reads the same histograms, all in one pass.
    let mut books = Books::load(&isolator.v2_subtree(), None, runq.map()).unwrap();
    let read = books.read().unwrap();
    drop(books);
    runq.forget(key);
    let detached = !runq.attached();
    isolator.destroy(&id).unwrap();
    isolator.destroy(&other).unwrap();
    isolator.remove_subtree();
    std::fs::remove_dir_all(sandbox).unwrap();
    std::fs::remove_dir_all(other_sandbox).unwrap();

    let mine = all.get(&key).expect("the task's histogram");
    assert!(mine.count >= 60, "60 sleeps give 60 wakeups: {mine:?}");
    assert_eq!(mine.slots.iter().sum::<u64>(), mine.count);
    assert!(mine.total_ns > 0);
    assert!(!all.contains_key(&other_key), "the neighbour kept none");
    assert_eq!(
        read[&key].runq.as_ref(),
        Some(mine),
        "the walk reads it too"
    );
    assert_eq!(read[&other_key].runq, None, "and none for the neighbour");
    assert!(detached, "the last one ended: sched_switch runs no more");
}
