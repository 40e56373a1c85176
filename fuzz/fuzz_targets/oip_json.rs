//! Fuzz target: see `shoal_fuzz::oip_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::oip_json(data));
