//! Prints what a GPU backend sees:
//! `cargo run -p butte-gpu --example inventory -- nvml|sim:FILE`.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Some(spec) = std::env::args().nth(1) else {
        eprintln!("usage: inventory nvml|sim:FILE");
        return ExitCode::from(2);
    };
    match run(&spec) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(spec: &str) -> Result<(), butte_gpu::GpuError> {
    let Some(backend) = butte_gpu::open(spec)? else {
        println!("no GPUs ({spec})");
        return Ok(());
    };
    let inv = backend.inventory()?;
    println!("backend: {}, {} GPU(s)\n", backend.name(), inv.gpus.len());
    for gpu in &inv.gpus {
        println!(
            "GPU{} {} {} MiB {} numa={} {} ({}:{})",
            gpu.index,
            gpu.model,
            gpu.memory_mib,
            gpu.uuid,
            gpu.numa_node.map_or("N/A".to_owned(), |n| n.to_string()),
            gpu.device.display(),
            gpu.major,
            gpu.minor
        );
        for mig in &gpu.mig {
            println!(
                "  MIG {} {} gi={} ci={} {} ({}:{})",
                mig.profile,
                mig.uuid,
                mig.gi_id,
                mig.ci_id,
                mig.device.display(),
                mig.major,
                mig.minor
            );
        }
    }
    for ctl in &inv.control_devices {
        println!(
            "control {} ({}:{})",
            ctl.path.display(),
            ctl.major,
            ctl.minor
        );
    }
    println!("\n{}", inv.topology_table());
    println!(
        "{:<5} {:>6} {:>10} {:>8} {:>6} {:>4}",
        "GPU", "util%", "mem MiB", "power W", "temp C", "ECC"
    );
    let samples = backend.samples()?;
    for s in &samples {
        println!(
            "{:<5} {:>6.1} {:>10} {:>8.1} {:>6.1} {:>4}",
            s.index,
            s.utilization_percent,
            s.memory_used_mib,
            s.power_watts,
            s.temperature_c,
            s.ecc_uncorrectable
        );
    }
    println!("\nprocesses:");
    for p in backend.processes()? {
        println!(
            "  pid {} on GPU{}: {} MiB, SM {:.1}%",
            p.pid, p.gpu_index, p.memory_used_mib, p.sm_utilization_percent
        );
    }
    let faults: Vec<String> = samples.iter().filter_map(|s| s.fault()).collect();
    if faults.is_empty() {
        println!("\nfaults: none");
    } else {
        println!("\nfaults:");
        for fault in faults {
            println!("  {fault}");
        }
    }
    Ok(())
}
