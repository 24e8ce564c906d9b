use super::*;

fn packet_body(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(rest);
    body
}

#[test]
fn every_kind_of_startup_packet_is_recognised() {
    assert_eq!(
        parse_startup_packet(&packet_body(SSL_REQUEST_CODE, b"")).unwrap(),
        StartupPacket::SslRequest
    );
    assert_eq!(
        parse_startup_packet(&packet_body(GSSENC_REQUEST_CODE, b"")).unwrap(),
        StartupPacket::GssEncRequest
    );
    let mut cancel = 42i32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        parse_startup_packet(&packet_body(CANCEL_REQUEST_CODE, &cancel)).unwrap(),
        StartupPacket::CancelRequest {
            pid: 42,
            key: Bytes::from_static(&[1, 2, 3, 4])
        }
    );
    // A 3.2 cancel key of 32 bytes.
    let mut long = 7i32.to_be_bytes().to_vec();
    long.extend_from_slice(&[9; 32]);
    assert!(matches!(
        parse_startup_packet(&packet_body(CANCEL_REQUEST_CODE, &long)).unwrap(),
        StartupPacket::CancelRequest { pid: 7, key } if key.len() == 32
    ));
    let packet = startup_message(&[("user", "alice"), ("database", ""), ("options", "-c a=b")]);
    let parsed = parse_startup_packet(&packet[4..]).unwrap();
    assert_eq!(parsed.param("user"), Some("alice"));
    assert_eq!(parsed.param("database"), Some(""));
    assert_eq!(parsed.param("options"), Some("-c a=b"));
    assert_eq!(parsed.param("nothing"), None);
    let v32 = packet_body(196_610, b"user\0bob\0_pq_.x\0y\0\0");
    assert_eq!(
        parse_startup_packet(&v32).unwrap(),
        StartupPacket::Startup {
            minor_version: 2,
            params: vec![
                ("user".into(), Bytes::from_static(b"bob")),
                ("_pq_.x".into(), Bytes::from_static(b"y"))
            ]
        }
    );
    assert_eq!(
        parse_startup_packet(&packet_body(PROTOCOL_3_0, b"\0")).unwrap(),
        StartupPacket::Startup {
            minor_version: 0,
            params: vec![]
        }
    );
}

#[test]
fn values_in_other_encodings_are_kept_as_bytes() {
    // psql with a Latin-1 PGAPPNAME ("café").
    let packet = startup_message(&[("user", &b"alice"[..]), ("application_name", b"caf\xe9")]);
    let StartupPacket::Startup { params, .. } = parse_startup_packet(&packet[4..]).unwrap() else {
        panic!("not a startup message");
    };
    assert_eq!(&params[1].1[..], b"caf\xe9");
    assert_eq!(param(&params, "user"), Some("alice"));
    assert_eq!(param(&params, "application_name"), None, "not UTF-8");
}

#[test]
fn malformed_startup_packets_are_errors() {
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 3],
        packet_body(SSL_REQUEST_CODE, b"x"),
        packet_body(CANCEL_REQUEST_CODE, &[0; 3]),
        packet_body(CANCEL_REQUEST_CODE, &[0; 300]),
        packet_body(0x0002_0000, b"\0"),
        packet_body(PROTOCOL_3_0, b""),
        packet_body(PROTOCOL_3_0, b"user"),
        packet_body(PROTOCOL_3_0, b"user\0"),
        packet_body(PROTOCOL_3_0, b"user\0alice"),
        packet_body(PROTOCOL_3_0, b"user\0alice\0"),
        packet_body(PROTOCOL_3_0, b"user\0\0"),
        packet_body(PROTOCOL_3_0, b"\xff\0x\0\0"), // a name that is not UTF-8
        packet_body(PROTOCOL_3_0, b"a\0b\0\0c\0d\0\0"),
        packet_body(-1, b"\0"),
    ];
    for case in cases {
        assert!(parse_startup_packet(&case).is_err(), "{case:?}");
    }
}

#[tokio::test]
async fn reads_are_bounded_by_the_length_word() {
    let packet = startup_message(&[("user", "alice")]);
    let read = read_startup_packet(&mut &packet[..], MAX_STARTUP_PACKET)
        .await
        .unwrap();
    assert_eq!(&read[..], &packet[4..]);
    for len in [-1i32, 0, 7, 10_001, i32::MAX] {
        let bytes = len.to_be_bytes();
        let error = read_startup_packet(&mut &bytes[..], MAX_STARTUP_PACKET)
            .await
            .unwrap_err();
        assert!(matches!(error, WireError::Length { .. }), "{len}: {error}");
    }
    // A truncated packet is an I/O error, not a hang or a panic.
    let error = read_startup_packet(&mut &packet[..packet.len() - 1], MAX_STARTUP_PACKET)
        .await
        .unwrap_err();
    assert!(matches!(error, WireError::Io(_)));

    let message = message(b'p', b"token\0");
    let (tag, body) = read_message(&mut &message[..], 100).await.unwrap();
    assert_eq!((tag, &body[..]), (b'p', &b"token\0"[..]));
    assert!(read_message(&mut &message[..], 3).await.is_err());
    let negative = [b'p', 0xff, 0xff, 0xff, 0xff];
    assert!(read_message(&mut &negative[..], 100).await.is_err());
    let short = [b'p', 0, 0, 0, 3];
    assert!(read_message(&mut &short[..], 100).await.is_err());
}

#[test]
fn passwords_must_be_one_terminated_string() {
    assert_eq!(parse_password(b"a.b.c\0").unwrap(), "a.b.c");
    assert_eq!(parse_password(b"\0").unwrap(), "");
    for bad in [&b""[..], b"abc", b"a\0b\0", b"\xff\0"] {
        assert!(parse_password(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn error_fields_round_trip_and_take_hints() {
    let mut fields = ErrorFields::fatal("28P01", "bad token", None);
    fields.set(b'H', "get a new one");
    let message = fields.to_error_response();
    assert_eq!(message[0], b'E');
    let len = i32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
    assert_eq!(len + 1, message.len());
    let parsed = ErrorFields::parse(&message[5..]).unwrap();
    assert_eq!(parsed, fields);
    assert_eq!(parsed.get(b'C'), Some("28P01"));
    assert_eq!(parsed.get(b'H'), Some("get a new one"));
    for bad in [&b""[..], b"Mabc", b"Mabc\0"] {
        assert!(ErrorFields::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(ErrorFields::parse(b"\0").unwrap(), ErrorFields::default());
}

#[test]
fn server_messages_are_framed() {
    assert_eq!(
        &cleartext_password_request()[..],
        &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]
    );
    let key = backend_key_data(5, &[1, 2, 3, 4]);
    assert_eq!(&key[..], &[b'K', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4]);
    let cancel = cancel_request(5, &[1, 2, 3, 4]);
    assert_eq!(
        parse_startup_packet(&cancel[4..]).unwrap(),
        StartupPacket::CancelRequest {
            pid: 5,
            key: Bytes::from_static(&[1, 2, 3, 4])
        }
    );
    let params = vec![("user".to_owned(), Bytes::from_static(b"u"))];
    assert_eq!(negotiation(0, &params), None);
    assert!(negotiation(2, &params).is_some());
    let with_option = vec![("_pq_.x".to_owned(), Bytes::from_static(b"1"))];
    assert!(negotiation(0, &with_option).unwrap().ends_with(b"_pq_.x\0"));
    let negotiate = negotiate_protocol_version(["_pq_.a", "_pq_.b"]);
    assert_eq!(negotiate[0], b'v');
    assert!(negotiate.ends_with(b"_pq_.a\0_pq_.b\0"));
}
