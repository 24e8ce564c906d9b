//! A client's extended-query messages translated onto whichever server connection it holds, in
//! transaction pooling ([`super::statements`] says why statements can be shared): `Parse`,
//! `Bind` and `Describe` of the client's statements name the proxy's statements on that
//! connection, prepared there first when needed (and the least recently used closed past the
//! bound); a `Close` of the client's statement is answered by the proxy, in its turn; errors
//! name the client's statements, never the proxy's; and what a message the server did not run
//! would have done is undone ([`Undo`]). Session state a statement leaves pins the client
//! ([`crate::pinning`]).
//!
//! Nothing here does I/O: each message becomes bytes for the server, answers owed
//! ([`Owed`]) and at most one answer of the proxy's own for the client.

use super::messages::{bind, own_message, server_name_str, split_name};
use super::owed::{Expect, Owed};
use super::statements::{ClientStatements, Prepared, Statement, Unnamed};
use crate::pinning::{Effect, PinReason};
use crate::refusal::Refusal;
use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use std::sync::Arc;

/// Prepared statements one client may hold (PostgreSQL has no limit, but the proxy holds
/// them for every client of a pool).
pub(crate) const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Bytes of statement definitions one client may hold (pgjdbc caches 5 MiB of them by
/// default): without a bound, 300 statements of 512 KiB grew the proxy by 356 MiB.
pub(crate) const MAX_CLIENT_STATEMENT_BYTES: usize = 16 << 20;
/// Names an error may need translating, per connection held (the latest kept).
const MAX_RENAMES: usize = 64;

const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// What to take back for a message the server did not run (it failed, or an error before it
/// made the server skip it): the client must see the statements PostgreSQL would have. (What
/// the server's unnamed statement holds is unknown after any error.)
#[derive(Debug, Default)]
pub(crate) enum Undo {
    #[default]
    None,
    /// The client's `Parse` defined this name (and the server was to prepare the statement).
    Defined(Bytes, Option<Arc<Statement>>),
    /// The client's `Close` removed this statement.
    Closed(Bytes, Arc<Statement>),
    /// The proxy's `Parse` of a statement on the server.
    Prepared(Arc<Statement>),
    /// The proxy's `Close` of a statement it evicted: still prepared if skipped.
    Evicted(Arc<Statement>, Bytes),
    /// The client's unnamed statement was this before a `Parse` of it, or a simple query: if
    /// skipped, it still is; if the `Parse` failed, there is none ("PostgreSQL drops the old
    /// one first").
    Unnamed(Option<Arc<Statement>>),
}

/// The server connection a translated message goes to: what it has prepared, what it owes, and
/// the bytes waiting for it.
pub(crate) struct Server<'a> {
    pub(crate) prepared: &'a mut Prepared,
    pub(crate) owed: &'a mut Owed<Undo>,
    pub(crate) output: &'a mut BytesMut,
}

impl Server<'_> {
    /// Queues an extended-query message for the server.
    fn send(&mut self, message: &[u8], expect: Expect<Undo>) {
        self.output.put_slice(message);
        self.owed.extended(expect);
    }
}

/// One client's statements, by its names, and the names a server's errors need translating.
#[derive(Debug, Default)]
pub(crate) struct Translator {
    statements: ClientStatements,
    /// Statement names the server may put in an error, and the client's names for them.
    renames: Vec<(Bytes, Bytes)>,
}

impl Translator {
    /// A new server connection is held: names on the last one mean nothing on it.
    pub(crate) fn held(&mut self) {
        self.renames.clear();
    }

    /// Translates one whole client message for `server`; an answer of the proxy's own that is
    /// due at once goes to `client`. `limit` bounds the statements prepared per connection.
    /// What running it does to the client's session, if the proxy must act on it.
    pub(crate) fn message(
        &mut self,
        tag: u8,
        message: &[u8],
        server: Server<'_>,
        client: &mut BytesMut,
        limit: usize,
    ) -> Result<Option<Effect>, Refusal> {
        let body = &message[5..];
        let malformed = |what: &str| {
            Refusal::ClientProtocol(format!("invalid {what} message: a name is not terminated"))
        };
        match (tag, body.first()) {
            (b'Q', _) => {
                let sql = body.strip_suffix(b"\0").unwrap_or(body);
                // "A simple Query message also destroys the unnamed statement."
                let undo = Undo::Unnamed(self.statements.unnamed.take());
                server.prepared.unnamed = Unnamed::Empty;
                server.output.put_slice(message);
                server.owed.query(undo);
                return Ok(crate::pinning::effect(sql));
            }
            // A fast-path function call: what the function does is not known, so it pins. Its
            // answer ends with ReadyForQuery, as a query's.
            (b'F', _) => {
                server.output.put_slice(message);
                server.owed.query(Undo::None);
                return Ok(Some(Effect::pinning(PinReason::Other)));
            }
            (b'P', _) => {
                let (name, definition) = split_name(body).ok_or_else(|| malformed("Parse"))?;
                self.parse(name, definition, server, client, limit)?;
            }
            (b'B', _) => {
                let (portal, rest) = split_name(body).ok_or_else(|| malformed("Bind"))?;
                let (name, rest) = split_name(rest).ok_or_else(|| malformed("Bind"))?;
                return Ok(self.bind(message, portal, name, rest, server, limit));
            }
            (b'D', Some(b'S')) => {
                let (name, _) = split_name(&body[1..]).ok_or_else(|| malformed("Describe"))?;
                self.describe(message, name, server, limit);
            }
            // The client's statements are its own: closing one touches no server (the
            // statement stays prepared there for others). Closing a name that does not exist
            // "is not an error", as in PostgreSQL.
            (b'C', Some(b'S')) => {
                let (name, _) = split_name(&body[1..]).ok_or_else(|| malformed("Close"))?;
                let undo = match self.statements.remove(name) {
                    Some(old) => Undo::Closed(Bytes::copy_from_slice(name), old),
                    None => Undo::None,
                };
                client.put_slice(server.owed.own(CLOSE_COMPLETE, undo).unwrap_or_default());
            }
            (b'S', _) => {
                server.output.put_slice(message);
                // What follows is translated before the server has answered what precedes:
                // if that fails, the server skips the rest of it, the unnamed statement
                // included, so the next batch must not count on it.
                if server.owed.sync() {
                    server.prepared.unnamed = Unnamed::Unknown;
                }
            }
            // Portals, Execute, copy ends and Flush pass as they are.
            (tag, kind) => {
                server.output.put_slice(message);
                server.owed.sent(tag, kind.copied());
            }
        }
        Ok(None)
    }

