//! Why the proxy refuses a client, as one typed value: each reason has its SQLSTATE, its
//! message and hint, and its label in the metrics, so no stage writes an error of its own and
//! no refusal goes uncounted.

use pgentra_wire::ErrorFields;
use std::time::Duration;

/// A refusal the client is told about with a `FATAL` error before the connection closes.
#[derive(Debug)]
pub enum Refusal {
    /// `--max-connections` sessions are open.
    TooManyClients {
        /// The limit.
        limit: usize,
    },
    /// Too many clients are in the startup phase at once.
    TooManyLogins {
        /// The limit.
        limit: usize,
    },
    /// The proxy is draining after SIGTERM.
    ShuttingDown,
    /// The client gave the wrong local password.
    ClientPassword {
        /// The user name the client sent.
        user: String,
    },
    /// The client asked for a protocol version other than 3.x.
    ProtocolVersion {
        /// Its major version.
        major: u16,
        /// Its minor version.
        minor: u16,
    },
    /// The client's startup packet breaks the protocol.
    InvalidStartup(String),
    /// The client's startup parameters set the role (`role` or `session_authorization`, on
    /// their own or in `options`): this setting, as it spelled it.
    RoleSetting(String),
    /// The client did not finish its startup (or its password) within the login timeout.
    StartupTimeout(Duration),
    /// No token within the login deadline.
    TokenTimeout(Duration),
    /// The credential failed.
    Token(pgentra::Error),
    /// The upstream server could not be reached, or its TLS could not be verified.
    ServerUnreachable {
        /// `host:port`.
        upstream: String,
        /// What failed.
        error: String,
    },
    /// The upstream login did not finish within the login deadline.
    ServerTimeout {
        /// `host:port`.
        upstream: String,
        /// The deadline.
        limit: Duration,
    },
    /// The server wants an authentication method other than a password.
    ServerAuthMethod {
        /// The `AuthenticationRequest` code.
        method: i32,
        /// The role the proxy asked for.
        role: String,
    },
    /// The server refused the login with its own error, relayed with a hint added.
    ServerRefused(ErrorFields),
    /// The server closed the connection, or broke the protocol, during the login.
    ServerBroke {
        /// `host:port`.
        upstream: String,
        /// What happened.
        what: String,
    },
    /// The startup message the proxy would forward is over PostgreSQL's limit.
    ForwardedStartupTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// No server connection became free within the queue timeout.
    QueueTimeout {
        /// The timeout.
        limit: Duration,
    },
    /// A logged-in client sent what is not the protocol (transaction pooling reads every
    /// message).
    ClientProtocol(String),
    /// The server connection a logged-in client was using broke.
    ServerLost {
        /// `host:port`.
        upstream: String,
        /// What happened.
        what: String,
    },
    /// The proxy is draining, and a client between transactions is told to go.
    SessionShutdown,
    /// A client in transaction pooling prepared more statements (or bytes of them) than the
    /// proxy keeps for one.
    TooManyStatements {
        /// The limit of statements.
        limit: usize,
        /// The limit of their bytes.
        bytes: usize,
    },
    /// The client was idle between transactions past `client_idle_timeout`.
    ClientIdleTimeout(Duration),
    /// The client was idle inside a transaction past `idle_transaction_timeout`.
    IdleInTransactionTimeout(Duration),
    /// The client's transaction ran past `transaction_timeout`.
    TransactionTimeout(Duration),
    /// The client's query ran past `query_timeout` and did not stop when cancelled.
    QueryTimeout(Duration),
    /// The client sent part of a message and then nothing for `client_stall_timeout`.
    ClientStalled(Duration),
    /// Something inside the proxy failed (the OS gave no random bytes, say).
    Internal(String),
}

/// The reason of a refusal, as a metrics label. Every [`Refusal`] has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    MaxConnections,
    PendingLogins,
    ShuttingDown,
    ClientPassword,
    Protocol,
    LoginTimeout,
    Token,
    UpstreamConnect,
    UpstreamAuth,
    UpstreamLogin,
    UpstreamLost,
    QueueTimeout,
    Timeout,
    Internal,
}

