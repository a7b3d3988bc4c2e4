//! Compiles the eBPF programs in src/bpf with clang (apt: clang, libbpf-dev;
//! scripts/install-deps installs them).
use std::path::PathBuf;
use std::process::Command;

/// The objects built from src/bpf: (source stem, object stem, clang flags).
const PROGRAMS: &[(&str, &str, &[&str])] = &[
    ("ports", "ports", &[]),
    ("devices", "devices", &[]),
    ("accounting", "accounting", &[]),
    ("network", "network", &[]),
    ("books", "books", &[]),
    // The books' walk that also reads the run-queue histograms in cgroup
    // storage (6.2 on; the map type does not exist before).
    ("books", "books_runq", &["-DWITH_RUNQ"]),
    ("runq", "runq", &[]),
];

/// The most tasks (cgroups) one agent tracks at once. Every per-task hash map
/// is sized to it (clang gets it as MAX_TASKS) and the crate says the same
/// (`butte_agent_ebpf::MAX_TASKS`, from OUT_DIR/max_tasks.rs). A hash map's
/// batch read and for-each walk all its buckets (one per entry, rounded up to
/// a power of two), so this is sized to what a node runs, not to what the
/// kernel allows.
const MAX_TASKS: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Debian keeps <asm/types.h> under the multiarch include directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let max_tasks = format!("-DMAX_TASKS={MAX_TASKS}");
    std::fs::write(
        out.join("max_tasks.rs"),
        format!("pub const MAX_TASKS: usize = {MAX_TASKS};\n"),
    )?;
    for (program, object, flags) in PROGRAMS {
        let source = format!("src/bpf/{program}.bpf.c");
        println!("cargo:rerun-if-changed={source}");
        println!("cargo:rerun-if-changed=src/bpf/counters.h");
        println!("cargo:rerun-if-changed=src/bpf/runq.h");
        println!("cargo:rerun-if-changed=src/bpf/sched.h");
        let object = out.join(format!("{object}.bpf.o"));
        let status = Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror", "-c"])
            .arg(&multiarch)
            .arg(&max_tasks)
            .args(*flags)
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status()
            .map_err(|e| format!("cannot run clang for {source} ({e}); run scripts/install-deps (clang, libbpf-dev)"))?;
        if !status.success() {
            return Err(format!("clang failed on {source}").into());
        }
    }
    Ok(())
}
