//! The cost of per-task telemetry at N running tasks (default 500) sampled
//! every second, our path and the cgroupfs poller side by side in one run.
//!
//! - butte: the eBPF programs' own run time (kernel.bpf_stats, everything
//!   they did machine-wide while the tasks ran: sched_switch, exec, exit,
//!   skb) plus the agent's collection each second: the flush iterator (and
//!   the user/system split iterator every 10th round), the four per-task
//!   maps (CPU and run queue, network, denied binds, denied opens) each read whole with BPF_MAP_LOOKUP_BATCH, and the
//!   memory usage file of every task (memory.stat when the usage moved or
//!   every 30th round) read through one io_uring submission per 256 files.
//! - poller: what cAdvisor and the Mesos agent do each second: open, read
//!   and close per task cpuacct.usage, cpuacct.stat, memory.usage_in_bytes,
//!   memory.stat, and /proc/<pid>/schedstat for the run-queue wait (it has
//!   no per-task network or denial figures at all).
//!
//! Both sides are CPU time of this process (io_uring workers included).
//! Each task is a perl loop that wakes WAKES times a second (default 10; 0:
//! it sleeps throughout). The programs' cost follows the machine's context
//! switches, the collection's follows the tasks, so the ratio depends on
//! how busy the tasks are; the bench says which it measured.
//!
//! With the kernel's books (books.bpf.c), the flush and split iterators do
//! not run and sched_switch runs only for tasks that keep a run-queue
//! histogram: `histogram` as the fourth argument gives every task one.
//!
//! `cargo run --release -p butte-bench --bin telemetry-cost [-- TASKS SECONDS WAKES [histogram]]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use butte_agent::cgroup_reader::CgroupReader;
use butte_agent::telemetry::MemorySampler;
use butte_isolators::cgroups::{Isolator, Limits, detect};
use butte_isolators::container::{ContainerSpec, Spawned, signal, spawn, wait};

use butte_isolators::fences::{Fences, TaskFence};

const WORK: &str = "/var/lib/butte-bench/telemetry";
const SUBTREE: &str = "butte/bench-telemetry";

fn process_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now);
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

struct Task {
    id: String,
    key: u64,
    child: Spawned,
}

fn start_tasks(
    isolator: &dyn Isolator,
    n: usize,
    wakes_per_second: f64,
    histogram: bool,
    fences: &mut Fences,
) -> Vec<Task> {
    let script = if wakes_per_second > 0.0 {
        format!(
            "select(undef, undef, undef, {}) while 1",
            1.0 / wakes_per_second
        )
    } else {
        "sleep while 1".to_string()
    };
    (0..n)
        .map(|i| {
            let id = format!("tel-{i}");
            let placement = isolator
                .create(
                    &id,
                    &Limits {
                        cpus: 0.1,
                        mem_mb: 64.0,
                        pids_max: 16,
                    },
                )
                .unwrap_or_else(|e| panic!("cgroups for {id}: {e}"));
            let fence = TaskFence {
                runqueue_histogram: histogram,
                ..TaskFence::default()
            };
            let key = fences
                .fence(&id, &placement.unified, &fence)
                .unwrap_or_else(|e| panic!("fence {id}: {e}"));
            let sandbox = PathBuf::from(WORK).join(&id);
            std::fs::create_dir_all(&sandbox).unwrap_or_else(|e| panic!("sandbox: {e}"));
            // Asleep: a plain sleep (4,096 perls would not fit in memory).
            let argv = if wakes_per_second > 0.0 {
                vec!["/usr/bin/perl".into(), "-e".into(), script.clone()]
            } else {
                vec!["/bin/sleep".into(), "1000000".into()]
            };
            let spec = ContainerSpec {
                argv,
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                sandbox,
                hostname: id.clone(),
                cgroup: placement.unified,
                v1_procs: placement.v1_procs,
                tmp_mb: 1,
                privileges: Default::default(),
            };
            let child = spawn(&spec).unwrap_or_else(|e| panic!("spawn {id}: {e}"));
            Task { id, key, child }
        })
        .collect()
}

