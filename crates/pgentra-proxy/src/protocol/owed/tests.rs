//! The tracker replayed on message transcripts: what the client sent, what the server
//! answered, and what the relay does with each answer. No server, no sockets.

use super::*;
use Received::{Drop, Failed, Pass, Ready};

/// A tracker whose undos are labels.
fn owed() -> Owed<&'static str> {
    Owed::default()
}

/// The server's answers `tags` (a `ReadyForQuery` idle for `Z`), and what the relay does.
fn answers(owed: &mut Owed<&'static str>, tags: &str) -> Vec<Received> {
    tags.bytes()
        .map(|tag| {
            let body: &[u8] = if tag == b'Z' { b"I" } else { b"" };
            owed.received(tag, body)
                .unwrap_or_else(|e| panic!("{tags}: {e}"))
        })
        .collect()
}

/// The client's extended-query batch `Parse, Bind, Execute, Sync` (the client's own Parse).
fn batch(owed: &mut Owed<&'static str>, undo: &'static str) {
    owed.extended(Expect::Parse { pass: true, undo });
    owed.extended(Expect::Bind);
    owed.extended(Expect::Execute);
    owed.sync();
}

#[test]
fn a_simple_query_is_owed_everything_up_to_ready_for_query() {
    let mut owed = owed();
    owed.query("q");
    assert!(!owed.releasable());
    assert_eq!(answers(&mut owed, "TDDC"), [Pass; 4]);
    assert!(!owed.releasable());
    assert_eq!(answers(&mut owed, "Z"), [Ready(b'I')]);
    assert!(owed.releasable());
}

#[test]
fn a_query_with_several_statements_and_an_error_ends_at_its_ready_for_query() {
    let mut owed = owed();
    owed.query("q");
    assert_eq!(answers(&mut owed, "TDCCE"), [Pass; 5]);
    assert_eq!(owed.received(b'Z', b"I"), Ok(Ready(b'I')));
    assert!(owed.releasable());
    assert_eq!(owed.undone().count(), 0);
}

#[test]
fn a_transaction_block_holds_the_connection_until_it_ends() {
    let mut owed = owed();
    owed.query("begin");
    assert_eq!(owed.received(b'C', b""), Ok(Pass));
    assert_eq!(owed.received(b'Z', b"T"), Ok(Ready(b'T')));
    assert!(!owed.releasable());
    assert!(
        owed.settled(),
        "idle in a transaction: settled, not releasable"
    );
    owed.query("select");
    answers(&mut owed, "TDC");
    assert_eq!(owed.received(b'Z', b"E"), Ok(Ready(b'E')));
    assert!(!owed.releasable());
    owed.query("rollback");
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn an_extended_batch_is_owed_each_answer_and_released_at_its_sync() {
    let mut owed = owed();
    batch(&mut owed, "p");
    assert_eq!(answers(&mut owed, "12DDC"), [Pass; 5]);
    assert!(!owed.releasable());
    assert_eq!(answers(&mut owed, "Z"), [Ready(b'I')]);
    assert!(owed.releasable());
}

#[test]
fn pipelined_batches_are_answered_in_order() {
    let mut owed = owed();
    batch(&mut owed, "first");
    batch(&mut owed, "second");
    owed.query("third");
    assert_eq!(owed.len(), 9);
    answers(&mut owed, "12CZ");
    assert!(!owed.releasable(), "two batches still owed");
    answers(&mut owed, "12CZ");
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn a_batch_ended_by_flush_keeps_its_connection_until_its_sync() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "p",
    });
    owed.extended(Expect::DescribeStatement { parameters: false });
    // Flush: nothing is owed for it, and the answers come.
    assert_eq!(answers(&mut owed, "1tT"), [Pass; 3]);
    assert!(owed.is_empty());
    assert!(
        !owed.releasable(),
        "the implicit transaction is open until Sync"
    );
    assert!(!owed.settled());
    assert!(!owed.sync(), "nothing was owed ahead of the Sync");
    answers(&mut owed, "Z");
    assert!(owed.releasable());
}

#[test]
fn a_simple_query_after_a_flushed_batch_ends_its_implicit_transaction() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "p",
    });
    answers(&mut owed, "1");
    owed.query("q");
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn an_error_mid_batch_undoes_what_the_server_skipped_latest_first() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "parse a",
    });
    owed.extended(Expect::Bind);
    owed.extended(Expect::Close {
        pass: true,
        undo: "close b",
    });
    owed.extended(Expect::Parse {
        pass: false,
        undo: "proxy parse c",
    });
    owed.extended(Expect::Execute);
    assert!(owed.sync(), "answers are owed ahead of the Sync");
    batch(&mut owed, "next batch");
    assert_eq!(answers(&mut owed, "1"), [Pass]);
    // The Bind fails: the Close and the Parse after it never run.
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    let undone: Vec<_> = owed.undone().collect();
    assert_eq!(
        undone,
        [("proxy parse c", false), ("close b", false)],
        "latest first; the failed Bind has nothing to undo"
    );
    assert!(!owed.skipping(), "the Sync was already sent");
    assert_eq!(answers(&mut owed, "Z"), [Ready(b'I')]);
    // The batch after the Sync is answered as usual.
    answers(&mut owed, "12CZ");
    assert!(owed.releasable());
}

