#![no_main]
//! libFuzzer entry point; the harness is `deltasync_fuzz::message_decode`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    deltasync_fuzz::message_decode::run(data);
});