/// One round of our collection; returns a checksum so nothing is optimised away.
fn sample_ours(
    fences: &mut Fences,
    memory: &mut MemorySampler,
    isolator: &dyn Isolator,
    tasks: &[Task],
    parts: &mut [Duration; 3],
) -> u64 {
    let started = process_cpu();
    fences.flush();
    let flushed = process_cpu();
    parts[0] += flushed - started;
    let mut sum = 0;
    let counts = fences.counts();
    let read = if fences.cpu_from_books() {
        counts.books.len()
    } else {
        counts.cpu.len()
    };
    assert!(read >= tasks.len(), "every task's counts were read");
    let kernel_memory: std::collections::HashMap<u64, u64> = counts
        .books
        .iter()
        .filter_map(|(id, b)| Some((*id, b.memory_bytes?)))
        .collect();
    for task in tasks {
        sum += counts.books.get(&task.key).map_or(0, |b| b.cpu_ns);
        sum += counts.cpu.get(&task.key).map_or(0, |s| s.cpu_ns);
        sum += counts.net.get(&task.key).map_or(0, |s| s.tx_bytes);
        sum += counts.denied_binds.get(&task.key).copied().unwrap_or(0);
        sum += counts.denied_opens.get(&task.key).copied().unwrap_or(0);
    }
    let looked_up = process_cpu();
    parts[1] += looked_up - flushed;
    let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    let read = memory.read(isolator, &ids, &kernel_memory);
    parts[2] += process_cpu() - looked_up;
    assert_eq!(read.len(), tasks.len(), "every task's memory was read");
    sum + read.values().map(|m| m.usage).sum::<u64>()
}

/// One round of polling cgroupfs (and procfs) the way a poller does.
fn sample_poller(tasks: &[Task]) -> u64 {
    let mut sum = 0u64;
    for task in tasks {
        for path in [
            format!("/sys/fs/cgroup/cpuacct/{SUBTREE}/{}/cpuacct.usage", task.id),
            format!("/sys/fs/cgroup/cpuacct/{SUBTREE}/{}/cpuacct.stat", task.id),
            format!(
                "/sys/fs/cgroup/memory/{SUBTREE}/{}/memory.usage_in_bytes",
                task.id
            ),
            format!("/sys/fs/cgroup/memory/{SUBTREE}/{}/memory.stat", task.id),
            format!("/proc/{}/schedstat", task.child.pid),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            sum += text.len() as u64;
        }
    }
    sum
}

