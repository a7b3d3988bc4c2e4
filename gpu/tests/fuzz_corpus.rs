//! Replays every stored fuzz input (the seeds in `fuzz/seeds/<target>/`, the
//! crash inputs kept as regression cases in `fuzz/regressions/<target>/`,
//! the minimized corpus of the 10-minute runs in
//! `fuzz/minimized/<target>.bundle`, and a local `fuzz/corpus/<target>/`
//! when one was grown here) through the
//! same entry points the fuzz targets drive, so that plain `cargo test`
//! holds what the fuzzer found without needing nightly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn replay(target: &str, entry: impl Fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions", "corpus"].map(|kind| fuzz.join(kind).join(target)) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in entries {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            entry(&data);
            replayed += 1;
        }
    }
    let bundle = fuzz.join("minimized").join(format!("{target}.bundle"));
    if let Ok(bytes) = std::fs::read(&bundle) {
        let inputs = unbundle(&bytes)
            .unwrap_or_else(|| panic!("{} is not a bundle (see fuzz/bundle.py)", bundle.display()));
        for input in inputs {
            entry(input);
            replayed += 1;
        }
    }
    replayed
}

/// The inputs of a bundle: each a 4-byte little-endian length and its bytes.
fn unbundle(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut inputs = Vec::new();
    while !bytes.is_empty() {
        let (length, rest) = bytes.split_first_chunk::<4>()?;
        let length = usize::try_from(u32::from_le_bytes(*length)).ok()?;
        if rest.len() < length {
            return None;
        }
        let (input, rest) = rest.split_at(length);
        inputs.push(input);
        bytes = rest;
    }
    Some(inputs)
}

#[test]
fn every_stored_fuzz_input_still_passes_its_target() {
    let counts = [
        (
            "scheduler_call",
            replay("scheduler_call", butte_api::fuzz::scheduler_call),
        ),
        (
            "operator_call",
            replay("operator_call", butte_api::fuzz::operator_call),
        ),
        ("recordio", replay("recordio", butte_api::fuzz::recordio)),
        ("resources", replay("resources", butte_api::fuzz::resources)),
        (
            "checkpoint",
            replay("checkpoint", butte_api::fuzz::checkpoint),
        ),
        (
            "gpu_sim",
            replay("gpu_sim", |data| {
                let _ = butte_gpu::sim::SimBackend::validate(data);
            }),
        ),
    ];
    for (target, count) in counts {
        assert!(
            count > 0,
            "no stored inputs for {target}: fuzz/seeds/{target} is empty"
        );
    }
}
