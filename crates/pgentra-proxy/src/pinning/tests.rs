//! The pinning rules on statements that leave session state, and on ones that only look so.

use super::*;

#[test]
fn statements_that_leave_session_state_pin() {
    let pinning = [
        ("SET search_path = app", PinReason::Set),
        ("set session work_mem to '64MB'", PinReason::Set),
        ("RESET ALL", PinReason::Set),
        ("select set_config('x.y', '1', false)", PinReason::Set),
        ("LISTEN jobs", PinReason::Listen),
        ("SET ROLE reporting", PinReason::Set),
        ("set session authorization bob", PinReason::Set),
        ("SELECT pg_advisory_lock(1)", PinReason::AdvisoryLock),
        (
            "select pg_catalog.pg_try_advisory_lock_shared(1, 2)",
            PinReason::AdvisoryLock,
        ),
        ("CREATE TEMP TABLE t (x int)", PinReason::Temporary),
        (
            "create global temporary table t (x int)",
            PinReason::Temporary,
        ),
        ("select 1 into temp t", PinReason::Temporary),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            PinReason::HoldCursor,
        ),
        ("PREPARE p AS SELECT 1", PinReason::Prepare),
        ("DEALLOCATE p", PinReason::Prepare),
        ("LOAD 'auto_explain'", PinReason::Other),
        ("DISCARD ALL", PinReason::Other),
        ("select 1; set x = 1", PinReason::Set),
        (
            "do $$ begin perform pg_advisory_lock(7); end $$",
            PinReason::AdvisoryLock,
        ),
        ("do $b$ begin execute 'set x = 1'; end $b$", PinReason::Set),
        (
            "do $$ begin execute 'listen '' || x'; end $$",
            PinReason::Listen,
        ),
        ("set session", PinReason::Set),
        ("create table pg_temp.t (x int)", PinReason::Temporary),
        ("select 1 into pg_temp.t", PinReason::Temporary),
        ("create table \"pg_temp\".t (x int)", PinReason::Temporary),
        ("create table pg_temp . t (x int)", PinReason::Temporary),
        ("create table pg_temp_3.t (x int)", PinReason::Temporary),
        (
            "explain analyze create temp table t as select 1",
            PinReason::Temporary,
        ),
        (
            "explain (analyze, buffers) select pg_advisory_lock(1)",
            PinReason::AdvisoryLock,
        ),
        ("select \"pg_advisory_lock\"(1)", PinReason::AdvisoryLock),
        (
            "select pg_catalog.\"set_config\"('a.b', '1', false)",
            PinReason::Set,
        ),
        (
            "select pg_catalog . set_config('a.b', '1', false)",
            PinReason::Set,
        ),
        // A backslash ends nothing in a standard string, escapes in E'...'.
        ("select 'C:\\'; set search_path = evil", PinReason::Set),
        (
            "update f set p = replace(p, '\\', '/'); set search_path = x",
            PinReason::Set,
        ),
        ("select e'it\\'s'; listen x", PinReason::Listen),
    ];
    for (sql, reason) in pinning {
        assert_eq!(pins(sql.as_bytes()), Some(reason), "{sql}");
    }
}

#[test]
fn escapes_that_could_spell_a_name_pin() {
    let pinning = [
        (
            "select U&\"\\0073et_config\"('role', 'low', false)",
            PinReason::Other,
        ),
        ("select u&\"\\0070g_advisory_lock\"(1)", PinReason::Other),
        (
            "create table U&\"pg\\005ftemp\".t (x int)",
            PinReason::Other,
        ),
        (
            "select U&\"!0073et_config\" UESCAPE '!'('a.b', '1', false)",
            PinReason::Other,
        ),
        (
            "do $$ begin execute E'\\163et role low'; end $$",
            PinReason::Other,
        ),
        (
            "do $$ begin execute U&'\\0073et role low'; end $$",
            PinReason::Other,
        ),
    ];
    for (sql, reason) in pinning {
        assert_eq!(pins(sql.as_bytes()), Some(reason), "{sql}");
    }
}

#[test]
fn transaction_state_words_in_strings_and_comments_do_not_pin() {
    for sql in [
        "SET LOCAL statement_timeout = '1s'",
        "SET application_name = 'billing'",
        "set session TimeZone to 'UTC'",
        "SET TIME ZONE 'Europe/Paris'",
        "set names 'UTF8'",
        "reset DateStyle",
        "set transaction isolation level serializable",
        "SELECT pg_advisory_xact_lock(1)",
        "select 'set x = 1', \"listen\" from t -- listen x\n",
        "/* prepare p as select 1 */ select 1",
        "/* nested /* set x */ listen */ select 1",
        "DECLARE c CURSOR FOR SELECT 1",
        "CREATE TABLE temp (x int)",
        "select e'it''s \\' set x = 1'",
        "insert into reset_log values (1)",
        "select offset_config(1)",
        "",
        "'unterminated",
        "$$ unterminated",
        "$1 + $2",
        "do $$ '",
        &"$a$".repeat(10_000),
        &";".repeat(100_000),
        "explain analyze select 1",
        "select temp from t",
        "select * from pg_temporal",
        // Escapes in strings that are not run as SQL, and `&` after other words.
        "select E'a\\nb', 'C:\\dir'",
        "select u & 1, menu&'x'",
    ] {
        assert_eq!(pins(sql.as_bytes()), None, "{sql}");
    }
}
