//! Which statements leave state in a session that outlives its transaction, read from their
//! SQL text: in transaction pooling, a client that runs one keeps its server connection for the
//! rest of its session (it is pinned, as RDS Proxy does), so that no other client's statement
//! ever runs under that state.
//!
//! The text is tokenized as PostgreSQL reads it — comments, string literals (`'…'`, `E'…'`,
//! dollar-quoted), quoted identifiers — and each statement's leading keywords and function names
//! decide. The bodies of `DO` blocks and dollar-quoted strings are read as SQL too (a function
//! body may lock or `SET`), so detection errs on the side of pinning. What a function defined on
//! the server does inside is not visible: a statement that calls one, or runs a `DO` block or a
//! procedure, is *opaque*, and the relay checks the connection's state on the server after its
//! transaction ([`crate::state_check`]). A `ParameterStatus` the server reports during a
//! transaction pins as well (see the transaction relay).

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use known::KNOWN;

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
    /// `LOAD`, `DISCARD`, a fast-path function call (whose function is not known), or text
    /// the proxy does not read: Unicode escapes (`U&"\0073et_config"`), and backslash escapes
    /// in a string run as SQL (`EXECUTE E'\163et …'`), which could spell any name.
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
            Self::Other => "other",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What running a statement does to its session, as far as the proxy must act on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Effect {
    /// It leaves state that outlives its transaction: the session is pinned.
    pub(crate) pins: Option<PinReason>,
    /// It runs code the proxy cannot read (a function defined on the server, a `DO` block, a
    /// procedure): the connection's state is checked after the transaction.
    pub(crate) opaque: bool,
    /// The session settings it sets or resets (`SET name …`, `RESET name`; names in lowercase,
    /// [`RESET_ALL`] for `RESET ALL`): their values are read back from the server after the
    /// transaction, and follow the client to every connection it gets.
    pub(crate) settings: Vec<String>,
}

/// Stands for `RESET ALL` among an [`Effect`]'s settings (no setting has that name).
pub(crate) const RESET_ALL: &str = "all";

impl Effect {
    pub(crate) fn pinning(reason: PinReason) -> Self {
        Self {
            pins: Some(reason),
            ..Self::default()
        }
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

/// What running `sql` does to its session: why it pins, or that it is opaque, if either.
/// (`SET` of a parameter the proxy tracks does not pin: the server reports its new value, and
/// the proxy sets it again on the next connection.)
///
/// Every rule acts on a word that contains one of [`TRIGGERS`] (in any case): a statement
/// with none of them — most of what applications run — is not read further. Otherwise the text
/// is read once, word by word, with a few words of state per statement: the cost is linear in
/// the text, and the memory constant, whatever a client sends.
///
/// Whether a backslash escapes in a string literal depends on the session's
/// `standard_conforming_strings` (and a client could change it): the text is read both ways,
/// and pins if either reading does.
pub(crate) fn effect(sql: &[u8]) -> Option<Effect> {
    static WORDS: std::sync::LazyLock<AhoCorasick> = std::sync::LazyLock::new(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(Some(AhoCorasickKind::DFA))
            .build(TRIGGERS)
            .expect("the trigger words make an automaton")
    });
    if !WORDS.is_match(sql) {
        return None;
    }
    // Valid text is read as it is (the check is quick on ASCII); only invalid text is copied.
    let sql = match std::str::from_utf8(sql) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(sql),
    };
    // Without a backslash the two readings are the same: one is enough.
    let readings: &[bool] = if sql.contains('\\') {
        &[false, true]
    } else {
        &[false]
    };
    let mut effect = Effect::default();
    effect.pins = readings.iter().copied().find_map(|backslashes| {
        let mut reader = Reader::default();
        let strings = Strings { backslashes };
        let pins =
            tokenize(&sql, 0, strings, &mut |word| reader.word(word)).or_else(|| reader.end());
        effect.opaque |= reader.opaque;
        for name in reader.settings {
            let name = name.to_ascii_lowercase();
            if !effect.settings.contains(&name) {
                effect.settings.push(name);
            }
        }
        pins
    });
    (effect != Effect::default()).then_some(effect)
}

