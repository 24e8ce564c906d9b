//! Session settings that follow their client in transaction pooling, instead of pinning it
//! (PgDog re-applies `SET` on each checkout; PgBouncer lets it reach the next client).
//!
//! A transaction whose text sets or resets a setting ([`Effect::settings`]) is followed, before
//! its connection goes back, by one query that reads back the values of every setting the
//! client named or recorded: whatever PostgreSQL made of it — a `SET` in a transaction that
//! committed, rolled back or failed, or behind a savepoint, a `SET LOCAL`, a `RESET ALL` — is
//! what the server shows, and what is recorded. The client's recorded values are set on
//! whichever connection it gets next, and a connection remembers the values set on it, so the
//! same client on the same connection pays nothing and the next client of a connection gets
//! its own values, or `RESET` to the defaults, before its first statement.
//!
//! [`Effect::settings`]: crate::pinning::Effect::settings

use crate::pinning::RESET_ALL;
use crate::tracked::literal;
use std::collections::BTreeMap;

/// Settings one client may have recorded; past them, it is pinned.
pub(crate) const MAX_SETTINGS: usize = 64;
/// The longest value recorded; a longer one pins its client.
pub(crate) const MAX_VALUE: usize = 4096;

/// Session settings and their values (names in lowercase): a client's, or those set on a
/// connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Settings(BTreeMap<String, String>);

/// Settings that could not be recorded: too many, a value too long, or a name that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unrecordable;

impl Settings {
    /// Whether `name` (as the server reports it) is recorded.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains_key(&name.to_ascii_lowercase())
    }

    /// The names to read back after a transaction that named `named`: those and the ones
    /// recorded (all of which a `RESET ALL` may have changed); and the query that reads them.
    pub(crate) fn read_back(&self, named: &[String]) -> (Vec<String>, String) {
        let mut names: Vec<String> = self.0.keys().cloned().collect();
        for name in named {
            if name != RESET_ALL && !names.contains(name) {
                names.push(name.clone());
            }
        }
        let columns: Vec<String> = names
            .iter()
            .map(|name| format!("pg_catalog.current_setting({}, true)", literal(name)))
            .collect();
        (names, format!("SELECT {}", columns.join(", ")))
    }

    /// Records the values read back for `names` (`None`: no such setting).
    pub(crate) fn record(
        &mut self,
        names: Vec<String>,
        values: Vec<Option<String>>,
    ) -> Result<(), Unrecordable> {
        for (name, value) in names.into_iter().zip(values) {
            match value {
                None => drop(self.0.remove(&name)),
                Some(value) => {
                    // RESET takes the name unquoted: only what a setting's name may be.
                    let valid = name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.'));
                    if !valid || value.len() > MAX_VALUE {
                        return Err(Unrecordable);
                    }
                    self.0.insert(name, value);
                }
            }
        }
        if self.0.len() > MAX_SETTINGS {
            return Err(Unrecordable);
        }
        Ok(())
    }

    /// SQL that takes a connection whose settings are `applied` to these: each value that
    /// differs set (with `set_config`, which reads a list such as `search_path` as `SET` does),
    /// and each setting these lack `RESET`; empty when they match.
    pub(crate) fn statements(&self, applied: &Self) -> String {
        let sets: Vec<String> = (self.0.iter())
            .filter(|(name, value)| applied.0.get(*name) != Some(value))
            .map(|(name, value)| {
                let (name, value) = (literal(name), literal(value));
                format!("pg_catalog.set_config({name}, {value}, false)")
            })
            .collect();
        let mut sql = String::new();
        if !sets.is_empty() {
            sql = format!("SELECT {};", sets.join(", "));
        }
        for name in applied.0.keys().filter(|name| !self.0.contains_key(*name)) {
            sql.push_str(&format!("RESET {name};"));
        }
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_are_set_where_they_differ_and_reset_where_absent() {
        let mut client = Settings::default();
        let named = ["search_path".to_owned(), RESET_ALL.to_owned()];
        let (names, sql) = client.read_back(&named);
        assert_eq!(names, ["search_path"]);
        assert_eq!(
            sql,
            "SELECT pg_catalog.current_setting('search_path', true)"
        );
        client
            .record(names, vec![Some("app, public".into())])
            .unwrap();
        let mut applied = Settings::default();
        applied
            .record(
                vec!["app.tenant".into(), "search_path".into()],
                vec![Some("it's 7".into()), Some("app, public".into())],
            )
            .unwrap();
        assert_eq!(client.statements(&applied), "RESET app.tenant;");
        assert_eq!(
            applied.statements(&Settings::default()),
            "SELECT pg_catalog.set_config('app.tenant', 'it''s 7', false), \
             pg_catalog.set_config('search_path', 'app, public', false);"
        );
        assert_eq!(client.statements(&client), "");
        // A setting read back as NULL is no setting; one recorded is read back again.
        let (names, _) = client.read_back(&["x.y".to_owned()]);
        assert_eq!(names, ["search_path", "x.y"]);
        client.record(names, vec![None, None]).unwrap();
        assert_eq!(client, Settings::default());
    }

    #[test]
    fn settings_are_bounded() {
        let mut client = Settings::default();
        let long = "x".repeat(MAX_VALUE + 1);
        assert_eq!(
            client.record(vec!["a.b".into()], vec![Some(long)]),
            Err(Unrecordable)
        );
        let names: Vec<String> = (0..=MAX_SETTINGS).map(|n| format!("app.s{n}")).collect();
        let values = names.iter().map(|_| Some("1".to_owned())).collect();
        assert_eq!(client.record(names, values), Err(Unrecordable));
        assert_eq!(
            client.record(vec!["a;b".into()], vec![Some("1".into())]),
            Err(Unrecordable)
        );
    }
}