impl Reason {
    /// Every reason, in the order of [`Metrics`](crate::Metrics)' counters.
    pub(crate) const ALL: [Self; 14] = [
        Self::MaxConnections,
        Self::PendingLogins,
        Self::ShuttingDown,
        Self::ClientPassword,
        Self::Protocol,
        Self::LoginTimeout,
        Self::Token,
        Self::UpstreamConnect,
        Self::UpstreamAuth,
        Self::UpstreamLogin,
        Self::UpstreamLost,
        Self::QueueTimeout,
        Self::Timeout,
        Self::Internal,
    ];

    /// The value of the `reason` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::PendingLogins => "pending_logins",
            Self::ShuttingDown => "shutting_down",
            Self::ClientPassword => "client_password",
            Self::Protocol => "protocol",
            Self::LoginTimeout => "login_timeout",
            Self::Token => "token",
            Self::UpstreamConnect => "upstream_connect",
            Self::UpstreamAuth => "upstream_auth",
            Self::UpstreamLogin => "upstream_login",
            Self::UpstreamLost => "upstream_lost",
            Self::QueueTimeout => "queue_timeout",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
        }
    }

    /// This reason's index in [`ALL`](Self::ALL).
    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

const CHECK_HINT: &str = "Run `pgentra check` against the server to find the failing step.";

/// The message of a refusal no group answers (none: a test checks every refusal).
const UNEXPLAINED: &str = "pgentra proxy: an unexplained refusal";

fn fatal(code: &str, message: &str, hint: Option<&str>) -> ErrorFields {
    ErrorFields::fatal(code, message, hint)
}

