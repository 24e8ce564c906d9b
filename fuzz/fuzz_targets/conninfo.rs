//! Connection strings: URLs and `key=value` text parse or fail with a typed error, and a parsed
//! one renders to libpq text and TLS options without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgentra::conninfo::ConnInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = ConnInfo::parse(text) {
        let _ = info.to_libpq("user", &pgentra::Secret::new("a.b.c"));
        let _ = info.tls_options();
    }
});