    /// The client's `Bind` of its statement `name` to `portal`, naming the server's statement;
    /// what running the statement does to the client's session.
    fn bind(
        &mut self,
        message: &[u8],
        portal: &[u8],
        name: &[u8],
        rest: &[u8],
        mut server: Server<'_>,
        limit: usize,
    ) -> Option<Effect> {
        let statement = self.statements.get(name).cloned();
        let server_name = self.server_statement(name, statement.as_ref(), &mut server, limit);
        if server_name == name {
            server.send(message, Expect::Bind);
        } else {
            server.send(&bind(portal, &server_name, rest), Expect::Bind);
        }
        statement.and_then(|s| s.effect.clone())
    }

    /// The client's `Describe` of its statement `name`, naming the server's statement.
    fn describe(&mut self, message: &[u8], name: &[u8], mut server: Server<'_>, limit: usize) {
        let statement = self.statements.get(name).cloned();
        let server_name = self.server_statement(name, statement.as_ref(), &mut server, limit);
        let expect = Expect::DescribeStatement { parameters: false };
        if server_name == name {
            server.send(message, expect);
        } else {
            let name = server_name_str(&server_name);
            let describe = own_message(|buf| frontend::describe(b'S', &name, buf));
            server.send(&describe, expect);
        }
    }

    /// The client's `Parse` of `name` (`""`: the unnamed statement).
    fn parse(
        &mut self,
        name: &[u8],
        definition: &[u8],
        mut server: Server<'_>,
        client: &mut BytesMut,
        limit: usize,
    ) -> Result<(), Refusal> {
        if name.is_empty() {
            let statement = Statement::new(definition);
            let before = self.statements.unnamed.replace(Arc::clone(&statement));
            let parse = statement.parse_message(b"");
            server.prepared.unnamed = Unnamed::Holds(statement);
            let expect = Expect::Parse {
                pass: true,
                undo: Undo::Unnamed(before),
            };
            server.send(&parse, expect);
        } else if let Some(existing) = self.statements.get(name).cloned() {
            // PostgreSQL refuses a name in use (42P05): the server says so about the
            // statement's name there, which the client is told as its own.
            let server_name = self.prepare(&existing, &mut server, limit);
            let parse = existing.parse_message(&server_name);
            self.rename(server_name, Bytes::copy_from_slice(name));
            let expect = Expect::Parse {
                pass: true,
                undo: Undo::None,
            };
            server.send(&parse, expect);
        } else if self.statements.len() >= MAX_CLIENT_STATEMENTS
            || self.statements.bytes() + definition.len() > MAX_CLIENT_STATEMENT_BYTES
        {
            return Err(Refusal::TooManyStatements {
                limit: MAX_CLIENT_STATEMENTS,
                bytes: MAX_CLIENT_STATEMENT_BYTES,
            });
        } else {
            let name = Bytes::copy_from_slice(name);
            let statement = Statement::new(definition);
            self.statements.insert(name.clone(), Arc::clone(&statement));
            if server.prepared.get(&statement).is_some() {
                let undo = Undo::Defined(name, None);
                client.put_slice(server.owed.own(PARSE_COMPLETE, undo).unwrap_or_default());
            } else {
                let server_name = insert(&statement, &mut server, limit);
                let parse = statement.parse_message(&server_name);
                let expect = Expect::Parse {
                    pass: true,
                    undo: Undo::Defined(name, Some(statement)),
                };
                server.send(&parse, expect);
            }
        }
        Ok(())
    }

