//! Connection settings: libpq URLs, `key=value` strings and the libpq environment.
//!
//! Drivers differ in what they accept (tokio-postgres rejects `sslmode=verify-full` and
//! `sslrootcert`, for one), so pgentra parses the libpq forms itself and hands each driver what
//! it understands.
//!
//! **Passwords.** pgentra supplies the token as the password, so a password in a URL or
//! `key=value` string is an error (it is almost certainly a mistake, and would be silently
//! replaced). `PGPASSWORD` in the environment is ignored with a warning, because tools often
//! leave it set for other servers.
//!
//! **TLS.** `sslmode` defaults to `verify-full`; `disable`, `allow` and `prefer` are refused,
//! since they could send the token in clear text.
//!
//! **Where settings come from, and what each source may change.** The token goes wherever
//! these settings point, so a weaker source cannot redirect it:
//!
//! 1. Explicit settings (a URL or `key=value` string the caller passes, and fields the caller
//!    sets) are never overridden.
//! 2. The process environment ([`ConnInfo::from_env`]) fills in what the explicit settings
//!    leave unset, but the settings that say where and how to reach a server (`hostaddr`,
//!    `port`, `sslmode`, `sslrootcert`) apply only to the host the environment names: when the
//!    explicit settings name another host they are dropped, with a warning ([`ConnInfo::or`]).
//! 3. A `.env` file is read only when the caller asks for it ([`ConnInfo::from_env_file`],
//!    [`ConnInfo::from_env_with_dotenv`]); neither the library nor the `pgentra` command reads
//!    one by itself, since any cloned repository can carry one. A file cannot set `hostaddr`,
//!    replace the root certificates or set an `sslmode` other than `verify-full`: such a line
//!    is an error that says to pass the setting explicitly.

use crate::error::{Error, Result};
use crate::tls::{SslMode, TlsOptions};
use std::path::{Path, PathBuf};

/// Parsed connection settings. Unset fields are `None`.
///
/// ```
/// use pgentra::conninfo::ConnInfo;
/// let url = ConnInfo::parse(
///     "postgres://alice%40contoso.com@srv.postgres.database.azure.com:5432/app?sslmode=verify-full",
/// )?;
/// assert_eq!(url.host.as_deref(), Some("srv.postgres.database.azure.com"));
/// assert_eq!(url.user.as_deref(), Some("alice@contoso.com"));
///
/// let kv = ConnInfo::parse("host=localhost port=6432 dbname='my db' sslrootcert=/tmp/ca.pem")?;
/// assert_eq!(kv.port, Some(6432));
/// assert_eq!(kv.dbname.as_deref(), Some("my db"));
/// # Ok::<(), pgentra::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnInfo {
    /// Server host name (or a Unix socket directory).
    pub host: Option<String>,
    /// Server IP address, skipping name resolution (libpq `hostaddr`).
    pub hostaddr: Option<String>,
    /// Server port.
    pub port: Option<u16>,
    /// Database name.
    pub dbname: Option<String>,
    /// Role name; when set it wins over the role derived from the token.
    pub user: Option<String>,
    /// TLS verification mode (default `verify-full`).
    pub sslmode: Option<SslMode>,
    /// Root certificate file.
    pub sslrootcert: Option<PathBuf>,
    /// `application_name`.
    pub application_name: Option<String>,
    /// Any other libpq parameters (`connect_timeout`, `options`, ...), in input order.
    pub params: Vec<(String, String)>,
}

impl ConnInfo {
    /// Parses a `postgres://`/`postgresql://` URL or a libpq `key=value` string.
    pub fn parse(input: &str) -> Result<Self> {
        let input = input.trim();
        if input.starts_with("postgres://") || input.starts_with("postgresql://") {
            parse_url(input)
        } else if input.contains("://") {
            Err(Error::conninfo(
                "the URL scheme must be postgres:// or postgresql://",
            ))
        } else {
            let mut info = Self::default();
            for (key, value) in parse_key_values(input)? {
                info.set(&key, value)?;
            }
            Ok(info)
        }
    }

