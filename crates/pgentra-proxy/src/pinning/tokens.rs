//! SQL split into words as PostgreSQL reads it: comments and string literals skipped, quoted
//! names read as the names they quote, and the bodies of dollar-quoted strings (function and
//! `DO` bodies) read as SQL too.

use super::calls::is_name_byte;
use super::{PinReason, Strings};

/// Splits SQL into words, `(`, `)` and `;` (slices of `sql`), handing each to `on` until it
/// answers; comments and string literals are skipped, and a quoted identifier is the word
/// it quotes. The text of dollar-quoted strings is read as SQL as well (function and `DO`
/// bodies), and inside such a body so are string literals (PL/pgSQL's `EXECUTE '…'`), down
/// to [`MAX_DEPTH`] levels. Total on any input.
pub(super) fn tokenize<'a>(
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
    // What precedes, but for white space and comments, is a name (or a word).
    let mut after_name = false;
    while i < bytes.len() {
        let c = bytes[i];
        let mut name = false;
        let found = match c {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = find(bytes, i, b"\n").unwrap_or(bytes.len());
                name = after_name;
                None
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(bytes, i);
                name = after_name;
                None
            }
            b'\'' => {
                let start = i;
                let backslashes = strings.backslashes || std::mem::take(&mut escaped);
                let (end, inner) = quoted(sql, i, b'\'', backslashes);
                i = end;
                match depth {
                    // A literal in the statement itself is a word of its own, quotes and all,
                    // and with the comma that follows it, if one does (`set_config('name',`).
                    0 => {
                        let rest = bytes[end..].iter().position(|b| !b.is_ascii_whitespace());
                        let comma = rest.filter(|at| bytes[end + at] == b',');
                        on(text(start, comma.map_or(end, |at| end + at + 1)))
                    }
                    _ => literal(inner, backslashes, depth, strings, on),
                }
            }
            b'"' => {
                let start = i;
                let (end, inner) = quoted(sql, i, b'"', false);
                i = end;
                name = true;
                // A quoted name that is called keeps its quotes: it is never a built-in's.
                match next_visible(bytes, end) {
                    Some(b'(') => on(text(start, end)),
                    _ => on(inner),
                }
            }
            b'$' => {
                let (end, body) = match dollar_tag(bytes, i) {
                    Some(tag) => {
                        let body_start = i + tag.len();
                        let end = find(bytes, body_start, tag).unwrap_or(bytes.len());
                        (
                            (end + tag.len()).min(bytes.len()),
                            Some(text(body_start, end)),
                        )
                    }
                    None => (i + 1, None),
                };
                i = end;
                match body {
                    // The body may be a function's or a DO block's: read it as SQL.
                    Some(body) => sql_text(body, depth, strings, on),
                    // A parameter (`$1`): a word of its own.
                    None => on("$"),
                }
            }
            // A `(` after what is not a name (`= (`, `, (`) follows a "," here, so that the
            // word before is not taken for a function's name.
            b'(' if !after_name => {
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
                    None => {
                        name = true;
                        on(word)
                    }
                }
            }
            _ => {
                i += 1;
                name = after_name && c.is_ascii_whitespace();
                None
            }
        };
        if found.is_some() {
            return found;
        }
        after_name = name;
    }
    None
}

/// The text of a string literal inside a body, `inner`: read as SQL (PL/pgSQL's `EXECUTE
/// '…'`), unless its escapes are read (`backslashes`) and it has one (`EXECUTE E'\163et …'`):
/// its text is then not what runs, and it pins.
fn literal<'a>(
    inner: &'a str,
    backslashes: bool,
    depth: usize,
    strings: Strings,
    on: &mut impl FnMut(&'a str) -> Option<PinReason>,
) -> Option<PinReason> {
    if backslashes && inner.contains('\\') {
        return Some(PinReason::Other);
    }
    sql_text(inner, depth, strings, on)
}

/// The index after the word (or number, or name with its schema) that starts at `start`.
fn word_end(bytes: &[u8], start: usize) -> usize {
    let len = bytes[start..].iter().position(|b| !is_name_byte(*b));
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

pub(super) fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| from + at)
}