#[test]
fn the_failed_message_is_undone_last() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "parse s1",
    });
    owed.extended(Expect::Parse {
        pass: false,
        undo: "prepare s2",
    });
    owed.sync();
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    let undone: Vec<_> = owed.undone().collect();
    assert_eq!(undone, [("prepare s2", false), ("parse s1", true)]);
}

#[test]
fn after_an_error_with_no_sync_sent_the_clients_messages_are_skipped_until_its_sync() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "p",
    });
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    assert!(owed.skipping());
    assert!(!owed.settled());
    // What the client sends meanwhile (a Bind, even a simple Query) goes to the server as it
    // is, owed nothing: the server discards it.
    assert!(owed.is_empty());
    owed.sync();
    assert!(!owed.skipping());
    answers(&mut owed, "Z");
    assert!(owed.releasable());
}

#[test]
fn a_simple_query_error_skips_nothing() {
    let mut owed = owed();
    owed.query("bad");
    owed.query("good");
    assert_eq!(owed.received(b'E', b""), Ok(Pass));
    answers(&mut owed, "Z");
    assert_eq!(owed.len(), 1, "the next query is still owed");
    answers(&mut owed, "TDCZ");
    assert!(owed.releasable());
}

#[test]
fn an_error_after_a_query_sent_without_a_sync_drops_the_querys_answers() {
    // Bind and Execute, then a simple Query with no Sync between: after the error the server
    // discards the Query too, up to the Sync (PgDog's #1314).
    let mut owed = owed();
    owed.extended(Expect::Bind);
    owed.extended(Expect::Execute);
    owed.query("discarded");
    owed.sync();
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    assert_eq!(owed.undone().collect::<Vec<_>>(), [("discarded", false)]);
    assert_eq!(owed.len(), 1);
    answers(&mut owed, "Z");
    assert!(owed.releasable());
}

#[test]
fn the_proxys_own_answers_wait_for_their_turn() {
    let mut owed = owed();
    static PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
    // Nothing owed: the answer goes at once.
    assert_eq!(owed.own(PARSE_COMPLETE, "own"), Some(PARSE_COMPLETE));
    owed.extended(Expect::Bind);
    assert_eq!(owed.own(PARSE_COMPLETE, "own"), None);
    owed.extended(Expect::Execute);
    assert_eq!(owed.next_own(), None, "not its turn yet");
    answers(&mut owed, "2");
    assert_eq!(owed.next_own(), Some(PARSE_COMPLETE));
    assert_eq!(owed.next_own(), None);
    answers(&mut owed, "C");
    owed.sync();
    answers(&mut owed, "Z");
    assert!(owed.releasable());
}

#[test]
fn the_proxys_own_requests_are_answered_and_dropped() {
    let mut owed = owed();
    // The proxy prepares a statement and closes an evicted one before the client's Bind.
    owed.extended(Expect::Close {
        pass: false,
        undo: "evicted",
    });
    owed.extended(Expect::Parse {
        pass: false,
        undo: "prepared",
    });
    owed.extended(Expect::Bind);
    assert_eq!(answers(&mut owed, "312"), [Drop, Drop, Pass]);
}

#[test]
fn a_skipped_eviction_is_undone() {
    let mut owed = owed();
    owed.extended(Expect::Parse {
        pass: true,
        undo: "client parse",
    });
    owed.extended(Expect::Close {
        pass: false,
        undo: "restore evicted",
    });
    owed.extended(Expect::Parse {
        pass: false,
        undo: "forget prepared",
    });
    owed.extended(Expect::Bind);
    owed.sync();
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    let undone: Vec<_> = owed.undone().collect();
    assert_eq!(
        undone,
        [
            ("forget prepared", false),
            ("restore evicted", false),
            ("client parse", true)
        ]
    );
}

#[test]
fn describe_statement_owes_parameters_then_rows_or_no_data() {
    let mut owed = owed();
    owed.extended(Expect::DescribeStatement { parameters: false });
    owed.extended(Expect::DescribeStatement { parameters: false });
    owed.extended(Expect::DescribePortal);
    owed.sync();
    assert_eq!(
        answers(&mut owed, "tTtnnZ"),
        [Pass, Pass, Pass, Pass, Pass, Ready(b'I')]
    );
    assert!(owed.releasable());
    let mut owed = self::owed();
    owed.extended(Expect::DescribeStatement { parameters: false });
    assert_eq!(owed.received(b'T', b""), Err(OutOfTurn(b'T')));
}

