//! The settings of one pool ([`PoolConfig`]), each defined once — its field, its name as a
//! setting (the `--flag`, the file key), its default — and resolved once per pool: the
//! proxy's value, then its instance's, its database's and its role's ([`PoolOverrides`]), as
//! PgBouncer's `[databases]`/`[users]` and PgDog's per-user pools override the general ones.

use std::time::Duration;

/// How client sessions get server connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// Each client session logs in a server connection of its own, closed with it: for
    /// clients that need a dedicated connection (or a replication one).
    None,
    /// A client gets a pooled server connection for its whole session; when it leaves, the
    /// connection is reset (`DISCARD ALL`) and kept for the next client (PgBouncer's
    /// `pool_mode = session`).
    #[default]
    Session,
    /// A client holds a pooled server connection only for each of its transactions: from its
    /// first message until the server is idle again (`ReadyForQuery` `I`); between
    /// transactions the connection serves other clients (PgBouncer's `pool_mode =
    /// transaction`). Prepared statements work; session state pins a client to its
    /// connection (see the README).
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(Self::None),
            "session" => Ok(Self::Session),
            "transaction" => Ok(Self::Transaction),
            other => Err(format!(
                "pool mode {other:?}: use none, session or transaction"
            )),
        }
    }
}

impl PoolMode {
    /// The mode's name, as `--pool-mode` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// When transaction pooling checks a server connection's session state on the server before it
/// goes back: another role, a listen, a session advisory lock, a temporary relation, a cursor
/// `WITH HOLD` or a statement prepared with SQL pins its client, and its settings are reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateCheck {
    /// After a transaction that ran code the proxy cannot read in its text: a function the
    /// server defines, a `DO` block, a procedure.
    #[default]
    Opaque,
    /// After every transaction: also catches what views, triggers, column defaults and
    /// operators run, at the cost of a round trip per transaction.
    Always,
}

impl std::str::FromStr for StateCheck {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "opaque" => Ok(Self::Opaque),
            "always" => Ok(Self::Always),
            other => Err(format!("state check {other:?}: use opaque or always")),
        }
    }
}

impl StateCheck {
    /// The setting's value, as `--state-check` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opaque => "opaque",
            Self::Always => "always",
        }
    }
}

impl Shown for StateCheck {
    fn shown(&self) -> String {
        self.as_str().into()
    }
}

/// A setting's value as `--help` and the documentation show it.
trait Shown {
    fn shown(&self) -> String;
}

impl Shown for usize {
    fn shown(&self) -> String {
        self.to_string()
    }
}

impl Shown for Duration {
    fn shown(&self) -> String {
        humantime_like(*self)
    }
}

impl Shown for Option<Duration> {
    fn shown(&self) -> String {
        self.map_or_else(|| "off".into(), humantime_like)
    }
}

impl Shown for String {
    fn shown(&self) -> String {
        self.clone()
    }
}

impl Shown for PoolMode {
    fn shown(&self) -> String {
        self.as_str().into()
    }
}

/// A duration as the flags take it: `1h`, `10m`, `30s`, `250ms`.
pub(crate) fn humantime_like(duration: Duration) -> String {
    let ms = duration.as_millis();
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// Defines [`PoolConfig`] and [`PoolOverrides`] from one list: each field with its setting's
/// name and its default.
macro_rules! pool_settings {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty = $default:expr, $key:literal; )*) => {
        /// The settings of a pool: per upstream, role, database and the startup parameters
        /// that shape a session. [`Default`] gives the defaults, which [`PoolConfig::defaults`]
        /// lists; [`ProxyConfig::pool_settings`](crate::ProxyConfig::pool_settings) resolves
        /// them for one pool.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct PoolConfig {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Default for PoolConfig {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        /// Settings of a pool that override the proxy's, for an instance, a database or a
        /// role: each `None` leaves the value as it is.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct PoolOverrides {
            $( $(#[$doc])* pub $field: Option<$ty>, )*
        }

        impl PoolConfig {
            /// Each setting's name (as a flag in snake case, and as a file key) and its
            /// default, as `--help` shows it.
            pub fn defaults() -> Vec<(&'static str, String)> {
                let defaults = Self::default();
                vec![$( ($key, Shown::shown(&defaults.$field)), )*]
            }

            /// These settings with `overrides` applied.
            pub fn apply(&mut self, overrides: &PoolOverrides) {
                $( if let Some(value) = &overrides.$field { self.$field = value.clone(); } )*
            }
        }
    };
}

