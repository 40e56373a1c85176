//! Fuzz target: see `shoal_fuzz::oip_binary`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::oip_binary(data));
