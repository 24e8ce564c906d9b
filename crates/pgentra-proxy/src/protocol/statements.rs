//! Prepared statements under transaction pooling, as PgBouncer 1.21+ keeps them: a client's
//! statements live in the client's own table, by its names, and are prepared on whichever
//! server connection it gets, on demand, under names of the proxy's
//! (`__pgentra_<random>_<n>`, the random part drawn once per process from the OS, so that no
//! client can name another's statement). A server connection keeps what it prepared, by
//! content, so that clients parsing the same text share one server statement, up to a bound
//! past which the least recently used is closed.
//!
//! Sharing by content is safe because a prepared statement holds no session state: PostgreSQL
//! "will force re-analysis and re-planning of the statement before using it whenever database
//! objects used in the statement have undergone definitional (DDL) changes … Also, if the value
//! of `search_path` changes from one use to the next" (the `PREPARE` reference page).

use crate::pinning::{self, Effect};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Bytes of statement definitions one server connection keeps prepared for the proxy's
/// clients; past them the least recently used are closed. (PostgreSQL keeps each one's plan
/// too, in the backend's memory.)
pub(crate) const MAX_SERVER_STATEMENT_BYTES: usize = 16 << 20;

/// A statement as the client's `Parse` defines it: what follows the name in the message (the
/// query text, a NUL, the parameter types), compared and hashed by that content.
#[derive(Debug)]
pub(crate) struct Statement {
    definition: Bytes,
    hash: u64,
    /// Whether running it leaves session state behind, or runs code the proxy cannot read
    /// (read from its text once).
    pub(crate) effect: Option<Effect>,
}

impl Statement {
    /// The statement of a `Parse` body after its name (copied: it must not keep the message's
    /// buffer alive).
    pub(crate) fn new(definition: &[u8]) -> Arc<Self> {
        let definition = Bytes::copy_from_slice(definition);
        let mut hasher = std::hash::DefaultHasher::new();
        definition.hash(&mut hasher);
        let query = definition.split(|b| *b == 0).next().unwrap_or_default();
        Arc::new(Self {
            effect: pinning::effect(query),
            hash: hasher.finish(),
            definition,
        })
    }

    /// The bytes of its definition, as counted against the bounds.
    pub(crate) fn size(&self) -> usize {
        self.definition.len()
    }

    /// A `Parse` message preparing this statement as `name`.
    pub(crate) fn parse_message(&self, name: &[u8]) -> Bytes {
        let mut body = BytesMut::with_capacity(name.len() + 1 + self.definition.len());
        body.put_slice(name);
        body.put_u8(0);
        body.put_slice(&self.definition);
        pgentra_wire::message(b'P', &body)
    }
}

impl PartialEq for Statement {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.definition == other.definition
    }
}

impl Eq for Statement {}

impl Hash for Statement {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// A client's prepared statements, by the names it gave them; and its unnamed statement,
/// which lives until its next unnamed `Parse` or simple query, as in PostgreSQL.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    named: HashMap<Bytes, Arc<Statement>>,
    /// The bytes of the named statements' definitions.
    bytes: usize,
    pub(crate) unnamed: Option<Arc<Statement>>,
}

impl ClientStatements {
    /// The statement `name` names (`""`: the unnamed one).
    pub(crate) fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    /// Defines `name`; the statement it named before, if any.
    pub(crate) fn insert(
        &mut self,
        name: Bytes,
        statement: Arc<Statement>,
    ) -> Option<Arc<Statement>> {
        if name.is_empty() {
            return self.unnamed.replace(statement);
        }
        self.bytes += statement.size();
        let before = self.named.insert(name, statement);
        self.bytes -= before.as_ref().map_or(0, |before| before.size());
        before
    }

