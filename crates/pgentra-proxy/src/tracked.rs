//! The startup parameters the proxy tracks on pooled connections instead of keeping a pool per
//! value.

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

/// The server's name of a tracked parameter, if `name` (in any case) is one.
pub(crate) fn tracked(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .find(|(client, _)| client.eq_ignore_ascii_case(name))
        .map(|(_, server)| *server)
}
