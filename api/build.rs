//! Generates the Mesos v1 subset and the agent link from `proto/`, plus a file
//! descriptor set that the JSON mapping reads at run time.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/mesos/v1/mesos.proto",
        "proto/mesos/v1/scheduler.proto",
        "proto/mesos/v1/master.proto",
        "proto/mesos/v1/agent.proto",
        "proto/butte/telemetry/v1/telemetry.proto",
        "proto/butte/agent/v1/agent.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config
        .file_descriptor_set_path(out_dir.join("descriptors.bin"))
        .enable_type_names();
    tonic_prost_build::configure().compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
