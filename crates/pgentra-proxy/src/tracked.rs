//! The startup parameters the proxy tracks on pooled connections instead of keeping a pool per
//! value, and the `SET` statements that give a connection a client's values of them.

use bytes::Bytes;

/// Startup parameters the proxy sets on a pooled connection with `SET`, rather than keeping a
/// pool per value: the ones PostgreSQL reports with `ParameterStatus`, so their values are
/// tracked as sessions change them (PgBouncer's list, and `IntervalStyle`). Lowercase names
/// match the client's spelling; the second is the server's.
pub(crate) const TRACKED: [(&str, &str); 6] = [
    ("application_name", "application_name"),
    ("client_encoding", "client_encoding"),
    ("datestyle", "DateStyle"),
    ("timezone", "TimeZone"),
    ("intervalstyle", "IntervalStyle"),
    ("standard_conforming_strings", "standard_conforming_strings"),
];

/// The index in [`TRACKED`] of a parameter as a client spells it (in any case).
pub(crate) fn client_index(name: &str) -> Option<usize> {
    TRACKED
        .iter()
        .position(|(client, _)| client.eq_ignore_ascii_case(name))
}

/// The index in [`TRACKED`] of a parameter as the server reports it.
pub(crate) fn server_index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|(_, server)| *server == name)
}

/// A value for each tracked parameter, or none: a client's, or what a server reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tracked([Option<Bytes>; TRACKED.len()]);

impl Tracked {
    pub(crate) fn get(&self, index: usize) -> Option<&Bytes> {
        self.0[index].as_ref()
    }

    pub(crate) fn set(&mut self, index: usize, value: Bytes) {
        self.0[index] = Some(value);
    }

    /// `SET` statements that take a server whose values are `current` to these values, and to
    /// the server's `defaults` for those without one; empty when they already match.
    pub(crate) fn set_statements(&self, current: &Self, defaults: &Self) -> String {
        let mut sql = String::new();
        for (index, (_, name)) in TRACKED.iter().enumerate() {
            let Some(wanted) = self.get(index).or_else(|| defaults.get(index)) else {
                continue;
            };
            if current.get(index) == Some(wanted) {
                continue;
            }
            // PostgreSQL keeps only the ASCII of a startup message's application_name
            // (non-ASCII bytes become '?'), and a query's text must be valid in its encoding.
            let value: String = if index == 0 {
                wanted
                    .iter()
                    .map(|b| if b.is_ascii() { char::from(*b) } else { '?' })
                    .collect()
            } else {
                String::from_utf8_lossy(wanted).into_owned()
            };
            sql.push_str(&format!("SET {name} TO {};", literal(&value)));
        }
        sql
    }
}

/// `value` as a string constant: a backslash stands for itself only in an escape string
/// (`E'…'`), whatever the connection's `standard_conforming_strings` ("Any other character
/// following a backslash is taken literally. Thus, to include a backslash character, write two
/// backslashes (`\\`)", PostgreSQL docs 4.1.2.2).
pub(crate) fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_values_that_differ_are_set_and_quoted() {
        let mut client = Tracked::default();
        client.set(0, Bytes::from_static(b"it's \\ app\xc3\xa9"));
        client.set(3, Bytes::from_static(b"UTC"));
        let mut defaults = Tracked::default();
        defaults.set(2, Bytes::from_static(b"ISO, MDY"));
        defaults.set(3, Bytes::from_static(b"Europe/Paris"));
        let mut current = defaults.clone();
        assert_eq!(
            client.set_statements(&current, &defaults),
            "SET application_name TO E'it''s \\\\ app??';SET TimeZone TO 'UTC';"
        );
        current.set(0, client.get(0).unwrap().clone());
        current.set(3, Bytes::from_static(b"UTC"));
        assert_eq!(client.set_statements(&current, &defaults), "");
        // A value the client did not send goes back to the server's default.
        current.set(2, Bytes::from_static(b"German"));
        assert_eq!(
            client.set_statements(&current, &defaults),
            "SET DateStyle TO 'ISO, MDY';"
        );
        assert_eq!(client_index("TimeZone"), Some(3));
        assert_eq!(server_index("timezone"), None);
        assert_eq!(server_index("TimeZone"), Some(3));
    }
}