/// Parts of the words the rules act on: `SET`, `RESET` and `set_config`; `LISTEN`; `PREPARE`
/// and `DEALLOCATE`; `LOAD`; `DISCARD`; `TEMP`, `TEMPORARY` and `pg_temp`; `WITH HOLD`; the
/// advisory lock functions. And the escapes that could spell any of them: `U&` and a backslash.
/// And what makes a statement opaque: a call (`(`), `DO` and `CALL` (whose call has one).
const TRIGGERS: [&str; 13] = [
    "set",
    "listen",
    "prepare",
    "deallocate",
    "load",
    "discard",
    "temp",
    "hold",
    "advisory",
    "u&",
    "\\",
    "(",
    "do",
];

/// How string literals are read.
#[derive(Debug, Clone, Copy)]
struct Strings {
    /// A backslash escapes the next character in every literal (`standard_conforming_strings
    /// = off`), not only in `E'…'`.
    backslashes: bool,
}

/// Whether `name` is the session's temporary schema (`pg_temp`, or its real name `pg_temp_N`).
fn is_temp_schema(name: &str) -> bool {
    is(name, "pg_temp")
        || (name.get(..8).is_some_and(|prefix| is(prefix, "pg_temp_"))
            && name[8..].bytes().all(|b| b.is_ascii_digit()))
}

/// What the rules need to know of the statement being read.
#[derive(Default)]
struct Reader<'a> {
    /// The statement's first words (after any `EXPLAIN` and its options).
    lead: [&'a str; 4],
    /// How many words of the statement were read (after any `EXPLAIN`).
    count: usize,
    previous: &'a str,
    /// Inside `EXPLAIN`'s options: the depth of parentheses, plus one.
    explain: usize,
    /// In `CREATE ...`, before the kind of object.
    create_prefix: bool,
    /// The word before `previous`.
    before_previous: &'a str,
    /// A statement read calls code the proxy cannot read (across statements).
    opaque: bool,
    /// The settings the statements read set or reset (across statements).
    settings: Vec<&'a str>,
}

