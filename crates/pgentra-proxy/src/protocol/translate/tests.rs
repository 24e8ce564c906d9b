//! The translation replayed on message transcripts, with the tracker, as the relay uses them:
//! what the client sent, what reached the server, what the server answered and what the client
//! got. No server, no sockets.

use super::*;
use crate::protocol::owed::Received;
use pgentra_wire::message;

/// One client's translator on one server connection, and the bytes each way.
#[derive(Default)]
struct Conn {
    translator: Translator,
    owed: Owed<Undo>,
    prepared: Prepared,
    to_server: BytesMut,
    to_client: BytesMut,
}

impl Conn {
    /// The client sends `tag` with `body`; what pins, if anything.
    fn send(&mut self, tag: u8, body: &[u8]) -> Option<Effect> {
        self.try_send(tag, body).unwrap()
    }

    fn try_send(&mut self, tag: u8, body: &[u8]) -> Result<Option<Effect>, Refusal> {
        let server = Server {
            prepared: &mut self.prepared,
            owed: &mut self.owed,
            output: &mut self.to_server,
        };
        let message = message(tag, body);
        self.translator
            .message(tag, &message, server, &mut self.to_client, 2)
    }

    /// The server answers `tag` with `body`, handled as the relay does.
    fn answer(&mut self, tag: u8, body: &[u8]) -> Received {
        let received = self.owed.received(tag, body).unwrap();
        if received == Received::Failed {
            for (undo, failed) in self.owed.undone() {
                self.translator.undo(undo, failed, &mut self.prepared);
            }
            self.prepared.unnamed = Unnamed::Unknown;
        }
        if received != Received::Drop {
            let whole = message(tag, body);
            let renamed = (tag == b'E').then(|| self.translator.rename_error(&whole));
            self.to_client
                .put_slice(&renamed.flatten().unwrap_or(whole));
        }
        while let Some(own) = self.owed.next_own() {
            self.to_client.put_slice(own);
        }
        received
    }

    /// The messages that went to the server since last asked: tag and body.
    fn server_got(&mut self) -> Vec<(u8, Bytes)> {
        split(&mut self.to_server)
    }

    /// The tags the client got since last asked.
    fn client_got(&mut self) -> String {
        split(&mut self.to_client)
            .iter()
            .map(|(tag, _)| char::from(*tag))
            .collect()
    }
}

fn split(buf: &mut BytesMut) -> Vec<(u8, Bytes)> {
    let mut all = Vec::new();
    while buf.len() >= 5 {
        let len = i32::from_be_bytes(buf[1..5].try_into().unwrap());
        let whole = buf.split_to(usize::try_from(len).unwrap() + 1).freeze();
        all.push((whole[0], whole.slice(5..)));
    }
    all
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat()
}

fn bind(statement: &str) -> Vec<u8> {
    [b"\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat()
}

fn named(kind: u8, name: &str) -> Vec<u8> {
    [&[kind], name.as_bytes(), b"\0"].concat()
}

/// The statement name at the start of a `Parse` or after the portal of a `Bind`.
fn name_in(tag: u8, body: &[u8]) -> String {
    let body = if tag == b'B' {
        &body[body.iter().position(|b| *b == 0).unwrap() + 1..]
    } else {
        body
    };
    let end = body.iter().position(|b| *b == 0).unwrap();
    String::from_utf8(body[..end].to_vec()).unwrap()
}

fn error(code: &str, text: &str) -> Bytes {
    let fields = pgentra_wire::ErrorFields(vec![
        (b'S', "ERROR".into()),
        (b'C', code.into()),
        (b'M', text.into()),
    ]);
    fields.to_error_response().slice(5..)
}

#[test]
fn a_clients_statement_is_prepared_under_a_name_of_the_proxys() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select $1"));
    conn.send(b'B', &bind("s1"));
    conn.send(b'S', b"");
    let sent = conn.server_got();
    let tags: String = sent.iter().map(|(t, _)| char::from(*t)).collect();
    assert_eq!(tags, "PBS");
    let server_name = name_in(b'P', &sent[0].1);
    assert!(server_name.starts_with("__pgentra_"), "{server_name}");
    assert_eq!(name_in(b'B', &sent[1].1), server_name);
    for tag in *b"12" {
        assert_eq!(conn.answer(tag, b""), Received::Pass);
    }
    conn.answer(b'Z', b"I");
    assert_eq!(conn.client_got(), "12Z");
    assert!(conn.owed.releasable());
}

#[test]
fn a_statement_the_connection_has_is_shared_and_answered_by_the_proxy() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("a", "select 1"));
    conn.answer(b'1', b"");
    conn.server_got();
    conn.client_got();
    // Another client parses the same text under its own name: nothing goes to the server.
    conn.translator = Translator::default();
    conn.send(b'P', &parse("b", "select 1"));
    assert!(conn.server_got().is_empty());
    assert_eq!(
        conn.client_got(),
        "1",
        "ParseComplete at once: nothing was owed"
    );
}

