#![no_main]
//! libFuzzer entry point; the harness is `deltasync_fuzz::server_session`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    deltasync_fuzz::server_session::run(data);
});