fn is(word: &str, keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

impl<'a> Reader<'a> {
    fn word(&mut self, word: &'a str) -> Option<PinReason> {
        if word == ";" {
            let reason = self.end();
            *self = Self {
                opaque: self.opaque,
                settings: std::mem::take(&mut self.settings),
                ..Self::default()
            };
            return reason;
        }
        // EXPLAIN [ANALYZE] [VERBOSE] [( options )] statement: the statement runs.
        if self.count == 0 && self.explain == 0 && is(word, "explain") {
            self.explain = 1;
            return None;
        }
        if self.explain > 0 {
            match word {
                "(" => self.explain += 1,
                ")" => self.explain = self.explain.saturating_sub(1).max(1),
                _ if self.explain > 1 => {}
                _ if ["analyze", "analyse", "verbose"]
                    .iter()
                    .any(|k| is(word, k)) => {}
                _ => self.explain = 0,
            }
            if self.explain > 0 {
                return None;
            }
        }
        if let Some(lead) = self.lead.get_mut(self.count) {
            *lead = word;
        }
        self.count += 1;
        let previous = std::mem::replace(&mut self.previous, word);
        let before_previous = std::mem::replace(&mut self.before_previous, previous);
        if self.count == 1 {
            match () {
                () if is(word, "do") || is(word, "call") => self.opaque = true,
                () if is(word, "listen") => return Some(PinReason::Listen),
                () if is(word, "prepare") => return Some(PinReason::Prepare),
                () if is(word, "load") => return Some(PinReason::Other),
                () if is(word, "create") => self.create_prefix = true,
                () => {}
            }
            return None;
        }
        // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] {TABLE | VIEW |
        // SEQUENCE} ...
        if self.create_prefix {
            if ["table", "view", "sequence", "("]
                .iter()
                .any(|k| is(word, k))
            {
                self.create_prefix = false;
            } else if is(word, "temp") || is(word, "temporary") {
                return Some(PinReason::Temporary);
            }
        }
        if is(self.lead[0], "declare") && is(previous, "with") && is(word, "hold") {
            return Some(PinReason::HoldCursor);
        }
        // SELECT ... INTO TEMP, and any object in the session's temporary schema (`pg_temp.t`,
        // `"pg_temp".t`, `pg_temp . t`).
        let schema = word.split_once('.').map(|(schema, _)| schema);
        if (is(previous, "into") && (is(word, "temp") || is(word, "temporary")))
            || schema.is_some_and(is_temp_schema)
            || (word == "." && is_temp_schema(previous))
        {
            return Some(PinReason::Temporary);
        }
        if word == "(" {
            let quoted = previous.starts_with('"');
            let qualified = previous.trim_matches('"');
            let name = qualified.rsplit('.').next().unwrap_or(qualified);
            let session = SESSION_FUNCTIONS
                .iter()
                .find(|(function, _)| is(name, function));
            if let Some((_, reason)) = session {
                return Some(*reason);
            }
            self.opaque |= calls_unknown(previous, before_previous, quoted);
        }
        None
    }

    /// The rules that need the statement's first words: `SET`, `RESET`, `DEALLOCATE` and
    /// `DISCARD`. A session setting is recorded, to follow its client; the tracked parameters
    /// need nothing (the server reports them); what cannot be replayed as a setting pins: another role or session
    /// authorization (an identity, not a setting), `SET SESSION CHARACTERISTICS`, `SET XML
    /// OPTION`, `SET SEED`, and a quoted name with a dot (`"app"."x"`).
    fn end(&mut self) -> Option<PinReason> {
        let [first, second, third, fourth] = self.lead;
        // `DEALLOCATE [PREPARE] ALL` and `DISCARD` leave nothing: they drop what the session
        // has, and the relay drops the client's statements and settings with it. Deallocating
        // one statement by its name may be another client's (its name is in
        // `pg_prepared_statements`): that pins, so that the connection is reset after.
        if is(first, "deallocate") {
            let all = is(second, "all") || (is(second, "prepare") && is(third, "all"));
            return (!all).then_some(PinReason::Prepare);
        }
        if is(first, "discard") {
            return None;
        }
        let (name, next) = if is(first, "set") {
            match second {
                _ if ["local", "transaction", "constraints"]
                    .iter()
                    .any(|k| is(second, k)) =>
                {
                    return None;
                }
                _ if is(second, "session") => (third, fourth),
                _ => (second, third),
            }
        } else if is(first, "reset") {
            (second, third)
        } else {
            return None;
        };
        // SET TIME ZONE and SET NAMES are TimeZone and client_encoding.
        let tracked = (is(name, "time") && is(next, "zone"))
            || is(name, "names")
            || crate::tracked::client_index(name).is_some();
        if tracked || name.is_empty() || name == ";" {
            return None;
        }
        let identity = [
            "role",
            "session",
            "authorization",
            "characteristics",
            "xml",
            "seed",
        ];
        if next == "." || identity.iter().any(|k| is(name, k)) {
            return Some(PinReason::Set);
        }
        // "SET SCHEMA 'value' is an alias for SET search_path TO value."
        self.settings.push(if is(name, "schema") {
            "search_path"
        } else {
            name
        });
        None
    }
}

/// Whether `name (`, after `before`, may call a function defined on the server: a name not
/// among [`KNOWN`] (quoted, or in a schema other than `pg_catalog`, it is never taken for a
/// built-in one). `INSERT INTO t (…)`, `TABLE t (…)`, `IF NOT EXISTS t (…)` and `REFERENCES t
/// (…)` name a table's columns; a `(` after anything else than a name (`= (`, `, (`) opens an
/// expression. A built-in function that runs SQL given as text (`query_to_xml`) is not among
/// them.
fn calls_unknown(name: &str, before: &str, quoted: bool) -> bool {
    if name.is_empty() || matches!(name, "," | "(" | ")" | ";" | ".") {
        return false;
    }
    if ["into", "table", "exists", "references"]
        .iter()
        .any(|k| is(before, k))
    {
        return false;
    }
    let (schema, function) = match name.rsplit_once('.') {
        Some((schema, function)) => (Some(schema), function),
        None => (None, name),
    };
    quoted
        || before == "."
        || schema.is_some_and(|schema| !is(schema, "pg_catalog"))
        || KNOWN
            .binary_search_by(|known| cmp_ignore_case(known, function))
            .is_err()
}

fn cmp_ignore_case(known: &str, word: &str) -> std::cmp::Ordering {
    known
        .bytes()
        .cmp(word.bytes().map(|b| b.to_ascii_lowercase()))
}

/// Splits SQL into words, `(`, `)` and `;` (slices of `sql`), handing each to `on` until it
/// answers; comments and string literals are skipped, and a quoted identifier is the word
/// it quotes. The text of dollar-quoted strings is read as SQL as well (function and `DO`
/// bodies), and inside such a body so are string literals (PL/pgSQL's `EXECUTE '…'`), down
/// to [`MAX_DEPTH`] levels. Total on any input.
fn tokenize<'a>(
    sql: &'a str,
    depth: usize,
    strings: Strings,
    on: &mut impl FnMut(&'a str) -> Option<PinReason>,
) -> Option<PinReason> {
    let bytes = sql.as_bytes();
    // Every slice taken starts and ends next to an ASCII byte, so at a character boundary.
    let text = |from: usize, to: usize| sql.get(from..to).unwrap_or_default();
    let mut i = 0;
    // The literal that follows is an `E'…'` one.
    let mut escaped = false;
    while i < bytes.len() {
        let c = bytes[i];
        let found = match c {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = find(bytes, i, b"\n").unwrap_or(bytes.len());
                None
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(bytes, i);
                None
            }
            b'\'' => {
                let backslashes = strings.backslashes || std::mem::take(&mut escaped);
                let (end, inner) = quoted(sql, i, b'\'', backslashes);
                i = end;
                literal(inner, backslashes, depth, strings, on)
            }
            b'"' => {
                let start = i;
                let (end, inner) = quoted(sql, i, b'"', false);
                i = end;
                // A quoted name that is called keeps its quotes: it is never a built-in's.
                match next_visible(bytes, end) {
                    Some(b'(') => on(text(start, end)),
                    _ => on(inner),
                }
            }
            b'$' => match dollar_tag(bytes, i) {
                Some(tag) => {
                    let body_start = i + tag.len();
                    let end = find(bytes, body_start, tag).unwrap_or(bytes.len());
                    i = (end + tag.len()).min(bytes.len());
                    // The body may be a function's or a DO block's: read it as SQL.
                    sql_text(text(body_start, end), depth, strings, on)
                }
                None => {
                    i += 1;
                    None
                }
            },
            // A `(` after what is not a name (`= (`, `, (`) follows a "," here, so that the
            // word before is not taken for a function's name.
            b'(' if !bytes[..i]
                .iter()
                .rev()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'"') || *b >= 0x80
                }) =>
            {
                i += 1;
                on(",").or_else(|| on("("))
            }
            b';' | b'(' | b')' | b'.' => {
                i += 1;
                on(text(i - 1, i))
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                i = word_end(bytes, i);
                let word = text(start, i);
                match prefix(word, &bytes[i..]) {
                    Some(Prefix::String { escapes }) => {
                        escaped = escapes;
                        None
                    }
                    Some(Prefix::Unicode) => Some(PinReason::Other),
                    None => on(word),
                }
            }
            _ => {
                i += 1;
                None
            }
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// A string literal's text, `inner`: read as SQL inside a body (PL/pgSQL's `EXECUTE '…'`),
/// unless its escapes are read (`backslashes`) and it has one (`EXECUTE E'\163et …'`): its
/// text is then not what runs, and it pins.
fn literal<'a>(
    inner: &'a str,
    backslashes: bool,
    depth: usize,
    strings: Strings,
    on: &mut impl FnMut(&'a str) -> Option<PinReason>,
) -> Option<PinReason> {
    match depth {
        0 => None,
        _ if backslashes && inner.contains('\\') => Some(PinReason::Other),
        _ => sql_text(inner, depth, strings, on),
    }
}