impl Refusal {
    /// The metrics label of this refusal.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Self::TooManyClients { .. } => Reason::MaxConnections,
            Self::TooManyLogins { .. } => Reason::PendingLogins,
            Self::ShuttingDown | Self::SessionShutdown => Reason::ShuttingDown,
            Self::ClientPassword { .. } => Reason::ClientPassword,
            Self::ProtocolVersion { .. }
            | Self::InvalidStartup(_)
            | Self::RoleSetting(_)
            | Self::ForwardedStartupTooLong { .. }
            | Self::ClientProtocol(_)
            | Self::TooManyStatements { .. } => Reason::Protocol,
            Self::StartupTimeout(_) | Self::TokenTimeout(_) | Self::ServerTimeout { .. } => {
                Reason::LoginTimeout
            }
            Self::Token(_) => Reason::Token,
            Self::ServerUnreachable { .. } => Reason::UpstreamConnect,
            Self::ServerAuthMethod { .. } => Reason::UpstreamAuth,
            Self::ServerRefused(_) | Self::ServerBroke { .. } => Reason::UpstreamLogin,
            Self::ServerLost { .. } => Reason::UpstreamLost,
            Self::QueueTimeout { .. } => Reason::QueueTimeout,
            Self::ClientIdleTimeout(_)
            | Self::IdleInTransactionTimeout(_)
            | Self::TransactionTimeout(_)
            | Self::QueryTimeout(_)
            | Self::ClientStalled(_) => Reason::Timeout,
            Self::Internal(_) => Reason::Internal,
        }
    }

    /// The `FATAL` error the client gets.
    pub fn fields(&self) -> ErrorFields {
        (self.startup_fields())
            .or_else(|| self.upstream_fields())
            .or_else(|| self.session_fields())
            .unwrap_or_else(|| fatal("XX000", UNEXPLAINED, None))
    }

    /// The `FATAL` of a refusal of the client's startup, or of its slot.
    fn startup_fields(&self) -> Option<ErrorFields> {
        Some(match self {
            // PostgreSQL's own text for its own limit, so clients that match on it still do.
            Self::TooManyClients { limit } => fatal(
                "53300",
                "sorry, too many clients already",
                Some(&format!(
                    "The pgentra proxy allows {limit} sessions at once (--max-connections)."
                )),
            ),
            Self::TooManyLogins { limit } => fatal(
                "53300",
                "sorry, too many clients are logging in at once",
                Some(&format!(
                    "The pgentra proxy lets {limit} clients log in at once; try again."
                )),
            ),
            Self::ShuttingDown => fatal("57P03", "the pgentra proxy is shutting down", None),
            Self::ClientPassword { user } => fatal(
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
                Some("The pgentra proxy asks for its local client password."),
            ),
            // PostgreSQL's text (src/backend/tcop/backend_startup.c).
            Self::ProtocolVersion { major, minor } => fatal(
                "0A000",
                &format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                ),
                None,
            ),
            Self::InvalidStartup(what) => fatal("08P01", what, None),
            Self::RoleSetting(setting) => fatal(
                "42501",
                &format!(
                    "the startup parameter {setting} would change the role the pgentra proxy logs in as"
                ),
                Some(
                    "The proxy chooses the role (--user, --client-roles, or the token's): leave role and session_authorization out of the startup parameters and options.",
                ),
            ),
            // PostgreSQL's text for its authentication_timeout.
            Self::StartupTimeout(limit) => fatal(
                "57014",
                "canceling authentication due to timeout",
                Some(&format!(
                    "The pgentra proxy gives a client {limit:?} to log in (--login-timeout)."
                )),
            ),
            _ => return None,
        })
    }

    /// The `FATAL` of a refusal about the token or the server.
    fn upstream_fields(&self) -> Option<ErrorFields> {
        Some(match self {
            Self::TokenTimeout(limit) => fatal(
                "08001",
                &format!(
                    "the pgentra proxy got no Entra ID token within the login timeout ({limit:?})"
                ),
                Some(
                    "The token endpoint is slow or not answering; run `pgentra whoami` where the proxy runs.",
                ),
            ),
            Self::Token(error) => fatal(
                "08001",
                &format!(
                    "the pgentra proxy could not get an Entra ID token: {}",
                    pgentra::ErrorChain(error)
                ),
                Some("Run `pgentra whoami` where the proxy runs to see which credential fails."),
            ),
            Self::ServerUnreachable { upstream, error } => fatal(
                "08001",
                &format!("the pgentra proxy could not reach {upstream}: {error}"),
                Some(CHECK_HINT),
            ),
            Self::ServerTimeout { upstream, limit } => fatal(
                "08001",
                &format!(
                    "the pgentra proxy's login to {upstream} did not finish within the login timeout ({limit:?})"
                ),
                Some(CHECK_HINT),
            ),
            Self::ServerAuthMethod { method, role } => fatal(
                "28000",
                &format!(
                    "the server asked for authentication method {method}, not a password: role \"{role}\" does not log in with Entra ID"
                ),
                Some(
                    "Use a role created with pgaadauth_create_principal, or check the server's authentication settings.",
                ),
            ),
            Self::ServerRefused(error) => error.clone(),
            Self::ServerBroke { upstream, what } => fatal(
                "08006",
                &format!("the server {upstream} {what} during the login"),
                Some(CHECK_HINT),
            ),
            Self::ForwardedStartupTooLong { len } => fatal(
                "54000",
                &format!(
                    "the startup packet would be {len} bytes with the role and database the pgentra proxy adds, over PostgreSQL's limit of {} bytes",
                    pgentra_wire::MAX_STARTUP_PACKET
                ),
                Some("Send fewer or shorter startup parameters."),
            ),
            Self::QueueTimeout { limit } => fatal(
                "53300",
                &format!("no server connection became free within {limit:?} (queue timeout)"),
                Some(
                    "All of the pool's server connections are in use: raise the pool size, or let clients wait longer.",
                ),
            ),
            _ => return None,
        })
    }

    /// The `FATAL` of a refusal that ends a session after its login.
    fn session_fields(&self) -> Option<ErrorFields> {
        Some(match self {
            Self::ClientProtocol(what) => fatal("08P01", what, None),
            Self::ServerLost { upstream, what } => fatal(
                "08006",
                &format!("the server connection to {upstream} broke: it {what}"),
                Some("The transaction in progress, if any, did not commit; connect again."),
            ),
            // PostgreSQL's text for a backend ended by a fast shutdown.
            Self::SessionShutdown => fatal(
                "57P01",
                "terminating connection due to administrator command",
                Some("The pgentra proxy is shutting down; connect again."),
            ),
            Self::TooManyStatements { limit, bytes } => fatal(
                "54000",
                &format!(
                    "the pgentra proxy keeps at most {limit} prepared statements, of {} MiB in all, per client in transaction pooling",
                    bytes >> 20
                ),
                Some("Close statements the client no longer needs, or use session pooling."),
            ),
            // PostgreSQL's texts for its own timeouts, with the proxy's setting as the hint.
            Self::ClientIdleTimeout(limit) => fatal(
                "57P05",
                "terminating connection due to idle-session timeout",
                Some(&format!(
                    "The pgentra proxy disconnects clients idle for {limit:?} (client_idle_timeout)."
                )),
            ),
            Self::IdleInTransactionTimeout(limit) => fatal(
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
                Some(&format!(
                    "The pgentra proxy rolls back a transaction idle for {limit:?} and disconnects its client (idle_transaction_timeout)."
                )),
            ),
            Self::TransactionTimeout(limit) => fatal(
                "25P04",
                "terminating connection due to transaction timeout",
                Some(&format!(
                    "The pgentra proxy ends a transaction that runs longer than {limit:?} (transaction_timeout)."
                )),
            ),
            Self::QueryTimeout(limit) => fatal(
                "57014",
                "terminating connection due to query timeout: the query did not stop when cancelled",
                Some(&format!(
                    "The pgentra proxy cancels a query that runs longer than {limit:?} (query_timeout)."
                )),
            ),
            Self::ClientStalled(limit) => fatal(
                "08006",
                &format!(
                    "terminating connection: the client sent part of a message and then nothing for {limit:?}"
                ),
                Some(
                    "The pgentra proxy does not let a stalled client hold a server connection (client_stall_timeout).",
                ),
            ),
            Self::Internal(what) => fatal("XX000", &format!("pgentra proxy: {what}"), None),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_sqlstate_and_a_counted_reason() {
        let refusals = [
            Refusal::TooManyClients { limit: 1 },
            Refusal::TooManyLogins { limit: 1 },
            Refusal::ShuttingDown,
            Refusal::ClientPassword { user: "u".into() },
            Refusal::ProtocolVersion { major: 2, minor: 0 },
            Refusal::InvalidStartup("x".into()),
            Refusal::RoleSetting("role=x".into()),
            Refusal::StartupTimeout(Duration::from_secs(1)),
            Refusal::TokenTimeout(Duration::from_secs(1)),
            Refusal::Token(pgentra::Error::ProviderStopped),
            Refusal::ServerUnreachable {
                upstream: "h:1".into(),
                error: "e".into(),
            },
            Refusal::ServerTimeout {
                upstream: "h:1".into(),
                limit: Duration::from_secs(1),
            },
            Refusal::ServerAuthMethod {
                method: 10,
                role: "r".into(),
            },
            Refusal::ServerRefused(ErrorFields::fatal("28P01", "no", None)),
            Refusal::ServerBroke {
                upstream: "h:1".into(),
                what: "closed the connection".into(),
            },
            Refusal::ForwardedStartupTooLong { len: 10_001 },
            Refusal::QueueTimeout {
                limit: Duration::from_secs(1),
            },
            Refusal::ClientProtocol("x".into()),
            Refusal::ServerLost {
                upstream: "h:1".into(),
                what: "closed the connection".into(),
            },
            Refusal::SessionShutdown,
            Refusal::TooManyStatements {
                limit: 1,
                bytes: 1 << 20,
            },
            Refusal::ClientIdleTimeout(Duration::from_secs(1)),
            Refusal::IdleInTransactionTimeout(Duration::from_secs(1)),
            Refusal::TransactionTimeout(Duration::from_secs(1)),
            Refusal::QueryTimeout(Duration::from_secs(1)),
            Refusal::ClientStalled(Duration::from_secs(1)),
            Refusal::Internal("x".into()),
        ];
        let mut reasons = Vec::new();
        for refusal in &refusals {
            let fields = refusal.fields();
            assert_eq!(fields.get(b'S'), Some("FATAL"), "{refusal:?}");
            let code = fields.get(b'C').unwrap();
            assert_eq!(code.len(), 5, "{refusal:?}");
            assert!(!fields.get(b'M').unwrap().is_empty());
            assert_ne!(fields.get(b'M'), Some(UNEXPLAINED), "{refusal:?}");
            reasons.push(refusal.reason());
        }
        for reason in Reason::ALL {
            assert!(reasons.contains(&reason), "{reason:?} is never used");
            assert_eq!(Reason::ALL[reason.index()], reason);
        }
        assert_eq!(
            Refusal::ProtocolVersion { major: 2, minor: 0 }
                .fields()
                .get(b'M'),
            Some("unsupported frontend protocol 2.0: server supports 3.0 to 3.0")
        );
    }
}