#[test]
fn a_portal_suspended_or_an_empty_query_ends_an_execute() {
    let mut owed = owed();
    owed.extended(Expect::Execute);
    owed.extended(Expect::Execute);
    owed.sync();
    assert_eq!(
        answers(&mut owed, "DDsIZ"),
        [Pass, Pass, Pass, Pass, Ready(b'I')]
    );
}

#[test]
fn copy_in_through_a_simple_query() {
    let mut owed = owed();
    owed.query("copy t from stdin");
    answers(&mut owed, "G");
    assert!(owed.copy_in());
    assert!(!owed.settled());
    // CopyData passes through; CopyDone ends the copy.
    owed.copy_end();
    assert!(!owed.copy_in());
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn syncs_sent_ahead_of_a_copy_are_owed_nothing() {
    // The extended protocol's COPY: Bind, Execute, Sync, then the data, CopyDone and a Sync,
    // all sent before the server answered. The server ignores the first Sync (copy-in mode).
    let mut owed = owed();
    owed.extended(Expect::Bind);
    owed.extended(Expect::Execute);
    owed.sync();
    owed.copy_end();
    owed.sync();
    answers(&mut owed, "2G");
    assert!(!owed.copy_in(), "the copy end was already sent");
    assert_eq!(owed.len(), 2, "the Execute and the last Sync");
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn syncs_in_copy_in_mode_are_ignored() {
    let mut owed = owed();
    owed.extended(Expect::Execute);
    owed.sync();
    answers(&mut owed, "G");
    assert!(owed.copy_in());
    assert!(!owed.sync(), "ignored by the server in copy-in mode");
    assert_eq!(owed.len(), 1);
    owed.copy_end();
    owed.sync();
    answers(&mut owed, "CZ");
    assert!(owed.releasable());
}

#[test]
fn a_failed_copy_ends_copy_in_mode() {
    let mut owed = owed();
    owed.query("copy t from stdin");
    answers(&mut owed, "G");
    owed.copy_end();
    assert_eq!(owed.received(b'E', b""), Ok(Pass));
    assert_eq!(owed.received(b'Z', b"T"), Ok(Ready(b'T')));
    assert!(owed.settled());
    assert!(!owed.releasable());
}

#[test]
fn an_error_during_an_extended_copy_skips_to_the_sync() {
    let mut owed = owed();
    owed.extended(Expect::Bind);
    owed.extended(Expect::Execute);
    answers(&mut owed, "2G");
    assert!(owed.copy_in());
    // The server fails the COPY (a bad row) while the client is still sending.
    assert_eq!(owed.received(b'E', b""), Ok(Failed));
    assert!(!owed.copy_in());
    assert!(owed.skipping(), "until the client's Sync");
    owed.copy_end();
    assert!(
        owed.is_empty(),
        "a copy end with nothing owed is owed nothing"
    );
    owed.sync();
    answers(&mut owed, "Z");
    assert!(owed.releasable());
}

#[test]
fn a_copy_end_with_nothing_owed_waits_for_nothing() {
    let mut owed = owed();
    owed.copy_end();
    assert!(owed.releasable());
    owed.query("q");
    owed.copy_end();
    answers(&mut owed, "CZ");
    assert_eq!(owed.next_own(), None);
    assert!(owed.releasable(), "a stale copy end is dropped");
}

#[test]
fn copy_out_passes_rows() {
    let mut owed = owed();
    owed.query("copy t to stdout");
    assert_eq!(answers(&mut owed, "HdddcCZ").len(), 7);
    assert!(owed.releasable());
}

#[test]
fn notices_parameters_and_notifications_come_at_any_time() {
    let mut owed = owed();
    assert_eq!(answers(&mut owed, "SNA"), [Pass; 3]);
    assert!(owed.releasable());
    owed.query("q");
    assert_eq!(answers(&mut owed, "NSCAZ").len(), 5);
    assert!(owed.releasable());
}

#[test]
fn answers_to_nothing_asked_are_out_of_turn() {
    let mut owed = owed();
    for tag in *b"Z12CDTGt" {
        assert_eq!(
            owed.received(tag, b"I"),
            Err(OutOfTurn(tag)),
            "{}",
            char::from(tag)
        );
    }
    owed.extended(Expect::Bind);
    assert_eq!(owed.received(b'1', b""), Err(OutOfTurn(b'1')));
    assert_eq!(owed.received(b'Z', b"I"), Err(OutOfTurn(b'Z')));
}

#[test]
fn a_function_call_is_owed_its_result_and_ready_for_query() {
    let mut owed = owed();
    owed.query("fastpath");
    assert_eq!(answers(&mut owed, "VZ"), [Pass, Ready(b'I')]);
    assert!(owed.releasable());
}

#[test]
fn a_fatal_error_with_nothing_owed_is_passed_on() {
    // An administrator's pg_terminate_backend while the client holds the connection.
    let mut owed = owed();
    assert_eq!(owed.received(b'E', b""), Ok(Pass));
}
