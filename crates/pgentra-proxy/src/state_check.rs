//! The session state of a server connection, checked on the server after a transaction that
//! ran code the proxy cannot read ([`Effect::Opaque`](crate::pinning::Effect::Opaque): a
//! function defined on the server, a `DO` block, a procedure), before another client can get
//! the connection.
//!
//! Such code may leave state the statement's text does not show — `set_config(…, false)`,
//! `SET ROLE` or `PREPARE` run as SQL built at run time, a session advisory lock, `LISTEN`, a
//! temporary table, a cursor `WITH HOLD` — and the next client of the connection would run
//! under it. One query reads what the server can tell of it: the state a client keeps pins it
//! to the connection, as if the proxy had read it in the text. Settings are the exception:
//! PostgreSQL shows no cheap list of those changed in the session (`pg_settings` takes about
//! 0.7 ms, and does not list custom ones such as `app.tenant`), so the connection's settings
//! are reset (`RESET ALL`) and the client's tracked values set again. A proxy statement that
//! SQL deallocated is prepared again when next needed.

use crate::connector::OWN_QUERY_TIMEOUT;
use crate::pinning::PinReason;
use crate::protocol::messages::{bind, own_message as own};
use crate::server::{QueryError, ServerConn, columns};
use crate::settings::Settings;
use crate::tracked::Tracked;
use bytes::BytesMut;
use pgentra_wire::ErrorFields;
use postgres_protocol::message::frontend;

/// The check, prepared once on each connection (as `CHECK_NAME`): each name qualified with the
/// catalog's schema (operators too), so that no object a client created in another schema on
/// the search path can stand in for the catalog's; the catalog's functions rather than its
/// views, as they cost less to run. Columns: another role, a listen, a session advisory lock, a
/// temporary relation, a cursor `WITH HOLD`.
const CHECK: &str = "SELECT current_user OPERATOR(pg_catalog.<>) session_user, \
    EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), \
    EXISTS (SELECT FROM pg_catalog.pg_lock_status() l \
      WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' \
      AND l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()), \
    pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 \
      AND EXISTS (SELECT FROM pg_catalog.pg_class c \
      WHERE c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()), \
    EXISTS (SELECT FROM pg_catalog.pg_cursor() c WHERE c.is_holdable)";

const CHECK_NAME: &str = "__pgentra_state_check";

/// What each of the check's columns, when true, pins.
const PINS: [PinReason; 5] = [
    PinReason::Set,
    PinReason::Listen,
    PinReason::AdvisoryLock,
    PinReason::Temporary,
    PinReason::HoldCursor,
];

/// Run as a simple query (which SQL cannot replace) after the check: the statements prepared
/// with SQL, and those prepared with the protocol (the proxy's, the check included). SQL that
/// replaced the check (`DEALLOCATE` and `PREPARE` of its name, which every client of the
/// connection can read in `pg_prepared_statements`) could make it answer anything, but would
/// show here.
const STATEMENTS: &str = "SELECT pg_catalog.count(*) FILTER (WHERE p.from_sql), \
    pg_catalog.count(*) FILTER (WHERE NOT p.from_sql) \
    FROM pg_catalog.pg_prepared_statement() p";

/// What the check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Nothing a client keeps.
    Clean,
    /// State the client keeps: it is pinned.
    Pins(PinReason),
}

/// Checks `server`'s session state after an opaque transaction, and resets its settings to the
/// server's defaults, `tracked` (the client's values of the tracked parameters) and `settings`
/// (the session settings it recorded), all in one round trip: what the check finds pins the
/// client, whose settings made by code the proxy cannot read are gone either way. A check the server refused (a `statement_timeout` the
/// client's code set, say) pins with [`PinReason::Other`]; an error means the connection broke
/// or cannot be trusted.
pub(crate) async fn check(
    server: &mut ServerConn,
    tracked: &Tracked,
    settings: &Settings,
) -> Result<Found, String> {
    let defaults = server.defaults.tracked().clone();
    let reset = format!(
        "{STATEMENTS};RESET ALL;{}{}",
        tracked.set_statements(&defaults, &defaults),
        settings.statements(&Settings::default())
    );
    // Twice at most: the second time after SQL deallocated the check.
    for _ in 0..2 {
        let mut messages = BytesMut::new();
        if !server.prepared.check {
            messages.extend_from_slice(&own(|b| frontend::parse(CHECK_NAME, CHECK, [], b)));
        }
        messages.extend_from_slice(&bind(b"", CHECK_NAME.as_bytes(), &[0; 6]));
        messages.extend_from_slice(&own(|b| frontend::execute("", 0, b)));
        frontend::sync(&mut messages);
        messages.extend_from_slice(&own(|b| frontend::query(&reset, b)));
        let answers = server
            .exchange(&messages, 2, OWN_QUERY_TIMEOUT)
            .await
            .map_err(|error| match error {
                QueryError::Broken(why) => why,
                QueryError::Server(_) => "the state check failed".into(),
            })?;
        if let Some(error) = &answers.error {
            if error.get(b'C') != Some("26000") || !server.prepared.check {
                return Ok(refused(error));
            }
            // The check was deallocated: so were the proxy's statements, it may be.
            server.prepared.clear();
            deallocate_all(server).await?;
            continue;
        }
        server.prepared.check = true;
        server.settings = settings.clone();
        // The check's row, the statements' row, then what setting the client's values returns.
        let [check, statements, ..] = &answers.rows[..] else {
            return Err("the state check returned fewer rows than its two".into());
        };
        let check = columns(check).ok_or("the state check returned a malformed row")?;
        let statements = columns(statements).ok_or("the state check returned a malformed row")?;
        if statements.first() != Some(&Some("0".into())) {
            return Ok(Found::Pins(PinReason::Prepare));
        }
        if let Some(reason) = PINS
            .iter()
            .zip(&check)
            .find_map(|(reason, value)| (value.as_deref() == Some("t")).then_some(*reason))
        {
            return Ok(Found::Pins(reason));
        }
        // SQL deallocated some of the proxy's statements (a run-time DEALLOCATE ALL, say): the
        // rest go too, and each is prepared again when a client needs it.
        let expected = (server.prepared.len() + 1).to_string();
        if statements.get(1) != Some(&Some(expected)) {
            server.prepared.clear();
            deallocate_all(server).await?;
        }
        return Ok(Found::Clean);
    }
    Err("the state check was deallocated twice".into())
}

async fn deallocate_all(server: &mut ServerConn) -> Result<(), String> {
    match server.queries(&["DEALLOCATE ALL"], OWN_QUERY_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(QueryError::Broken(why)) => Err(why),
        Err(QueryError::Server(error)) => Err(format!(
            "DEALLOCATE ALL failed: {}",
            error.get(b'M').unwrap_or_default()
        )),
    }
}

/// The server refused the check or the reset (a `statement_timeout` the client's code set,
/// say): the connection cannot be shown clean, and the client keeps it.
fn refused(error: &ErrorFields) -> Found {
    tracing::debug!(
        message = error.get(b'M').unwrap_or_default(),
        "the server refused the proxy's state check"
    );
    Found::Pins(PinReason::Other)
}
