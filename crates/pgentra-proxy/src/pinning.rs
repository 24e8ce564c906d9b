//! Which statements leave state in a session that outlives its transaction, read from their
//! SQL text: in transaction pooling, a client that runs one keeps its server connection for the
//! rest of its session (it is pinned, as RDS Proxy does), so that no other client's statement
//! ever runs under that state.
//!
//! The text is tokenized as PostgreSQL reads it — comments, string literals (`'…'`, `E'…'`,
//! dollar-quoted), quoted identifiers — and each statement's leading keywords and function names
//! decide. The bodies of `DO` blocks and dollar-quoted strings are read as SQL too (a function
//! body may lock or `SET`), so detection errs on the side of pinning. What a function defined on
//! the server does inside is not visible; a `ParameterStatus` the server reports during a
//! transaction pins as well (see the transaction relay).

/// Why a session was pinned, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinReason {
    /// `SET` (not `SET LOCAL`/`SET TRANSACTION`), `RESET`, `set_config(...)`, or a reported
    /// parameter change.
    Set,
    /// `LISTEN`.
    Listen,
    /// A session-level advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock`, shared).
    AdvisoryLock,
    /// A temporary table, view or sequence.
    Temporary,
    /// A cursor `WITH HOLD`.
    HoldCursor,
    /// SQL-level `PREPARE` or `DEALLOCATE`.
    Prepare,
    /// `LOAD` or `DISCARD`.
    Other,
}

