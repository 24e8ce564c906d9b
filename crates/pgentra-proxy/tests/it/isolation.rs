//! Isolation between the clients of a transaction pool, against state the proxy cannot read in
//! a statement's text: what functions defined on the server, `DO` blocks and SQL built at run
//! time leave on a connection never reaches the next client of it, and a client cannot replace
//! or drop another's prepared statements.

use super::support::*;

/// A proxy in transaction mode with one server connection, and a role the proxy's role may take
/// and a function `run_<role>(sql)` that runs the SQL it is given (both created by the
/// superuser).
async fn one_connection(emulator: &Emulator) -> (Running, String) {
    let cluster = emulator.cluster().expect("the emulator's own cluster");
    let role = format!("proxy_low_role_{:08x}", fastrand::u32(..));
    cluster
        .psql(&format!(
            "create role {role}; grant {role} to \"{USER}\";
             create function public.run_{role}(sql text) returns void
               language plpgsql as $$ begin execute sql; end $$;"
        ))
        .unwrap();
    let (proxy, _) = transactional(emulator, 1).await;
    (proxy, role)
}

/// What state a statement leaves behind, unseen in its text: the statement, a query true where
/// the state is absent, and the pin reason counted (`None`: the connection's settings are reset
/// instead, and the client is not pinned).
fn unseen_state(role: &str) -> [(String, &'static str, Option<&'static str>); 8] {
    [
        (
            format!("select run_{role}('set role {role}')"),
            "select current_user = session_user",
            Some("set"),
        ),
        (
            format!("do $$ begin execute 'se' || 't role {role}'; end $$"),
            "select current_user = session_user",
            Some("set"),
        ),
        (
            format!("select run_{role}('select pg_advisory_lock(4245)')"),
            "select count(*) = 0 from pg_locks where locktype = 'advisory' and objid = 4245",
            Some("advisory_lock"),
        ),
        (
            format!("select run_{role}('listen fn_channel')"),
            "select count(*) = 0 from pg_listening_channels()",
            Some("listen"),
        ),
        (
            format!("select run_{role}('create temp table fn_table (x int)')"),
            "select to_regclass('pg_temp.fn_table') is null",
            Some("temporary"),
        ),
        (
            format!(
                "select run_{role}('select set_config(''search_path'', ''pg_catalog'', false)')"
            ),
            "select current_setting('search_path') <> 'pg_catalog'",
            None,
        ),
        (
            format!("select run_{role}('select set_config(''app.tenant'', ''7'', false)')"),
            "select coalesce(current_setting('app.tenant', true), '') <> '7'",
            None,
        ),
        (
            "do $$ begin execute 'select set_' || 'config(''app.tenant'', ''8'', false)'; end $$"
                .into(),
            "select coalesce(current_setting('app.tenant', true), '') <> '8'",
            None,
        ),
    ]
}

/// Each kind of state a function, a `DO` block or run-time SQL leaves: a client that keeps it
/// (a role, a lock, a listen, a temporary table) is pinned, and the next client waits for the
/// connection's reset; settings are reset at once, and the next client of the same connection
/// finds the defaults. Before the check, each reached the next client.
#[tokio::test(flavor = "multi_thread")]
async fn state_left_by_code_the_proxy_cannot_read_never_reaches_the_next_client() {
    let emulator = Emulator::shared();
    let (proxy, role) = one_connection(emulator).await;
    for (leave, absent, pinned) in unseen_state(&role) {
        let mut a = logged_in(&proxy).await;
        let mut b = logged_in(&proxy).await;
        let pid = raw_value(&mut a, "select pg_backend_pid()").await;
        raw_query(&mut a, &leave)
            .await
            .unwrap_or_else(|e| panic!("{leave}: {e:?}"));
        let pool = pool_until(&proxy, "a released or pinned", |p| {
            p["server_active"] == 0 || p["clients_pinned"] == 1
        })
        .await;
        match pinned {
            Some(reason) => {
                assert_eq!(pool["clients_pinned"], 1, "{leave}: {pool}");
                assert!(pool["pins"][reason].as_u64() >= Some(1), "{leave}: {pool}");
                b.write_all(&message(b'Q', format!("{absent}\0").as_bytes()))
                    .await
                    .unwrap();
                pool_until(&proxy, "b waiting", |p| p["clients_waiting"] == 1).await;
                drop(a);
                let rows = read_until_ready(&mut b).await;
                let row = rows.iter().find(|(tag, _)| *tag == b'D').expect("a row");
                assert_eq!(
                    data_row(&row.1)[0].as_deref(),
                    Some("t"),
                    "{leave}: b found a's state"
                );
            }
            None => {
                assert_eq!(pool["clients_pinned"], 0, "{leave}: {pool}");
                assert_eq!(
                    raw_value(&mut b, absent).await,
                    "t",
                    "{leave}: b found a's setting"
                );
                drop(a);
            }
        }
        assert_eq!(raw_value(&mut b, "select pg_backend_pid()").await, pid);
        drop(b);
        pool_until(&proxy, "nobody left", |p| {
            p["clients"] == 0 && p["clients_pinned"] == 0
        })
        .await;
    }
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["server_logins"], 1, "{pool}");
    assert!(pool["state_checks"].as_u64() >= Some(8), "{pool}");
    proxy.stop().await;
}