#[test]
fn a_close_is_answered_by_the_proxy_in_its_turn() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.send(b'C', &named(b'S', "s1"));
    conn.send(b'S', b"");
    assert_eq!(
        conn.server_got().len(),
        2,
        "the Parse and the Sync; no Close"
    );
    assert_eq!(
        conn.client_got(),
        "",
        "the CloseComplete waits for the ParseComplete"
    );
    conn.answer(b'1', b"");
    conn.answer(b'Z', b"I");
    assert_eq!(conn.client_got(), "13Z");
    // The statement stays prepared on the server for others.
    assert_eq!(conn.prepared.len(), 1);
}

#[test]
fn a_close_the_server_skipped_is_undone() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.answer(b'1', b"");
    conn.send(b'B', &bind("missing"));
    conn.send(b'C', &named(b'S', "s1"));
    conn.send(b'S', b"");
    assert_eq!(
        conn.answer(
            b'E',
            &error("26000", "prepared statement \"missing\" does not exist")
        ),
        Received::Failed
    );
    conn.answer(b'Z', b"I");
    assert_eq!(
        conn.client_got(),
        "1EZ",
        "no CloseComplete for a skipped Close"
    );
    // s1 still exists for the client: binding it sends no new Parse.
    conn.server_got();
    conn.send(b'B', &bind("s1"));
    assert_eq!(conn.server_got().len(), 1);
}

#[test]
fn a_skipped_eviction_leaves_the_statement_prepared() {
    let mut conn = Conn::default();
    for (name, sql) in [("a", "select 1"), ("b", "select 2")] {
        conn.send(b'P', &parse(name, sql));
        conn.answer(b'1', b"");
    }
    conn.server_got();
    // At the limit of two: a third statement evicts the least recently used ("a"), but an
    // error before it makes the server skip the eviction.
    conn.send(b'B', &bind("missing"));
    conn.send(b'P', &parse("c", "select 3"));
    conn.send(b'S', b"");
    let sent = conn.server_got();
    let tags: String = sent.iter().map(|(t, _)| char::from(*t)).collect();
    assert_eq!(tags, "BCPS", "Bind, the eviction's Close, the Parse, Sync");
    assert_eq!(
        conn.answer(b'E', &error("26000", "missing")),
        Received::Failed
    );
    conn.answer(b'Z', b"I");
    assert_eq!(conn.client_got(), "1".repeat(2) + "EZ");
    // "a" is still prepared on the server: binding it needs no Parse; "c" was never defined.
    conn.send(b'B', &bind("a"));
    assert_eq!(conn.server_got().len(), 1);
    assert!(conn.translator.statements.get(b"c").is_none());
}

#[test]
fn after_an_error_the_unnamed_statement_is_parsed_again() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("", "select $1::int"));
    conn.send(b'B', &bind(""));
    conn.send(b'S', b"");
    conn.answer(b'1', b"");
    conn.answer(b'E', &error("22P02", "invalid input syntax"));
    conn.answer(b'Z', b"I");
    assert_eq!(conn.prepared.unnamed, Unnamed::Unknown);
    conn.server_got();
    // The next Bind of the unnamed statement cannot count on the server's: the proxy parses
    // the client's again first.
    conn.send(b'B', &bind(""));
    let sent = conn.server_got();
    let tags: String = sent.iter().map(|(t, _)| char::from(*t)).collect();
    assert_eq!(tags, "PB");
    assert_eq!(name_in(b'P', &sent[0].1), "");
    assert_eq!(conn.answer(b'1', b""), Received::Drop);
}

#[test]
fn an_unnamed_statement_whose_parse_failed_is_gone() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("", "select nonsense from"));
    conn.send(b'S', b"");
    conn.answer(b'E', &error("42601", "syntax error"));
    conn.answer(b'Z', b"I");
    conn.server_got();
    // "PostgreSQL drops the old one first": the server must have none either.
    conn.send(b'B', &bind(""));
    let tags: String = conn
        .server_got()
        .iter()
        .map(|(t, _)| char::from(*t))
        .collect();
    assert_eq!(
        tags, "CB",
        "the proxy closes the server's unnamed statement first"
    );
}

#[test]
fn a_simple_query_destroys_the_unnamed_statement() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("", "select 1"));
    conn.answer(b'1', b"");
    conn.send(b'Q', b"select 2\0");
    assert_eq!(conn.prepared.unnamed, Unnamed::Empty);
    assert!(conn.translator.statements.unnamed.is_none());
}

#[test]
fn a_name_in_use_is_refused_in_the_clients_words() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.answer(b'1', b"");
    let server_name = name_in(b'P', &conn.server_got()[0].1);
    conn.client_got();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.send(b'S', b"");
    let text = format!("prepared statement \"{server_name}\" already exists");
    conn.answer(b'E', &error("42P05", &text));
    let got = split(&mut conn.to_client);
    let fields = pgentra_wire::ErrorFields::parse(&got[0].1).unwrap();
    assert_eq!(
        fields.get(b'M'),
        Some("prepared statement \"s1\" already exists")
    );
}