/// The index after the word (or number, or name with its schema) that starts at `start`.
fn word_end(bytes: &[u8], start: usize) -> usize {
    let len = bytes[start..].iter().position(|b| {
        !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.') || *b >= 0x80)
    });
    start + len.unwrap_or(bytes.len() - start)
}

/// A word that prefixes what follows it rather than standing alone.
enum Prefix {
    /// `E'…'`, `B'…'`, `X'…'` or `N'…'`: a string constant, whose backslashes escape after `E`.
    String { escapes: bool },
    /// `U&"…"` or `U&'…'` (with any `UESCAPE`): Unicode escapes could spell any name, so the
    /// text is not read, and it pins.
    Unicode,
}

/// What `word` prefixes, given the text that follows it (`rest`).
fn prefix(word: &str, rest: &[u8]) -> Option<Prefix> {
    match rest {
        [b'\'', ..] if word.len() == 1 && "eEbBxXnN".contains(word) => Some(Prefix::String {
            escapes: word.eq_ignore_ascii_case("e"),
        }),
        [b'&', b'\'' | b'"', ..] if word.eq_ignore_ascii_case("u") => Some(Prefix::Unicode),
        _ => None,
    }
}

/// The literal quoted with `quote` that starts at `start`: the index after it, and its text.
fn quoted(sql: &str, start: usize, quote: u8, backslashes: bool) -> (usize, &str) {
    let end = skip_quoted(sql.as_bytes(), start, quote, backslashes);
    // Both ends are next to an ASCII quote, so at character boundaries.
    let inner = sql.get(start + 1..end.saturating_sub(1).max(start + 1));
    (end, inner.unwrap_or_default())
}

