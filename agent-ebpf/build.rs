//! Compiles the eBPF programs in src/bpf with clang (apt: clang, libbpf-dev;
//! scripts/install-deps installs them).
use std::path::PathBuf;
use std::process::Command;

/// The programs under src/bpf, by file stem.
const PROGRAMS: &[&str] = &["ports", "devices", "accounting", "network"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Debian keeps <asm/types.h> under the multiarch include directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    for program in PROGRAMS {
        let source = format!("src/bpf/{program}.bpf.c");
        println!("cargo:rerun-if-changed={source}");
        println!("cargo:rerun-if-changed=src/bpf/tasks.h");
        let object = out.join(format!("{program}.bpf.o"));
        let status = Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror", "-c"])
            .arg(&multiarch)
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
