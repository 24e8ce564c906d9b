//! The startup phase as the proxy and the emulator's gateway read it: startup packets (startup
//! message, SSL, GSS and cancel requests), password messages and error responses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgentra_wire::{ErrorFields, StartupPacket, parse_password, parse_startup_packet};

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = parse_startup_packet(data) {
        if let StartupPacket::Startup { params, .. } = &packet {
            // Parameters are NUL-free, so they round-trip through a startup message.
            let pairs: Vec<(&str, &[u8])> =
                params.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
            let again = pgentra_wire::startup_message(&pairs);
            if let Ok(StartupPacket::Startup { params: reparsed, .. }) =
                parse_startup_packet(&again[4..])
            {
                assert_eq!(&reparsed, params);
            } else {
                panic!("a rendered startup message does not parse");
            }
        }
    }
    let _ = parse_password(data);
    if let Ok(fields) = ErrorFields::parse(data) {
        let message = fields.to_error_response();
        assert_eq!(message[0], b'E');
    }
});