/// Runs `round` once a second for `seconds`; returns the CPU it took.
fn every_second(seconds: u64, mut round: impl FnMut() -> u64) -> Duration {
    let started = Instant::now();
    let mut cpu = Duration::ZERO;
    let mut checksum = 0u64;
    for second in 0..seconds {
        let before = process_cpu();
        checksum = checksum.wrapping_add(round());
        cpu += process_cpu() - before;
        let next = Duration::from_secs(second + 1);
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
    std::hint::black_box(checksum);
    cpu
}

/// One run's CPU time, ours and the poller's.
struct Measured {
    seconds: u64,
    tasks: usize,
    collection: Duration,
    bpf: Duration,
    runs: u64,
    /// Collection split: flush, map reads, memory files.
    parts: [Duration; 3],
    poller: Duration,
}

fn report(m: &Measured) {
    let per_second = |d: Duration| d.as_secs_f64() * 1e3 / m.seconds as f64;
    let ours = m.collection + m.bpf;
    println!(
        "butte:  {:>7.3} ms CPU/s = {:.3} % of a core  (eBPF programs {:.3} ms/s, collection {:.3} ms/s)",
        per_second(ours),
        per_second(ours) / 10.0,
        per_second(m.bpf),
        per_second(m.collection)
    );
    println!(
        "        eBPF: {:.0} program runs/s, {:.0} ns each",
        m.runs as f64 / m.seconds as f64,
        m.bpf.as_nanos() as f64 / m.runs.max(1) as f64
    );
    println!(
        "        collection: flush {:.3} ms/s, books + map reads {:.3} ms/s, memory files {:.3} ms/s",
        per_second(m.parts[0]),
        per_second(m.parts[1]),
        per_second(m.parts[2])
    );
    println!(
        "poller: {:>7.3} ms CPU/s = {:.3} % of a core  (5 files per task)",
        per_second(m.poller),
        per_second(m.poller) / 10.0
    );
    println!(
        "ratio: poller / butte = {:.1}x",
        m.poller.as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "per task-second: butte {:.3} us, poller {:.3} us",
        ours.as_secs_f64() * 1e6 / (m.seconds as f64 * m.tasks as f64),
        m.poller.as_secs_f64() * 1e6 / (m.seconds as f64 * m.tasks as f64)
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(500)
        .max(1);
    let seconds: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10)
        .max(1);
    let wakes_per_second = args
        .next()
        .and_then(|a| a.parse::<f64>().ok())
        .unwrap_or(10.0)
        .max(0.0);
    // `histogram`: every task keeps a run-queue histogram (sched_switch runs).
    let histogram = args.next().is_some_and(|a| a == "histogram");
    let isolator = detect(Path::new("/sys/fs/cgroup"), Path::new(SUBTREE))
        .unwrap_or_else(|e| panic!("cgroups (run as root): {e}"));
    let v1 = Path::new(&format!("/sys/fs/cgroup/cpuacct/{SUBTREE}")).exists();
    assert!(
        v1,
        "the poller reads v1 cpuacct; this benchmark needs the hybrid host"
    );
    let _stats = butte_agent_ebpf::enable_run_time_stats().unwrap_or_else(|e| panic!("{e}"));
    let subtree = isolator.v2_subtree();
    let mut fences = Fences::attach_all(&subtree).unwrap_or_else(|e| panic!("{e}"));
    let tasks = start_tasks(&*isolator, n, wakes_per_second, histogram, &mut fences);
    std::thread::sleep(Duration::from_secs(2));

    let reader = if std::env::var_os("BUTTE_BENCH_PREAD").is_some() {
        CgroupReader::plain()
    } else {
        CgroupReader::new()
    };
    let io_uring = reader.uses_io_uring();
    let mut memory = MemorySampler::new(reader);
    // One untimed round each: opening files and the first memory.stat of
    // every task happen once per task, not every second.
    let mut warm_up = [Duration::ZERO; 3];
    std::hint::black_box(sample_ours(
        &mut fences,
        &mut memory,
        &*isolator,
        &tasks,
        &mut warm_up,
    ));
    std::hint::black_box(sample_poller(&tasks));
    // The books' share, timed apart on a second reader of the same subtree.
    if let Ok(mut books) = butte_agent_ebpf::books::Books::load(&subtree, None, None) {
        let mut walks = Duration::ZERO;
        for _ in 0..10 {
            let started = process_cpu();
            std::hint::black_box(books.read().map(|b| b.len()).unwrap_or(0));
            walks += process_cpu() - started;
        }
        println!(
            "books alone: walk + read {:.3} ms (mean of 10)",
            walks.as_secs_f64() * 1e2
        );
    }
    let (bpf_before, runs_before) = fences.run_time();
    let mut parts = [Duration::ZERO; 3];
    let collection = every_second(seconds, || {
        sample_ours(&mut fences, &mut memory, &*isolator, &tasks, &mut parts)
    });
    let (bpf_after, runs_after) = fences.run_time();
    let (bpf, runs) = (bpf_after - bpf_before, runs_after - runs_before);
    let poller = every_second(seconds, || sample_poller(&tasks));

    println!(
        "{n} tasks waking {wakes_per_second} times a second each, sampled every second for {seconds} s (io_uring: {io_uring}; CPU from the kernel's books: {}; run-queue histogram for all: {histogram})",
        fences.cpu_from_books()
    );
    report(&Measured {
        seconds,
        tasks: n,
        collection,
        bpf,
        runs,
        parts,
        poller,
    });

    for task in &tasks {
        let _ = signal(&task.child.pidfd, libc::SIGKILL);
        let _ = wait(&task.child.pidfd);
        let _ = isolator.destroy(&task.id);
    }
    drop(fences);
    isolator.remove_subtree();
    let _ = std::fs::remove_dir_all(WORK);
}
