//! Fuzz target: see `shoal_fuzz::pack`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::pack(data));
