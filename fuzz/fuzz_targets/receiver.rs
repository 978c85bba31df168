#![no_main]
//! libFuzzer entry point; the harness is `deltasync_fuzz::receiver`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    deltasync_fuzz::receiver::run(data);
});