impl PinReason {
    pub(crate) const ALL: [Self; 7] = [
        Self::Set,
        Self::Listen,
        Self::AdvisoryLock,
        Self::Temporary,
        Self::HoldCursor,
        Self::Prepare,
        Self::Other,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Listen => "listen",
            Self::AdvisoryLock => "advisory_lock",
            Self::Temporary => "temporary",
            Self::HoldCursor => "hold_cursor",
            Self::Prepare => "prepare",
            Self::Other => "load_or_discard",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Functions whose effect outlives the transaction.
const SESSION_FUNCTIONS: [(&str, PinReason); 5] = [
    ("pg_advisory_lock", PinReason::AdvisoryLock),
    ("pg_advisory_lock_shared", PinReason::AdvisoryLock),
    ("pg_try_advisory_lock", PinReason::AdvisoryLock),
    ("pg_try_advisory_lock_shared", PinReason::AdvisoryLock),
    ("set_config", PinReason::Set),
];

/// Why `sql` pins its session, if it does. (`SET` of a parameter the proxy tracks does not:
/// the server reports its new value, and the proxy sets it again on the next connection.)
pub(crate) fn pins(sql: &str) -> Option<PinReason> {
    let mut words = Vec::new();
    tokenize(sql, 0, &mut words);
    words.split(|w| *w == ";").find_map(statement_pins)
}

fn statement_pins(words: &[&str]) -> Option<PinReason> {
    let is = |i: usize, keyword: &str| {
        words
            .get(i)
            .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
    };
    let any = |keywords: &[&str], w: &&str| keywords.iter().any(|k| w.eq_ignore_ascii_case(k));
    let reason = if is(0, "set") {
        let name = if is(1, "session") { 2 } else { 1 };
        // SET TIME ZONE and SET NAMES are TimeZone and client_encoding.
        let tracked = (is(name, "time") && is(name + 1, "zone"))
            || is(name, "names")
            || words
                .get(name)
                .is_some_and(|w| crate::tracked::tracked(w).is_some());
        (!(is(1, "local") || is(1, "transaction") || tracked)).then_some(PinReason::Set)
    } else if is(0, "reset") {
        let tracked = words
            .get(1)
            .is_some_and(|w| crate::tracked::tracked(w).is_some());
        (!tracked).then_some(PinReason::Set)
    } else if is(0, "listen") {
        Some(PinReason::Listen)
    } else if is(0, "prepare") || is(0, "deallocate") {
        Some(PinReason::Prepare)
    } else if is(0, "load") || is(0, "discard") {
        Some(PinReason::Other)
    } else if is(0, "create") {
        // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] {TABLE | VIEW |
        // SEQUENCE}: the words before the object's kind.
        words
            .iter()
            .skip(1)
            .take_while(|w| !any(&["table", "view", "sequence", "("], w))
            .any(|w| any(&["temp", "temporary"], w))
            .then_some(PinReason::Temporary)
    } else if is(0, "declare") {
        words
            .windows(2)
            .any(|w| w[0].eq_ignore_ascii_case("with") && w[1].eq_ignore_ascii_case("hold"))
            .then_some(PinReason::HoldCursor)
    } else {
        None
    };
    if reason.is_some() {
        return reason;
    }
    // SELECT ... INTO TEMP, CREATE TABLE ... AS and the like, anywhere.
    if words
        .windows(2)
        .any(|w| w[0].eq_ignore_ascii_case("into") && any(&["temp", "temporary"], &w[1]))
    {
        return Some(PinReason::Temporary);
    }
    words.windows(2).find_map(|w| {
        let name = w[0].rsplit('.').next().unwrap_or(w[0]);
        (w[1] == "(")
            .then(|| {
                SESSION_FUNCTIONS
                    .iter()
                    .find(|(f, _)| f.eq_ignore_ascii_case(name))
            })
            .flatten()
            .map(|(_, reason)| *reason)
    })
}

/// Splits SQL into words, `(` and `;` (slices of `sql`), skipping comments, string literals
/// and quoted identifiers; the text of dollar-quoted strings is tokenized as SQL as well
/// (function and `DO` bodies), and inside such a body so are string literals (PL/pgSQL's
/// `EXECUTE '…'`), down to [`MAX_DEPTH`] levels. Total on any input.
fn tokenize<'a>(sql: &'a str, depth: usize, words: &mut Vec<&'a str>) {
    let bytes = sql.as_bytes();
    // Every slice taken starts and ends next to an ASCII byte, so at a character boundary.
    let text = |from: usize, to: usize| sql.get(from..to).unwrap_or_default();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 0usize;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                let end = skip_quoted(bytes, i, b'\'');
                if depth > 0 {
                    sql_text(text(i + 1, end.saturating_sub(1).max(i + 1)), depth, words);
                }
                i = end;
            }
            b'"' => {
                // A quoted identifier is a word of its own, never a keyword.
                i = skip_quoted(bytes, i, b'"');
                words.push("\"");
            }
            b'$' => match dollar_tag(bytes, i) {
                Some(tag) => {
                    let body_start = i + tag.len();
                    let end = find(bytes, body_start, tag).unwrap_or(bytes.len());
                    // The body may be a function's or a DO block's: read it as SQL.
                    sql_text(text(body_start, end), depth, words);
                    i = (end + tag.len()).min(bytes.len());
                }
                None => i += 1,
            },
            b';' | b'(' => {
                words.push(text(i, i + 1));
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || matches!(bytes[i], b'_' | b'$' | b'.')
                        || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                let word = text(start, i);
                // E'...', B'...', X'...' and N'...' strings: the prefix is not a word.
                if bytes.get(i) == Some(&b'\'') && word.len() == 1 && "eEbBxXnN".contains(word) {
                    continue;
                }
                words.push(word);
            }
            _ => i += 1,
        }
    }
}

/// How deep bodies within bodies are read; deeper text is not SQL anyone writes, and the bound
/// keeps the recursion's stack small whatever a client sends.
const MAX_DEPTH: usize = 8;

/// Tokenizes text found inside a statement as statements of their own.
fn sql_text<'a>(text: &'a str, depth: usize, words: &mut Vec<&'a str>) {
    if depth < MAX_DEPTH {
        words.push(";");
        tokenize(text, depth + 1, words);
        words.push(";");
    }
}

/// The index after a literal quoted with `quote` starting at `start` (doubled quotes inside;
/// backslashes escape in `E'...'` strings, harmless to honour everywhere for skipping).
fn skip_quoted(bytes: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        if bytes[i] == b'\\' && quote == b'\'' {
            i += 2;
        } else if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// A dollar-quote tag (`$$`, `$body$`) starting at `at`.
fn dollar_tag(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let rest = &bytes[at + 1..];
    let len = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))?;
    (rest.get(len) == Some(&b'$') && !rest.first().is_some_and(u8::is_ascii_digit))
        .then(|| &bytes[at..at + len + 2])
}

fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| from + at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_pins_and_transaction_state_does_not() {
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
        ];
        for (sql, reason) in pinning {
            assert_eq!(pins(sql), Some(reason), "{sql}");
        }
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
        ] {
            assert_eq!(pins(sql), None, "{sql}");
        }
    }
}
