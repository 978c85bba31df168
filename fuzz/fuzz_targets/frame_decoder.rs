#![no_main]
//! libFuzzer entry point; the harness is `deltasync_fuzz::frame_decoder`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    deltasync_fuzz::frame_decoder::run(data);
});
