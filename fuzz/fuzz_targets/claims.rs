//! Token decoding: any text gives claims or a typed error that does not quote the token, and
//! role derivation never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgentra::claims::Claims;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    match Claims::decode(token) {
        Ok(claims) => {
            let _ = claims.role_name();
            let _ = claims.principal_kind();
            let _ = (claims.exp(), claims.nbf(), claims.iat(), claims.audiences());
        }
        Err(error) => {
            // Errors never quote the token: no long piece of it appears in the message. (Short
            // pieces, or pieces with spaces, could match the message's own words by chance.)
            let message = error.to_string();
            for piece in token.split('.').filter(|p| p.len() >= 16 && !p.contains(' ')) {
                assert!(!message.contains(piece), "an error quotes the token");
            }
        }
    }
});
