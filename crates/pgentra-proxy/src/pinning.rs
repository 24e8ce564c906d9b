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
use calls::{calls, calls_unknown};
#[cfg(test)]
use known::KNOWN;
use tokens::tokenize;

/// Why a session was pinned, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinReason {
    /// `SET ROLE`, `SET SESSION AUTHORIZATION` and the rest that cannot be replayed as a
    /// setting, a `set_config(…)` of a name the proxy cannot read, more settings than a client
    /// may record, or a reported parameter change.
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

/// Functions whose effect outlives the transaction (and `set_config`, read apart).
const SESSION_FUNCTIONS: [(&str, PinReason); 4] = [
    ("pg_advisory_lock", PinReason::AdvisoryLock),
    ("pg_advisory_lock_shared", PinReason::AdvisoryLock),
    ("pg_try_advisory_lock", PinReason::AdvisoryLock),
    ("pg_try_advisory_lock_shared", PinReason::AdvisoryLock),
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
        // Only a call could matter: read the names before each `(`, unless a comment or a
        // quoted name could hide what precedes one.
        return match calls(sql) {
            Some(opaque) => opaque.then(|| Effect {
                opaque,
                ..Effect::default()
            }),
            None => effect_of(sql),
        };
    }
    effect_of(sql)
}

/// [`effect`], read by the tokenizer.
fn effect_of(sql: &[u8]) -> Option<Effect> {
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
/// And what makes a statement opaque: `DO` and `CALL` (whose procedure could have a built-in
/// function's name); a call (`(`) in text with none of these is read by [`calls`].
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
    "do",
    "call",
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
    /// The next word is `set_config`'s first argument.
    config_name: bool,
}

fn is(word: &str, keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

impl<'a> Reader<'a> {
    fn word(&mut self, word: &'a str) -> Option<PinReason> {
        // First: whatever follows `set_config(` is its first argument (in a body, a literal
        // read as SQL begins with a ";", and pins).
        if std::mem::take(&mut self.config_name) {
            return self.set_config(word);
        }
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
            if is(name, "set_config") {
                self.config_name = true;
                return None;
            }
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

    /// `set_config(first, …)`: a setting named by a literal is recorded as `SET` is (its value,
    /// and whether it was local, are read back after the transaction); a role or session
    /// authorization, or a name the proxy cannot read, pins.
    fn set_config(&mut self, first: &'a str) -> Option<PinReason> {
        // A literal and its comma: the whole argument (the tokenizer joins them).
        let literal = first.strip_suffix(',').map(str::trim_end);
        let name = (literal.and_then(|l| l.strip_prefix('\'')?.strip_suffix('\'')))
            .filter(|name| !name.is_empty() && name.bytes().all(calls::is_name_byte));
        match name {
            Some(name)
                if !["role", "session_authorization"]
                    .iter()
                    .any(|k| is(name, k)) =>
            {
                self.settings.push(name);
                None
            }
            _ => Some(PinReason::Set),
        }
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

mod calls;
mod known;
#[cfg(test)]
mod tests;
mod tokens;