/// One client's `DO` block drops a statement another client prepared (its name is in
/// `pg_prepared_statements`) and prepares its own under that name: the attacker is pinned, and
/// the victim's statement runs its own text once it gets the connection (before, it returned
/// the attacker's row). A run-time `DEALLOCATE ALL` does not leave the victim with 26000: its
/// statement is prepared again.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_replace_or_drop_another_clients_prepared_statement() {
    let emulator = Emulator::shared();
    let (proxy, _) = one_connection(emulator).await;
    let victim = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let mine = victim.prepare("select 'victim'::text").await.unwrap();
    let value = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, String>(0);
    assert_eq!(value(victim.query(&mine, &[]).await.unwrap()), "victim");
    let mut attacker = logged_in(&proxy).await;
    let name = raw_value(&mut attacker, "select name from pg_prepared_statements").await;
    assert!(name.starts_with("__pgentra_"), "{name}");
    raw_query(
        &mut attacker,
        &format!(
            "do $$ begin execute 'dealloc' || 'ate {name}'; \
             execute 'prep' || 'are {name} as select ''attacker''::text'; end $$"
        ),
    )
    .await
    .unwrap();
    let pool = pool_until(&proxy, "the attacker pinned", |p| p["clients_pinned"] == 1).await;
    assert!(pool["pins"]["prepare"].as_u64() >= Some(1), "{pool}");
    let run = tokio::spawn(async move {
        let rows = victim.query(&mine, &[]).await;
        (victim, mine, rows)
    });
    pool_until(&proxy, "the victim waiting", |p| p["clients_waiting"] == 1).await;
    drop(attacker);
    let (victim, mine, rows) = run.await.unwrap();
    assert_eq!(value(rows.unwrap()), "victim");

    let mut attacker = logged_in(&proxy).await;
    raw_query(
        &mut attacker,
        "do $$ begin execute 'dealloc' || 'ate all'; end $$",
    )
    .await
    .unwrap();
    let pool = pool_until(&proxy, "the attacker released", |p| p["server_active"] == 0).await;
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    assert_eq!(value(victim.query(&mine, &[]).await.unwrap()), "victim");
    drop((attacker, victim));
    proxy.stop().await;
}

/// The values of the settings the replay tests set, as one row.
const SHOW: &str = "select current_setting('search_path') || '|' || \
    current_setting('statement_timeout') || '|' || current_setting('extra_float_digits') || '|' || \
    current_setting('TimeZone') || '|' || coalesce(current_setting('app.tenant', true), '')";