pool_settings! {
    /// The pool mode.
    mode: PoolMode = PoolMode::Session, "pool_mode";
    /// Server connections per pool.
    size: usize = 20, "pool_size";
    /// Idle server connections the pool keeps open; the pool of an instance's own role and
    /// database (when the upstream names one) is filled at start.
    min_idle: usize = 0, "min_pool_size";
    /// How long a server connection lives; never longer than the token it logged in with is
    /// valid, so a revoked identity loses access.
    server_lifetime: Duration = Duration::from_secs(3600), "server_lifetime";
    /// How long a server connection may stay idle before it is closed.
    idle_timeout: Duration = Duration::from_secs(600), "server_idle_timeout";
    /// A connection idle longer than this is checked with an empty query before a client gets
    /// it; one the server closed is never handed out, whatever its age.
    check_delay: Duration = Duration::from_secs(30), "server_check_delay";
    /// What resets a connection when its client leaves (empty: none).
    reset_query: String = "DISCARD ALL".into(), "server_reset_query";
    /// How long a client waits for a server connection when the pool is full (never past its
    /// login timeout); then it gets SQLSTATE 53300.
    queue_timeout: Duration = Duration::from_secs(30), "queue_timeout";
    /// In transaction pooling, how many statements the proxy keeps prepared on each server
    /// connection for its clients (as PgBouncer's `max_prepared_statements`); past it, the
    /// least recently used is closed, and prepared again when a client needs it.
    max_prepared_statements: usize = 200, "max_prepared_statements";
    /// A client idle between transactions this long is disconnected (FATAL 57P05, as
    /// PostgreSQL's `idle_session_timeout`); `None`: never.
    client_idle_timeout: Option<Duration> = None, "client_idle_timeout";
    /// A client idle inside a transaction this long is disconnected and its transaction rolled
    /// back (FATAL 25P03, as PostgreSQL's `idle_in_transaction_session_timeout`); `None`:
    /// never.
    idle_transaction_timeout: Option<Duration> = None, "idle_transaction_timeout";
    /// A query running this long is cancelled (the client gets 57014), and the session ended
    /// if it does not stop; `None`: never.
    query_timeout: Option<Duration> = None, "query_timeout";
    /// A transaction (or a statement outside one) running this long ends the session (FATAL
    /// 25P04, as PostgreSQL 17's `transaction_timeout`); `None`: never.
    transaction_timeout: Option<Duration> = None, "transaction_timeout";
    /// In transaction pooling, when a server connection's session state is checked on the
    /// server before it goes back: after code the proxy cannot read, or after every
    /// transaction.
    state_check: StateCheck = StateCheck::Opaque, "state_check";
    /// A client that sent part of a message and then nothing for this long, while it holds a
    /// server connection, is disconnected (FATAL 08006) and the connection closed; `None`:
    /// never.
    client_stall_timeout: Option<Duration> = Some(Duration::from_secs(60)), "client_stall_timeout";
}

impl PoolConfig {
    /// Checks the settings of a pool; `whose` names them in the error.
    pub(crate) fn validate(&self, whose: &str) -> Result<(), String> {
        if self.size == 0 {
            return Err(format!("{whose}: the pool size must be at least 1"));
        }
        if self.max_prepared_statements == 0 {
            return Err(format!(
                "{whose}: max_prepared_statements must be at least 1"
            ));
        }
        if self.min_idle > self.size {
            return Err(format!(
                "{whose}: the minimum of idle server connections ({}) is more than the pool size ({})",
                self.min_idle, self.size
            ));
        }
        let zero = [
            ("client_idle_timeout", self.client_idle_timeout),
            ("idle_transaction_timeout", self.idle_transaction_timeout),
            ("query_timeout", self.query_timeout),
            ("transaction_timeout", self.transaction_timeout),
            ("client_stall_timeout", self.client_stall_timeout),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, t)| *t == Some(Duration::ZERO)) {
            return Err(format!(
                "{whose}: {name} must be longer than zero (None turns it off)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_in_order_and_defaults_are_listed_once() {
        let mut settings = PoolConfig::default();
        let database = PoolOverrides {
            size: Some(5),
            mode: Some(PoolMode::Transaction),
            ..PoolOverrides::default()
        };
        let role = PoolOverrides {
            size: Some(2),
            query_timeout: Some(Some(Duration::from_secs(3))),
            ..PoolOverrides::default()
        };
        settings.apply(&database);
        settings.apply(&role);
        assert_eq!(settings.size, 2);
        assert_eq!(settings.mode, PoolMode::Transaction);
        assert_eq!(settings.query_timeout, Some(Duration::from_secs(3)));
        assert_eq!(settings.reset_query, "DISCARD ALL");
        let defaults = PoolConfig::defaults();
        let shown = |key| defaults.iter().find(|(k, _)| *k == key).unwrap().1.clone();
        assert_eq!(shown("pool_size"), "20");
        assert_eq!(shown("server_lifetime"), "1h");
        assert_eq!(shown("server_idle_timeout"), "10m");
        assert_eq!(shown("query_timeout"), "off");
        assert_eq!(shown("client_stall_timeout"), "1m");
        assert_eq!(shown("pool_mode"), "session");
        assert_eq!(humantime_like(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn impossible_settings_are_named() {
        let mut settings = PoolConfig {
            size: 2,
            min_idle: 3,
            ..PoolConfig::default()
        };
        let error = settings.validate("database app").unwrap_err();
        assert!(error.starts_with("database app: the minimum"), "{error}");
        settings.min_idle = 0;
        settings.query_timeout = Some(Duration::ZERO);
        assert!(
            settings
                .validate("x")
                .unwrap_err()
                .contains("query_timeout")
        );
    }
}