/// The index after the block comment starting at `start` (comments nest in PostgreSQL).
fn block_comment_end(bytes: &[u8], start: usize) -> usize {
    let mut nesting = 0usize;
    let mut i = start;
    while i < bytes.len() {
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            nesting += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
            nesting -= 1;
            i += 2;
            if nesting == 0 {
                break;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// How deep bodies within bodies are read; deeper text is not SQL anyone writes, and the bound
/// keeps the recursion's stack small whatever a client sends.
const MAX_DEPTH: usize = 8;

/// Reads text found inside a statement as statements of their own.
fn sql_text<'a>(
    text: &'a str,
    depth: usize,
    strings: Strings,
    on: &mut impl FnMut(&'a str) -> Option<PinReason>,
) -> Option<PinReason> {
    if depth >= MAX_DEPTH {
        return None;
    }
    on(";")
        .or_else(|| tokenize(text, depth + 1, strings, on))
        .or_else(|| on(";"))
}

/// The index after a literal quoted with `quote` starting at `start`: a doubled quote stands
/// for one, and with `backslashes` a backslash escapes the next character.
fn skip_quoted(bytes: &[u8], start: usize, quote: u8, backslashes: bool) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        if bytes[i] == b'\\' && backslashes {
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

/// The first byte from `from` that is not white space.
fn next_visible(bytes: &[u8], from: usize) -> Option<u8> {
    bytes
        .get(from..)?
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
}

fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| from + at)
}

mod known;
#[cfg(test)]
mod tests;
