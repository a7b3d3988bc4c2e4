#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = butte_gpu::sim::SimBackend::validate(data);
});
