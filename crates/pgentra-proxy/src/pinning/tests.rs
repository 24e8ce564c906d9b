//! The pinning rules on statements that leave session state, and on ones that only look so.

use super::*;

/// Why `sql` pins, if it does.
fn pins(sql: &[u8]) -> Option<PinReason> {
    effect(sql).and_then(|effect| effect.pins)
}

#[test]
fn statements_that_leave_session_state_pin() {
    let pinning = [
        ("select set_config($1, '1', false)", PinReason::Set),
        (
            "do $$ begin perform set_config('work_mem', '9MB', false); end $$",
            PinReason::Set,
        ),
        ("select set_config('role', 'bob', false)", PinReason::Set),
        (
            "select set_config('Session_Authorization', 'bob', false)",
            PinReason::Set,
        ),
        ("select set_config('a' || 'b', '1', false)", PinReason::Set),
        ("LISTEN jobs", PinReason::Listen),
        ("SET ROLE reporting", PinReason::Set),
        ("set session authorization bob", PinReason::Set),
        ("reset session authorization", PinReason::Set),
        ("reset role", PinReason::Set),
        (
            "set session characteristics as transaction read only",
            PinReason::Set,
        ),
        ("set \"app\".\"tenant\" = 1", PinReason::Set),
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
        ("deallocate prepare p", PinReason::Prepare),
        (
            "do $$ begin perform pg_advisory_lock(7); end $$",
            PinReason::AdvisoryLock,
        ),
        (
            "do $$ begin execute 'listen '' || x'; end $$",
            PinReason::Listen,
        ),
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
        // What drops all the session has leaves nothing.
        "DISCARD ALL",
        "discard plans",
        "deallocate all",
        "DEALLOCATE PREPARE ALL",
        "unlisten *",
        "close all",
        "select * from pg_temporal",
        // Escapes in strings that are not run as SQL, and `&` after other words.
        "select E'a\\nb', 'C:\\dir'",
        "select u & 1, menu&'x'",
    ] {
        assert_eq!(pins(sql.as_bytes()), None, "{sql}");
    }
}

#[test]
fn code_the_proxy_cannot_read_is_opaque() {
    for sql in [
        "select app.set_tenant(7)",
        "SELECT set_tenant($1)",
        "select * from my_report(1)",
        "select 1 where x = f (2)",
        "select \"count\"(*) from t",
        "select \"public\".count(x) from t",
        "select public.lower('A')",
        "select query_to_xml('select 1', true, false, '')",
        "do $$ begin perform 1; end $$",
        "DO LANGUAGE plpgsql 'begin null; end'",
        "call archive_orders()",
        "select 1; select g(1)",
        "explain analyze select h()",
        "insert into t (a) values (f(1))",
        // Read without the tokenizer, unless a comment or a quoted name could mislead.
        "select count (1) + evil (2)",
        "select evil/**/(1)",
        "select evil -- count\n (1)",
        "select x.\"count\"(1)",
    ] {
        let effect = effect(sql.as_bytes()).unwrap_or_default();
        assert!(effect.opaque && effect.pins.is_none(), "{sql}: {effect:?}");
    }
}

#[test]
fn built_in_functions_and_clauses_are_not_opaque() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP)",
        "insert into \"users\" (\"id\", \"name\") values ($1, $2) returning (\"id\")",
        "select count(*), max(x), coalesce(y, 0), pg_catalog.lower(z) from t where a in (1, 2)",
        "select x from t where a = (select 1) and b = any ($1) and exists (select 1)",
        "select nextval('s'), now(), to_char(now(), 'YYYY')",
        "select row_number() over (partition by a order by b) from t",
        "update t set (a, b) = (1, 2) where id = 3",
        "create table t (id int references u (id), check (id > 0))",
        "CREATE TABLE IF NOT EXISTS \"t\" (\"id\" SERIAL , PRIMARY KEY (\"id\"))",
        "select cast(x as numeric(10, 2)) from t",
        "select 'f(1)' from t -- g(2)",
    ] {
        assert_eq!(effect(sql.as_bytes()), None, "{sql}");
    }
}

#[test]
fn known_names_are_sorted_lowercase_and_unique() {
    assert!(KNOWN.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(KNOWN.iter().all(|name| name.len() <= 32));
    assert!(
        KNOWN
            .iter()
            .all(|name| name.bytes().all(|b| !b.is_ascii_uppercase()))
    );
    assert!(
        SESSION_FUNCTIONS
            .iter()
            .all(|(name, _)| !KNOWN.contains(name))
    );
}

#[test]
fn session_settings_are_recorded_to_follow_their_client() {
    for (sql, settings) in [
        ("SET search_path = app", &["search_path"][..]),
        ("set session Work_Mem to '64MB'", &["work_mem"]),
        ("RESET ALL", &[RESET_ALL]),
        ("reset statement_timeout", &["statement_timeout"]),
        ("set schema 'app'", &["search_path"]),
        (
            "SET app.tenant = '7'; select 1; set x.y to default",
            &["app.tenant", "x.y"],
        ),
        ("do $b$ begin execute 'set x.z = 1'; end $b$", &["x.z"]),
        // A backslash ends nothing in a standard string, escapes in E'...': either way.
        ("select 'C:\\'; set search_path = evil", &["search_path"]),
        (
            "update f set p = replace(p, '\\', '/'); set search_path = x",
            &["search_path"],
        ),
        ("set extra_float_digits = 3", &["extra_float_digits"]),
        (
            "SET client_min_messages TO warning",
            &["client_min_messages"],
        ),
        (
            "select set_config('app.tenant', $1, false)",
            &["app.tenant"],
        ),
        (
            "select pg_catalog.\"set_config\"('a.b' , '1', false)",
            &["a.b"],
        ),
        ("select pg_catalog . set_config('A.B', '1', true)", &["a.b"]),
    ] {
        let effect = effect(sql.as_bytes()).unwrap_or_default();
        assert_eq!(effect.settings, settings, "{sql}");
        assert_eq!(effect.pins, None, "{sql}");
    }
    // Scoped to the transaction, or tracked: nothing to record.
    for sql in [
        "set local work_mem = '1MB'",
        "SET CONSTRAINTS ALL DEFERRED",
        "set transaction read only",
        "SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE",
        "set application_name = 'x'",
        "set names 'UTF8'",
    ] {
        assert_eq!(effect(sql.as_bytes()), None, "{sql}");
    }
}