/// Session settings follow their client instead of pinning it: client A sets `search_path`,
/// `statement_timeout`, `extra_float_digits`, `TimeZone` and a custom `app.tenant`; client B on
/// the same (only) server connection sees the defaults before, between and after A's
/// transactions, and A sees its own. A `SET` in a rolled-back transaction, in a failed one, or
/// behind a savepoint rolled back, and a `SET LOCAL`, are not replayed; one in a committed
/// transaction is; `RESET ALL` returns A to the defaults. Nobody is pinned.
#[tokio::test(flavor = "multi_thread")]
async fn settings_follow_their_client_and_never_reach_another() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    let defaults = raw_value(&mut b, SHOW).await;
    let pid = raw_value(&mut b, "select pg_backend_pid()").await;
    raw_query(
        &mut a,
        "set search_path = a_schema, public; set statement_timeout = '4s'; \
         set extra_float_digits = 2; set time zone 'Asia/Tokyo'; set app.tenant = 'a'",
    )
    .await
    .unwrap();
    let mine = "a_schema, public|4s|2|Asia/Tokyo|a";
    for _ in 0..2 {
        assert_eq!(
            raw_value(&mut b, SHOW).await,
            defaults,
            "b got a's settings"
        );
        assert_eq!(raw_value(&mut a, SHOW).await, mine);
    }
    assert_eq!(raw_value(&mut a, "select pg_backend_pid()").await, pid);
    for (transaction, timeout) in [
        ("begin; set statement_timeout = '9s'; rollback", "4s"),
        // The error leaves the transaction failed: the COMMIT that ends it rolls back.
        ("begin; set statement_timeout = '8s'; select 1/0", "4s"),
        ("begin; set local statement_timeout = '7s'; commit", "4s"),
        (
            "begin; savepoint s; set statement_timeout = '6s'; rollback to s; commit",
            "4s",
        ),
        ("begin; set statement_timeout = '5s'; commit", "5s"),
    ] {
        if raw_query(&mut a, transaction).await.is_err() {
            raw_query(&mut a, "commit").await.unwrap();
        }
        assert_eq!(raw_value(&mut b, SHOW).await, defaults, "{transaction}");
        let shown = raw_value(&mut a, "show statement_timeout").await;
        assert_eq!(shown, timeout, "{transaction}");
    }
    raw_query(&mut a, "reset all").await.unwrap();
    assert_eq!(
        raw_value(&mut b, "set app.tenant = 'b'; show app.tenant").await,
        "b"
    );
    let reset = raw_value(&mut a, SHOW).await;
    assert_eq!(
        reset,
        defaults.replace("||", "|").trim_end_matches('|').to_owned() + "|"
    );
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    assert_eq!(pool["server_logins"], 1, "{pool}");
    // a's settings were set again each time it got the connection after b.
    assert!(pool["replays"].as_u64() >= Some(2), "{pool}");
    drop((a, b));
    proxy.stop().await;
}

/// A client's settings are set on every server connection it moves to — also when it set them
/// through the extended protocol, as pgjdbc does, or with `set_config` and a parameter, as
/// row-level security's tenants often are — and a connection keeps the last client's values
/// only until another client takes it.
#[tokio::test(flavor = "multi_thread")]
async fn settings_follow_their_client_across_server_connections() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let a = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    a.execute("set extra_float_digits = 3", &[]).await.unwrap();
    // The multi-tenant pattern of row-level security: the tenant as a parameter.
    let tenant = "select set_config('app.tenant', $1, false)";
    a.query_one(tenant, &[&"a"]).await.unwrap();
    // Prepared once: a statement dropped would send a Close, which takes a connection.
    let show = a
        .prepare(
            "select pg_backend_pid()::text, current_setting('extra_float_digits') || '|' || \
             current_setting('app.tenant', true)",
        )
        .await
        .unwrap();
    let mut pids = std::collections::HashSet::new();
    for _ in 0..3 {
        // b holds whichever connection a just had, so a moves to the other one.
        let mut b = logged_in(&proxy).await;
        let row = a.query_one(&show, &[]).await.unwrap();
        let (held, values): (String, String) = (row.get(0), row.get(1));
        assert_eq!(values, "3|a");
        pids.insert(held.clone());
        raw_query(&mut b, "begin").await.unwrap();
        assert_eq!(raw_value(&mut b, "select pg_backend_pid()").await, held);
        let row = a.query_one(&show, &[]).await.unwrap();
        let (pid, values): (String, String) = (row.get(0), row.get(1));
        assert_ne!(pid, held, "a did not move");
        assert_eq!(values, "3|a");
        pids.insert(pid);
        assert_eq!(
            raw_value(&mut b, "select current_setting('extra_float_digits')").await,
            "1",
            "b found a's setting"
        );
        raw_query(&mut b, "commit").await.unwrap();
    }
    assert_eq!(pids.len(), 2);
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    drop(a);
    proxy.stop().await;
}