    /// The server's name for the client's statement `name` (its definition `statement`, if the
    /// client has one), prepared there first when needed. A name the client does not have goes
    /// as it is, so the server's error names it.
    fn server_statement(
        &mut self,
        name: &[u8],
        statement: Option<&Arc<Statement>>,
        server: &mut Server<'_>,
        limit: usize,
    ) -> Bytes {
        match (statement, name.is_empty()) {
            (Some(statement), false) => self.prepare(statement, server, limit),
            (statement, true) => {
                unnamed(statement, server);
                Bytes::new()
            }
            // The proxy's own names are not the client's to use: a name that is not the
            // client's goes to the server as one it cannot have, so the client is told its name
            // does not exist.
            (None, false) if name.starts_with(b"__pgentra_") => {
                let absent = Bytes::from_static(b"__pgentra_not_prepared");
                self.rename(absent.clone(), Bytes::copy_from_slice(name));
                absent
            }
            (None, false) => Bytes::copy_from_slice(name),
        }
    }

    /// The server's name of `statement`, prepared there first if it is not yet (the answer is
    /// the proxy's, and dropped).
    fn prepare(
        &mut self,
        statement: &Arc<Statement>,
        server: &mut Server<'_>,
        limit: usize,
    ) -> Bytes {
        if let Some(name) = server.prepared.get(statement) {
            return name;
        }
        let name = insert(statement, server, limit);
        let parse = statement.parse_message(&name);
        let undo = Undo::Prepared(Arc::clone(statement));
        server.send(&parse, Expect::Parse { pass: false, undo });
        name
    }

    /// Tells the client `client` where the server's errors say `server`.
    fn rename(&mut self, server: Bytes, client: Bytes) {
        if self.renames.len() >= MAX_RENAMES {
            self.renames.remove(0);
        }
        self.renames.push((server, client));
    }

    /// Takes back what a message the server did not run would have done: it `failed` itself,
    /// or an error before it made the server skip it.
    pub(crate) fn undo(&mut self, undo: Undo, failed: bool, prepared: &mut Prepared) {
        match undo {
            Undo::None => {}
            Undo::Defined(name, statement) => {
                self.statements.remove(&name);
                if let Some(statement) = statement {
                    // Later batches may already name it: their errors must say the client's
                    // name.
                    if let Some(server_name) = prepared.get(&statement) {
                        self.rename(server_name, name);
                    }
                    prepared.remove(&statement);
                }
            }
            Undo::Closed(name, statement) => {
                self.statements.insert(name, statement);
            }
            Undo::Prepared(statement) => {
                prepared.remove(&statement);
            }
            Undo::Evicted(statement, name) => prepared.restore(statement, name),
            Undo::Unnamed(before) => self.statements.unnamed = if failed { None } else { before },
        }
    }

    /// `DISCARD ALL` or `DEALLOCATE ALL` ran: every prepared statement is gone, the client's
    /// included, as PostgreSQL would have it.
    pub(crate) fn discarded(&mut self, prepared: &mut Prepared) {
        prepared.clear();
        self.statements = ClientStatements::default();
    }

    /// An `ErrorResponse` that names the server's statements, told about the client's; `None`
    /// when it names none of them.
    pub(crate) fn rename_error(&self, error: &[u8]) -> Option<Bytes> {
        if self.renames.is_empty() {
            return None;
        }
        let mut fields = pgentra_wire::ErrorFields::parse(&error[5..]).ok()?;
        let mut text = fields.get(b'M')?.to_owned();
        for (server, client) in &self.renames {
            if let (Ok(server), Ok(client)) =
                (std::str::from_utf8(server), std::str::from_utf8(client))
            {
                text = text.replace(&format!("\"{server}\""), &format!("\"{client}\""));
            }
        }
        fields.set(b'M', text);
        Some(fields.to_error_response())
    }
}

/// Records `statement` as prepared on the server under a new name, closing the least recently
/// used ones past the bounds (the answers are the proxy's, and dropped).
fn insert(statement: &Arc<Statement>, server: &mut Server<'_>, limit: usize) -> Bytes {
    let (name, evicted) = server.prepared.insert(Arc::clone(statement), limit);
    for (old, old_name) in evicted {
        let close = own_message(|buf| frontend::close(b'S', &server_name_str(&old_name), buf));
        let undo = Undo::Evicted(old, old_name);
        server.send(&close, Expect::Close { pass: false, undo });
    }
    name
}

/// Makes the server's unnamed statement `wanted`, or none: a `Bind` of the unnamed statement
/// must never find another client's.
fn unnamed(wanted: Option<&Arc<Statement>>, server: &mut Server<'_>) {
    match wanted {
        Some(statement) if server.prepared.unnamed != Unnamed::Holds(Arc::clone(statement)) => {
            server.prepared.unnamed = Unnamed::Holds(Arc::clone(statement));
            let expect = Expect::Parse {
                pass: false,
                undo: Undo::None,
            };
            server.send(&statement.parse_message(b""), expect);
        }
        None if server.prepared.unnamed != Unnamed::Empty => {
            server.prepared.unnamed = Unnamed::Empty;
            let expect = Expect::Close {
                pass: false,
                undo: Undo::None,
            };
            server.send(&own_message(|buf| frontend::close(b'S', "", buf)), expect);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
