//! Which calls run code the proxy cannot read: a `(` after a name that is not a built-in
//! function's (nor a keyword's, nor a table's before its columns).

use super::is;
use super::known::KNOWN;

/// Whether text with none of [`TRIGGERS`] calls code the proxy cannot read, read without the
/// tokenizer: the name before each `(`, and the word before that name. `None` when the
/// tokenizer must decide: a comment could stand between a name and its `(` (or be read as
/// the name), or a quoted name precedes one. A `(` in a string literal may be taken for a call:
/// that costs a check on the server, never a call missed.
pub(super) fn calls(sql: &[u8]) -> Option<bool> {
    let Some(first) = memchr::memchr(b'(', sql) else {
        return Some(false);
    };
    if memchr::memmem::find(sql, b"--").is_some() || memchr::memmem::find(sql, b"/*").is_some() {
        return None;
    }
    for at in memchr::memchr_iter(b'(', &sql[first..]).map(|at| first + at) {
        let before = trim_end(&sql[..at]);
        let (start, name) = last_name(before);
        if before.last() == Some(&b'"') || (start > 0 && before[start - 1] == b'"') {
            return None;
        }
        if name.first().is_none_or(u8::is_ascii_digit) {
            continue;
        }
        let (_, word) = last_name(trim_end(&before[..start]));
        let (Ok(name), Ok(word)) = (std::str::from_utf8(name), std::str::from_utf8(word)) else {
            return None;
        };
        if calls_unknown(name, word, false) {
            return Some(true);
        }
    }
    Some(false)
}

/// `text` without the white space at its end.
fn trim_end(text: &[u8]) -> &[u8] {
    let end = text.iter().rposition(|b| !b.is_ascii_whitespace());
    &text[..end.map_or(0, |at| at + 1)]
}

/// The name (or number) that ends `text`, and where it starts.
fn last_name(text: &[u8]) -> (usize, &[u8]) {
    let start = text.iter().rposition(|b| !is_name_byte(*b));
    let start = start.map_or(0, |at| at + 1);
    (start, &text[start..])
}

/// A byte of a word, a number or a name with its schema, as [`word_end`] reads them.
pub(super) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.') || b >= 0x80
}

/// Whether `name (`, after `before`, may call a function defined on the server: a name not
/// among [`KNOWN`] (quoted, or in a schema other than `pg_catalog`, it is never taken for a
/// built-in one). `INSERT INTO t (…)`, `TABLE t (…)`, `IF NOT EXISTS t (…)` and `REFERENCES t
/// (…)` name a table's columns; a `(` after anything else than a name (`= (`, `, (`) opens an
/// expression. A built-in function that runs SQL given as text (`query_to_xml`) is not among
/// them.
pub(super) fn calls_unknown(name: &str, before: &str, quoted: bool) -> bool {
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
        || !is_known(function)
}

/// Whether `function` (in any case) is among [`KNOWN`].
fn is_known(function: &str) -> bool {
    // Lowercased on the stack: no name among them is longer.
    let mut lower = [0u8; 32];
    let Some(buffer) = lower.get_mut(..function.len()) else {
        return false;
    };
    for (to, from) in buffer.iter_mut().zip(function.bytes()) {
        *to = from.to_ascii_lowercase();
    }
    KNOWN
        .binary_search_by(|known| known.as_bytes().cmp(buffer))
        .is_ok()
}
