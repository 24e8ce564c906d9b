//! The proxy's whole startup phase, as a client drives it, on an in-memory stream: any bytes
//! in (with client TLS offered or not, picked by the first byte); out come only the protocol's
//! answers — one-byte answers to encryption requests, a NegotiateProtocolVersion, or nothing —
//! and a request or a typed refusal whose FATAL has a SQLSTATE. Nothing may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgentra_proxy::startup::{ClientConn, Request, StartupError, negotiate};
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn tls() -> &'static tokio_rustls::TlsAcceptor {
    static TLS: OnceLock<tokio_rustls::TlsAcceptor> = OnceLock::new();
    TLS.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    // PostgreSQL 17's direct TLS: the proxy's answers are TLS records from the first byte.
    let direct_tls = mode & 1 != 0 && mode & 2 == 0 && input.first() == Some(&0x16);
    let input = input.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut answers = Vec::new();
            let _ = client.read_to_end(&mut answers).await;
            answers
        });
        let mut conn = ClientConn::new(Box::new(server), mode & 2 != 0);
        let tls = (mode & 1 != 0).then(tls);
        let result = negotiate(&mut conn, tls).await;
        let tls_used = conn.is_tls();
        drop(conn);
        let answers = writer.await.unwrap();
        // In clear text the proxy says only S/N, and a NegotiateProtocolVersion last. After an
        // `S` the rest is TLS (records of a handshake, or an alert when it failed). Read the
        // answers in order: an `S` inside the NegotiateProtocolVersion is a parameter's letter.
        let clear: &[u8] = if direct_tls { &[] } else { &answers };
        let mut at = 0;
        while at < clear.len() && clear[at] == b'N' {
            at += 1;
        }
        let (bytes, negotiation) = match clear.get(at) {
            Some(b'S') => (&clear[..=at], &clear[..0]),
            Some(b'v') => clear.split_at(at),
            Some(other) => panic!("the proxy answered {other:#04x} in clear text: {answers:?}"),
            None => (clear, &clear[..0]),
        };
        assert!(bytes.iter().all(|b| matches!(b, b'S' | b'N')), "{answers:?}");
        if !negotiation.is_empty() {
            assert!(!tls_used && matches!(result, Ok(Request::Login { .. })));
            let len = i32::from_be_bytes(negotiation[1..5].try_into().unwrap());
            assert_eq!(usize::try_from(len).unwrap() + 1, negotiation.len());
        }
        match result {
            Ok(Request::Login { params, .. }) => {
                // What was parsed renders back to the same parameters.
                let pairs: Vec<(&str, &[u8])> =
                    params.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
                let again = pgentra_wire::startup_message(&pairs);
                match pgentra_wire::parse_startup_packet(&again[4..]) {
                    Ok(pgentra_wire::StartupPacket::Startup { params: reparsed, .. }) => {
                        assert_eq!(reparsed, params);
                    }
                    other => panic!("a rendered startup message reads as {other:?}"),
                }
            }
            Ok(Request::Cancel { key, .. }) => assert!((4..=256).contains(&key.len())),
            Err(StartupError::Refuse(refusal)) => {
                let fields = refusal.fields();
                assert_eq!(fields.get(b'S'), Some("FATAL"));
                assert_eq!(fields.get(b'C').map(str::len), Some(5));
                let response = fields.to_error_response();
                let parsed = pgentra_wire::ErrorFields::parse(&response[5..]).unwrap();
                assert_eq!(parsed, fields);
            }
            Err(StartupError::Gone(_)) => {}
        }
    });
});
