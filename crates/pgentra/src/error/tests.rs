//! Errors print themselves and keep their cause in `source()`, so a chain printer says each
//! thing once.

use super::*;
use crate::claims::Claims;

/// Each error whose cause is a source, with that cause's text.
fn with_causes() -> Vec<(Error, String)> {
    let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by peer");
    let format = Claims::decode("a.b").unwrap_err();
    vec![
        (
            Error::io("/etc/pgentra/root.crt", io),
            "no such file".into(),
        ),
        (Error::connect(refused), "refused by peer".into()),
        (
            Error::TokenFormat {
                credential: "AzureCliCredential".into(),
                source: format.clone(),
            },
            format.to_string(),
        ),
    ]
}

#[test]
fn display_leaves_the_cause_to_source() {
    for (error, cause) in with_causes() {
        let display = error.to_string();
        assert!(!display.contains(&cause), "{display}");
        let source = std::error::Error::source(&error).expect("a source");
        assert_eq!(source.to_string(), cause);
    }
}

#[test]
fn the_chain_says_each_cause_once() {
    for (error, cause) in with_causes() {
        let chain = ErrorChain(&error).to_string();
        assert_eq!(chain, format!("{error}: {cause}"));
    }
}