    /// Reads the libpq environment of this process: `PGHOST`, `PGHOSTADDR`, `PGPORT`,
    /// `PGDATABASE`, `PGUSER`, `PGSSLMODE`, `PGSSLROOTCERT` and `PGAPPNAME`. No `.env` file is
    /// read (see [`from_env_with_dotenv`](Self::from_env_with_dotenv)).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads the libpq variables of a `.env`-style file (`KEY=value` lines, `#` comments,
    /// optional quotes and `export`) of at most [`MAX_ENV_FILE`] bytes.
    ///
    /// A file is trusted less than the environment, since a checkout can carry one: it may name
    /// the host, port, database, user and application name, but a `PGHOSTADDR`, a
    /// `PGSSLROOTCERT` or a `PGSSLMODE` other than `verify-full` in it is an error, because each
    /// could send the token to a server the user did not name. Pass those in the connection
    /// string or the environment if you mean them. Read only a file you trust: its `PGHOST`
    /// decides where the token goes.
    ///
    /// ```
    /// use pgentra::conninfo::ConnInfo;
    /// # let dir = std::env::temp_dir().join(format!("pgentra-doc-env-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// let path = dir.join(".env");
    /// std::fs::write(&path, "PGHOST=srv.postgres.database.azure.com\nPGDATABASE=app\n").unwrap();
    /// assert_eq!(ConnInfo::from_env_file(&path)?.dbname.as_deref(), Some("app"));
    ///
    /// std::fs::write(&path, "PGHOST=srv\nPGSSLMODE=require\n").unwrap();
    /// assert!(ConnInfo::from_env_file(&path).is_err());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    pub fn from_env_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let vars = read_env_file(path)?;
        for (name, value) in &vars {
            let refused = match name.as_str() {
                "PGHOSTADDR" | "PGSSLROOTCERT" => !value.is_empty(),
                "PGSSLMODE" => !value.is_empty() && value != SslMode::VerifyFull.as_str(),
                _ => false,
            };
            if refused {
                return Err(Error::conninfo(format!(
                    "{}: {name} is not taken from a file, since it could send the token to a server you did not name; set it in the connection string or the environment",
                    path.display()
                )));
            }
        }
        Self::from_vars(vars)
    }

    /// The process environment, with the `.env` file of the current directory (if there is
    /// one) filling in what the environment leaves unset, under the rules of
    /// [`from_env_file`](Self::from_env_file). For samples and tools run in a checkout on
    /// purpose; a library should not call it.
    pub fn from_env_with_dotenv() -> Result<Self> {
        let env = Self::from_env()?;
        let dotenv = Path::new(".env");
        if !dotenv.is_file() {
            return Ok(env);
        }
        let file = Self::from_env_file(dotenv)?;
        // One source, as libpq's variables are: the environment wins field by field. (The file
        // has no hostaddr, root certificate or weaker sslmode, so none can leak in here.)
        Ok(Self {
            host: env.host.or(file.host),
            hostaddr: env.hostaddr,
            port: env.port.or(file.port),
            dbname: env.dbname.or(file.dbname),
            user: env.user.or(file.user),
            sslmode: env.sslmode.or(file.sslmode),
            sslrootcert: env.sslrootcert,
            application_name: env.application_name.or(file.application_name),
            params: env.params,
        })
    }

    /// Reads the libpq variables from `vars` instead of the process environment.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self>
    where
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut info = Self::default();
        for (name, value) in vars {
            let value = value.into();
            if value.is_empty() {
                continue;
            }
            let key = match name.as_ref() {
                "PGHOST" => "host",
                "PGHOSTADDR" => "hostaddr",
                "PGPORT" => "port",
                "PGDATABASE" => "dbname",
                "PGUSER" => "user",
                "PGSSLMODE" => "sslmode",
                "PGSSLROOTCERT" => "sslrootcert",
                "PGAPPNAME" => "application_name",
                "PGPASSWORD" => {
                    tracing::warn!(
                        "ignoring PGPASSWORD: pgentra sends an Entra ID token as the password"
                    );
                    continue;
                }
                _ => continue,
            };
            info.set(key, value)?;
        }
        Ok(info)
    }

    /// Fills every unset field from `defaults` (for example a URL over the environment).
    ///
    /// The fields that say where and how to reach a server (`hostaddr`, `port`, `sslmode` and
    /// `sslrootcert`) belong to the host they came with: they are taken from `defaults` only
    /// when `self` names no server, or the same `host` as `defaults`. Otherwise they are
    /// dropped, with a warning, so that a `PGHOSTADDR` or `PGSSLMODE=require` left in the
    /// environment for one server can neither redirect the token meant for another nor switch
    /// off its certificate check.
    ///
    /// ```
    /// use pgentra::conninfo::ConnInfo;
    /// let env = ConnInfo::from_vars([("PGHOST", "srv"), ("PGDATABASE", "app"), ("PGPORT", "6432")])?;
    /// let info = ConnInfo::parse("dbname=other")?.or(env.clone());
    /// assert_eq!(info.host.as_deref(), Some("srv"));
    /// assert_eq!(info.dbname.as_deref(), Some("other"));
    /// assert_eq!(info.port, Some(6432));
    ///
    /// // Another server: the environment's port is not its port; the database still applies.
    /// let info = ConnInfo::parse("host=elsewhere")?.or(env);
    /// assert_eq!(info.port, None);
    /// assert_eq!(info.dbname.as_deref(), Some("app"));
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    pub fn or(mut self, defaults: Self) -> Self {
        let same_server = match (&self.host, &self.hostaddr) {
            (None, None) => true,
            (Some(host), _) => defaults.host.as_deref() == Some(host.as_str()),
            (None, Some(_)) => false,
        };
        if same_server {
            self.host = self.host.or(defaults.host);
            self.hostaddr = self.hostaddr.or(defaults.hostaddr);
            self.port = self.port.or(defaults.port);
            self.sslmode = self.sslmode.or(defaults.sslmode);
            self.sslrootcert = self.sslrootcert.or(defaults.sslrootcert);
        } else {
            let ignored: Vec<&str> = [
                (
                    "hostaddr",
                    self.hostaddr.is_none() && defaults.hostaddr.is_some(),
                ),
                ("port", self.port.is_none() && defaults.port.is_some()),
                (
                    "sslmode",
                    self.sslmode.is_none() && defaults.sslmode.is_some(),
                ),
                (
                    "sslrootcert",
                    self.sslrootcert.is_none() && defaults.sslrootcert.is_some(),
                ),
            ]
            .into_iter()
            .filter_map(|(name, ignored)| ignored.then_some(name))
            .collect();
            if !ignored.is_empty() {
                tracing::warn!(
                    server = self.host.as_deref().or(self.hostaddr.as_deref()),
                    defaults_for = defaults.host.as_deref().unwrap_or("no host"),
                    ignored = ignored.join(", "),
                    "settings of the environment for another host are not applied to the server named explicitly"
                );
            }
        }
        self.dbname = self.dbname.or(defaults.dbname);
        self.user = self.user.or(defaults.user);
        self.application_name = self.application_name.or(defaults.application_name);
        for (key, value) in defaults.params {
            if !self.params.iter().any(|(k, _)| *k == key) {
                self.params.push((key, value));
            }
        }
        self
    }

    /// A libpq `key='value'` connection string with `user` and `password`, every value quoted
    /// (a token holds characters that break naive strings). It holds the token, so it is a
    /// [`Secret`](crate::Secret): never log it.
    ///
    /// ```
    /// use pgentra::conninfo::ConnInfo;
    /// let info = ConnInfo::parse("postgres://srv/app?sslrootcert=/ca.pem")?;
    /// let conninfo = info.to_libpq("o'brien@contoso.com", &pgentra::Secret::new("a.b.c"));
    /// assert_eq!(
    ///     conninfo.expose_secret(),
    ///     "host='srv' dbname='app' sslmode='verify-full' sslrootcert='/ca.pem' user='o\\'brien@contoso.com' password='a.b.c'"
    /// );
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    pub fn to_libpq(&self, user: &str, password: &crate::Secret) -> crate::Secret {
        let port = self.port.map(|p| p.to_string());
        let sslmode = self.sslmode.unwrap_or_default();
        let sslrootcert = self.sslrootcert.as_ref().map(|p| p.display().to_string());
        let fields = [
            ("host", self.host.as_deref()),
            ("hostaddr", self.hostaddr.as_deref()),
            ("port", port.as_deref()),
            ("dbname", self.dbname.as_deref()),
            ("application_name", self.application_name.as_deref()),
            ("sslmode", Some(sslmode.as_str())),
            ("sslrootcert", sslrootcert.as_deref()),
        ];
        let params = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())));
        let credentials = [
            ("user", Some(user)),
            ("password", Some(password.expose_secret())),
        ];
        let mut out = String::new();
        for (key, value) in fields.into_iter().chain(params).chain(credentials) {
            if let Some(value) = value {
                if !out.is_empty() {
                    out.push(' ');
                }
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                out.push_str(&format!("{key}='{quoted}'"));
            }
        }
        crate::Secret::new(out)
    }

    /// The TLS settings these connection settings ask for.
    pub fn tls_options(&self) -> TlsOptions {
        TlsOptions {
            mode: self.sslmode.unwrap_or_default(),
            root_cert: self.sslrootcert.clone(),
        }
    }

    /// Sets one libpq parameter. An empty value means "unset", and a repeated key replaces the
    /// earlier value, as in libpq.
    fn set(&mut self, key: &str, value: String) -> Result<()> {
        if value.is_empty() && key != "password" {
            return Ok(());
        }
        match key {
            "host" => self.host = Some(value),
            "hostaddr" => self.hostaddr = Some(value),
            "port" => {
                self.port = Some(value.parse().map_err(|_| {
                    Error::conninfo(format!(
                        "port {value:?} is not a number between 0 and 65535"
                    ))
                })?);
            }
            "dbname" => self.dbname = Some(value),
            "user" => self.user = Some(value),
            "sslmode" => self.sslmode = Some(value.parse()?),
            "sslrootcert" => self.sslrootcert = Some(PathBuf::from(value)),
            "application_name" => self.application_name = Some(value),
            "password" => {
                return Err(Error::conninfo(
                    "the connection string contains a password; remove it, pgentra sends an Entra ID token as the password",
                ));
            }
            _ => match self.params.iter_mut().find(|(k, _)| k == key) {
                Some((_, existing)) => *existing = value,
                None => self.params.push((key.to_owned(), value)),
            },
        }
        Ok(())
    }
}