#[test]
fn the_proxys_names_are_not_the_clients_to_use() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.answer(b'1', b"");
    let server_name = name_in(b'P', &conn.server_got()[0].1);
    conn.client_got();
    // Another client guessing the name gets a statement that does not exist, named as it
    // named it.
    conn.translator = Translator::default();
    conn.send(b'B', &bind(&server_name));
    let sent = conn.server_got();
    assert_eq!(name_in(b'B', &sent[0].1), "__pgentra_not_prepared");
    conn.answer(
        b'E',
        &error(
            "26000",
            "prepared statement \"__pgentra_not_prepared\" does not exist",
        ),
    );
    let got = split(&mut conn.to_client);
    let fields = pgentra_wire::ErrorFields::parse(&got[0].1).unwrap();
    let expected = format!("prepared statement \"{server_name}\" does not exist");
    assert_eq!(fields.get(b'M'), Some(expected.as_str()));
}

#[test]
fn discard_all_forgets_every_statement() {
    let mut conn = Conn::default();
    conn.send(b'P', &parse("s1", "select 1"));
    conn.answer(b'1', b"");
    conn.translator.discarded(&mut conn.prepared);
    assert_eq!(conn.prepared.len(), 0);
    assert!(conn.translator.statements.get(b"s1").is_none());
}

#[test]
fn a_client_holds_a_bounded_number_of_statements() {
    let mut conn = Conn::default();
    for n in 0..MAX_CLIENT_STATEMENTS {
        conn.send(b'P', &parse(&format!("s{n}"), &format!("select {n}")));
        // Past two on the connection, each evicts one: a Close, then the Parse.
        for (tag, _) in conn.server_got() {
            conn.answer(if tag == b'C' { b'3' } else { b'1' }, b"");
        }
        conn.to_client.clear();
    }
    let refused = conn.try_send(b'P', &parse("one more", "select -1"));
    assert!(matches!(refused, Err(Refusal::TooManyStatements { .. })));
}

/// 300 statements of 512 KiB grew the proxy by 356 MiB: a client's statements are bounded in
/// bytes too, and a connection keeps at most its bound prepared, whatever its clients hold.
#[test]
fn a_client_holds_a_bounded_number_of_statement_bytes() {
    let mut conn = Conn::default();
    let padding = "x".repeat(512 * 1024);
    let fits = MAX_CLIENT_STATEMENT_BYTES / (padding.len() + 20);
    for n in 0..fits {
        conn.send(
            b'P',
            &parse(&format!("s{n}"), &format!("select {n} -- {padding}")),
        );
        for (tag, _) in conn.server_got() {
            conn.answer(if tag == b'C' { b'3' } else { b'1' }, b"");
        }
        conn.to_client.clear();
    }
    assert!(conn.translator.statements.bytes() <= MAX_CLIENT_STATEMENT_BYTES);
    let refused = conn.try_send(b'P', &parse("one more", &format!("select -1 -- {padding}")));
    assert!(matches!(refused, Err(Refusal::TooManyStatements { .. })));
    // A small one still fits, and a closed one makes room.
    conn.send(b'P', &parse("small", "select 0"));
    conn.send(b'C', b"Ss0\0");
    conn.send(b'P', &parse("again", &format!("select -1 -- {padding}")));
}

#[test]
fn statements_and_queries_that_leave_session_state_pin() {
    let mut conn = Conn::default();
    let pins = |reason| Some(Effect::pinning(reason));
    assert_eq!(conn.send(b'Q', b"set role evil\0"), pins(PinReason::Set));
    let settings = conn.send(b'Q', b"set search_path = app\0").unwrap();
    assert_eq!(settings.settings, ["search_path"]);
    assert_eq!(conn.send(b'Q', b"select 1\0"), None);
    assert_eq!(conn.send(b'F', b"\0\0\0\x01"), pins(PinReason::Other));
    conn.send(b'P', &parse("l", "LISTEN jobs"));
    assert_eq!(conn.send(b'B', &bind("l")), pins(PinReason::Listen));
    // A function the server defines runs when the statement does: opaque then.
    conn.send(b'P', &parse("f", "select app.f()"));
    assert!(conn.send(b'B', &bind("f")).unwrap().opaque);
}

#[test]
fn names_that_are_not_terminated_are_refused() {
    let mut conn = Conn::default();
    for (tag, body) in [
        (b'P', &b"no end"[..]),
        (b'B', b"\0no end"),
        (b'D', b"Sno end"),
        (b'C', b"S"),
    ] {
        let refused = conn.try_send(tag, body);
        assert!(
            matches!(refused, Err(Refusal::ClientProtocol(_))),
            "{}",
            char::from(tag)
        );
    }
}
