#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| butte_api::fuzz::operator_call(data));