fn parse_url(input: &str) -> Result<ConnInfo> {
    let url = url::Url::parse(input).map_err(|e| {
        let hint = if input.contains(',') {
            " (several hosts in one URL are not supported)"
        } else {
            ""
        };
        Error::conninfo(format!("not a valid URL: {e}{hint}"))
    })?;
    if url.password().is_some() {
        return Err(Error::conninfo(
            "the URL contains a password; remove it, pgentra sends an Entra ID token as the password",
        ));
    }
    let decode = |s: &str| -> Result<String> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| Error::conninfo("the URL has percent-encoding that is not UTF-8"))
    };
    let mut info = ConnInfo::default();
    if !url.username().is_empty() {
        info.user = Some(decode(url.username())?);
    }
    if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
        if host.contains(',') {
            return Err(Error::conninfo(
                "several hosts in one URL are not supported; give one host",
            ));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        info.host = Some(decode(host)?);
    }
    info.port = url.port();
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() {
        info.dbname = Some(decode(path)?);
    }
    // Not `query_pairs`: that decodes `+` as a space, and libpq decodes only `%XX`.
    for pair in url
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        info.set(&decode(key)?, decode(value)?)?;
    }
    Ok(info)
}

/// Parses libpq's `key = value` syntax: values may be single-quoted, and `\` escapes the next
/// character.
fn parse_key_values(input: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(Error::conninfo(format!(
                "missing \"=\" after {key:?} in the connection string"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(Error::conninfo(format!(
                            "unterminated quoted value for {key:?} in the connection string"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Largest `.env` file read: far more than any real one, and a bound on the memory a hostile
/// file can take.
pub const MAX_ENV_FILE: u64 = 1 << 20;

/// Reads every variable of a `.env` file (`KEY=value` lines, `#` comments, optional quotes and
/// `export`) of at most [`MAX_ENV_FILE`] bytes. [`ConnInfo::from_env_file`] reads the libpq
/// ones with a file's restrictions.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = Vec::new();
    file.take(MAX_ENV_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_ENV_FILE {
        return Err(Error::conninfo(format!(
            "{} is larger than {} KiB, so it is not read",
            path.display(),
            MAX_ENV_FILE / 1024
        )));
    }
    dotenvy::from_read_iter(text.as_slice())
        .map(|item| item.map_err(|e| env_file_error(path, e)))
        .collect()
}

fn env_file_error(path: &Path, error: dotenvy::Error) -> Error {
    match error {
        dotenvy::Error::Io(io) => Error::io(path, io),
        // The line itself may hold a secret: report only where it failed.
        dotenvy::Error::LineParse(_, at) => Error::conninfo(format!(
            "{}: a line cannot be parsed (at character {at})",
            path.display()
        )),
        other => Error::conninfo(format!("{}: {other}", path.display())),
    }
}

#[cfg(test)]
mod tests;
