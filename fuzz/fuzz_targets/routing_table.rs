//! Fuzz target: see `shoal_fuzz::routing_table`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::routing_table(data));