    /// Forgets `name`; the statement it named, if any.
    pub(crate) fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        if name.is_empty() {
            return self.unnamed.take();
        }
        let removed = self.named.remove(name);
        self.bytes -= removed.as_ref().map_or(0, |removed| removed.size());
        removed
    }

    /// How many named statements the client has.
    pub(crate) fn len(&self) -> usize {
        self.named.len()
    }

    /// The bytes of the named statements' definitions.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What a server connection's unnamed statement holds, as far as the proxy knows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum Unnamed {
    /// None: a simple query destroyed it, or none was ever parsed.
    #[default]
    Empty,
    /// This statement.
    Holds(Arc<Statement>),
    /// Not known: an error made the server skip messages that might have changed it.
    Unknown,
}

/// What one server connection has prepared for the proxy's clients, by content, with the
/// order of last use; and which statement is its unnamed one.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    names: HashMap<Arc<Statement>, (Bytes, u64)>,
    /// The bytes of their definitions.
    bytes: usize,
    /// Counts uses, for the order of last use.
    clock: u64,
    /// Names are never reused on a connection, so an evicted statement's `Close` cannot
    /// close a newer one.
    next_name: u64,
    /// What the server's unnamed statement holds.
    pub(crate) unnamed: Unnamed,
    /// The proxy's state check is prepared here ([`crate::state_check`]).
    pub(crate) check: bool,
}

impl Prepared {
    /// The server's name for `statement`, if prepared here (marking it used).
    pub(crate) fn get(&mut self, statement: &Arc<Statement>) -> Option<Bytes> {
        self.clock += 1;
        let clock = self.clock;
        self.names.get_mut(statement).map(|(name, used)| {
            *used = clock;
            name.clone()
        })
    }

    /// Records `statement` as prepared under a new name, which it returns; at `limit`
    /// statements, or past [`MAX_SERVER_STATEMENT_BYTES`], the least recently used make room,
    /// and they are returned with their names, to be closed.
    pub(crate) fn insert(
        &mut self,
        statement: Arc<Statement>,
        limit: usize,
    ) -> (Bytes, Vec<(Arc<Statement>, Bytes)>) {
        let mut evicted = Vec::new();
        while self.names.len() >= limit
            || (!self.names.is_empty()
                && self.bytes + statement.size() > MAX_SERVER_STATEMENT_BYTES)
        {
            let Some(oldest) = (self.names.iter())
                .min_by_key(|(_, (_, used))| *used)
                .map(|(statement, _)| Arc::clone(statement))
            else {
                break;
            };
            if let Some(name) = self.remove(&oldest) {
                evicted.push((oldest, name));
            }
        }
        self.next_name += 1;
        // Drawn when the proxy started (`Proxy::bind` fails without it).
        let secret = name_secret().unwrap_or_default();
        let name = Bytes::from(format!("__pgentra_{secret}_{}", self.next_name));
        self.restore(statement, name.clone());
        (name, evicted)
    }

    /// Records `statement` as prepared under `name`: again, when the server skipped its
    /// eviction.
    pub(crate) fn restore(&mut self, statement: Arc<Statement>, name: Bytes) {
        self.clock += 1;
        let size = statement.size();
        if self.names.insert(statement, (name, self.clock)).is_none() {
            self.bytes += size;
        }
    }

    /// Forgets `statement` (its `Parse` failed, or never ran, or it makes room); the name it
    /// had.
    pub(crate) fn remove(&mut self, statement: &Arc<Statement>) -> Option<Bytes> {
        let (name, _) = self.names.remove(statement)?;
        self.bytes -= statement.size();
        Some(name)
    }

    /// Forgets every named statement (`DISCARD ALL` or `DEALLOCATE ALL` ran).
    pub(crate) fn clear(&mut self) {
        self.names.clear();
        self.bytes = 0;
        self.check = false;
    }