/// As Npgsql does on every reopen: each of twenty clients on two server connections sends
/// `DISCARD ALL` between its transactions. None is pinned; its own settings and prepared
/// statements are gone (its statement's name gives 26000, as on PostgreSQL), and the other
/// clients' prepared statements, which `DISCARD ALL` dropped on the server, keep working.
#[tokio::test(flavor = "multi_thread")]
async fn discard_all_resets_only_its_own_client_without_pinning() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let clients = (0..20).map(|n| {
        let addr = proxy.addr();
        tokio::spawn(async move {
            let client = connect(addr, USER, |_| {}).await.unwrap();
            for round in 0..3 {
                let plus = client.prepare("select $1::int + 1").await.unwrap();
                client
                    .batch_execute(&format!("set app.tenant = 'client {n}'"))
                    .await
                    .unwrap();
                for i in 0..5 {
                    let row = client.query_one(&plus, &[&i]).await.unwrap();
                    assert_eq!(row.get::<_, i32>(0), i + 1, "client {n}, round {round}");
                }
                let tenant = "select coalesce(current_setting('app.tenant', true), '')";
                let row = client.query_one(tenant, &[]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), format!("client {n}"));
                client.batch_execute("DISCARD ALL").await.unwrap();
                let row = client.query_one(tenant, &[]).await.unwrap();
                assert_eq!(row.get::<_, String>(0), "", "client {n} kept its setting");
                let gone = client.query_one(&plus, &[&1]).await.unwrap_err();
                assert_eq!(
                    db_error(&gone).code(),
                    &SqlState::INVALID_SQL_STATEMENT_NAME
                );
            }
        })
    });
    for client in clients.collect::<Vec<_>>() {
        client.await.unwrap();
    }
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pins_total(&pool), 0, "{pool}");
    assert!(pool["server_logins"].as_u64() <= Some(2), "{pool}");
    proxy.stop().await;
}

/// A client that sets a setting, or runs code the proxy cannot read, and says goodbye in the
/// same write leaves before its settings are read back or its connection checked: the
/// connection is reset before the next client gets it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_right_after_a_set_leaves_nothing_behind() {
    let emulator = Emulator::shared();
    let (proxy, role) = one_connection(emulator).await;
    for leave in [
        "set app.tenant = 'leaver'".to_owned(),
        format!("select run_{role}('select set_config(''app.tenant'', ''leaver'', false)')"),
    ] {
        let mut a = logged_in(&proxy).await;
        let query = message(b'Q', format!("{leave}\0").as_bytes());
        a.write_all(&[&query[..], &message(b'X', b"")].concat())
            .await
            .unwrap();
        read_until_closed(&mut a, SHORT).await;
        let mut b = logged_in(&proxy).await;
        let tenant = "select coalesce(current_setting('app.tenant', true), '')";
        assert_eq!(
            raw_value(&mut b, tenant).await,
            "",
            "{leave}: b got a's setting"
        );
    }
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert!(pool["resets"].as_u64() >= Some(2), "{pool}");
    proxy.stop().await;
}

/// What a view runs is not in the statement's text: with `--state-check always` the connection
/// is checked after every transaction, so a setting a view made is reset before the next
/// client of the connection runs anything.
#[tokio::test(flavor = "multi_thread")]
async fn checking_always_catches_what_a_view_runs() {
    let emulator = Emulator::shared();
    let cluster = emulator.cluster().expect("the emulator's own cluster");
    let view = format!("tenant_view_{:08x}", fastrand::u32(..));
    cluster
        .psql(&format!(
            "create view public.{view} as select set_config('app.tenant', 'view', false) as t;
             grant select on public.{view} to public;"
        ))
        .unwrap();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.size = 1;
        config.pool.state_check = StateCheck::Always;
    })
    .await;
    let mut a = logged_in(&proxy).await;
    assert_eq!(
        raw_value(&mut a, &format!("select t from {view}")).await,
        "view"
    );
    let mut b = logged_in(&proxy).await;
    let tenant = "select coalesce(current_setting('app.tenant', true), '')";
    assert_eq!(
        raw_value(&mut b, tenant).await,
        "",
        "b got the view's setting"
    );
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    assert!(pool["state_checks"].as_u64() >= Some(2), "{pool}");
    drop((a, b));
    proxy.stop().await;
}