    /// How many statements are prepared here.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

/// The random part of the proxy's statement names, drawn once per process from the OS's
/// CSPRNG ([`Proxy::bind`](crate::Proxy::bind) fails without it).
pub(crate) fn name_secret() -> std::io::Result<&'static str> {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(secret) = SECRET.get() {
        return Ok(secret);
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let _ = SECRET.set(bytes.iter().map(|b| format!("{b:02x}")).collect());
    SECRET
        .get()
        .map(String::as_str)
        .ok_or_else(|| std::io::Error::other("the statement name secret was not kept"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pinning::PinReason;

    fn statement(sql: &str) -> Arc<Statement> {
        let mut definition = sql.as_bytes().to_vec();
        definition.extend_from_slice(&[0, 0, 0]);
        Statement::new(&definition)
    }

    #[test]
    fn the_least_recently_used_statement_makes_room() {
        let mut prepared = Prepared::default();
        let (a, b, c) = (
            statement("select 1"),
            statement("select 2"),
            statement("select 3"),
        );
        let (name_a, _) = prepared.insert(Arc::clone(&a), 2);
        let (name_b, _) = prepared.insert(Arc::clone(&b), 2);
        assert_ne!(name_a, name_b);
        // `a` used last: `b` goes.
        assert_eq!(prepared.get(&statement("select 1")), Some(name_a.clone()));
        let (name_c, evicted) = prepared.insert(Arc::clone(&c), 2);
        assert_eq!(evicted, [(Arc::clone(&b), name_b)]);
        assert!(prepared.get(&b).is_none());
        assert_eq!(prepared.get(&c), Some(name_c.clone()));
        // A statement prepared again gets a name never used on this connection.
        let (name_b2, _) = prepared.insert(b, 2);
        assert!(![name_a, name_c].contains(&name_b2));
        assert_eq!(prepared.len(), 2);
    }

    #[test]
    fn statements_past_the_byte_bound_make_room() {
        let mut prepared = Prepared::default();
        // Three of them fit in the bound, not four.
        let padding = "x".repeat(MAX_SERVER_STATEMENT_BYTES * 3 / 10);
        let big: Vec<_> = (0..4)
            .map(|n| statement(&format!("select {n} -- {padding}")))
            .collect();
        for statement in &big[..3] {
            assert!(prepared.insert(Arc::clone(statement), 100).1.is_empty());
        }
        // The fourth does not fit beside the other three: the oldest goes.
        let (_, evicted) = prepared.insert(Arc::clone(&big[3]), 100);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, big[0]);
        assert!(prepared.bytes <= MAX_SERVER_STATEMENT_BYTES);
        // One larger than the bound empties the connection, and is kept alone.
        let huge = statement(&"x".repeat(MAX_SERVER_STATEMENT_BYTES));
        let (_, evicted) = prepared.insert(Arc::clone(&huge), 100);
        assert_eq!(evicted.len(), 3);
        assert_eq!((prepared.len(), prepared.bytes), (1, huge.size()));
        prepared.clear();
        assert_eq!(prepared.bytes, 0);
    }

    #[test]
    fn a_client_s_bytes_follow_its_statements() {
        let mut client = ClientStatements::default();
        let (a, b) = (statement("select 1"), statement("select 22"));
        client.insert(Bytes::from_static(b"s"), Arc::clone(&a));
        client.insert(Bytes::from_static(b"t"), Arc::clone(&a));
        client.insert(Bytes::new(), Arc::clone(&b));
        assert_eq!(client.bytes(), 2 * a.size());
        client.insert(Bytes::from_static(b"s"), Arc::clone(&b));
        assert_eq!(client.bytes(), a.size() + b.size());
        client.remove(b"t");
        client.remove(b"absent");
        assert_eq!(client.bytes(), b.size());
    }

    #[test]
    fn a_statement_knows_whether_it_pins() {
        let listen = Some(Effect::pinning(PinReason::Listen));
        assert_eq!(statement("LISTEN jobs").effect, listen);
        assert_eq!(statement("select $1::int").effect, None);
        let effect = statement("select app.f($1)").effect.clone().unwrap();
        assert!(effect.opaque && effect.pins.is_none());
        assert_eq!(statement("select 1"), statement("select 1"));
        assert_ne!(statement("select 1"), statement("select 2"));
        let parse = statement("select 1").parse_message(b"s1");
        assert_eq!(&parse[..], b"P\0\0\0\x12s1\0select 1\0\0\0");
    }
}
