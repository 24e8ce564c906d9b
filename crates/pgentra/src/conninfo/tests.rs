use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

const SECRET: &str = "SUPERSECRETPW";

fn parse(input: &str) -> ConnInfo {
    ConnInfo::parse(input).unwrap_or_else(|e| panic!("{input:?} should parse: {e}"))
}

/// The message of an [`Error::ConnInfo`], failing the test on any other outcome.
fn conninfo_message<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Err(Error::ConnInfo { message }) => message,
        other => panic!("expected Error::ConnInfo, got {other:?}"),
    }
}

fn parse_error(input: &str) -> String {
    conninfo_message(ConnInfo::parse(input))
}

/// Asserts that `text` occurs in neither the `Display` nor the `Debug` form of `error`.
fn assert_not_leaked(error: &Error, text: &str) {
    let display = error.to_string();
    let debug = format!("{error:?}");
    assert!(
        !display.contains(text),
        "{text:?} leaked into Display: {display}"
    );
    assert!(!debug.contains(text), "{text:?} leaked into Debug: {debug}");
}

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// URL forms

#[test]
fn url_with_every_part() {
    for scheme in ["postgres", "postgresql"] {
        let info = parse(&format!(
            "{scheme}://alice%40contoso.com@srv.example.com:6432/my%20db"
        ));
        assert_eq!(
            info,
            ConnInfo {
                host: Some("srv.example.com".into()),
                port: Some(6432),
                dbname: Some("my db".into()),
                user: Some("alice@contoso.com".into()),
                ..ConnInfo::default()
            },
            "scheme {scheme}"
        );
    }
}

#[test]
fn url_without_port_user_or_dbname() {
    assert_eq!(
        parse("postgres://srv.example.com"),
        ConnInfo {
            host: Some("srv.example.com".into()),
            ..ConnInfo::default()
        }
    );
    assert_eq!(
        parse("postgres://srv.example.com/"),
        ConnInfo {
            host: Some("srv.example.com".into()),
            ..ConnInfo::default()
        }
    );
}

#[test]
fn url_is_trimmed() {
    assert_eq!(parse("  postgres://h/db \n").host.as_deref(), Some("h"));
}

#[test]
fn url_ipv6_host_loses_brackets() {
    let info = parse("postgres://[::1]:5433/db");
    assert_eq!(info.host.as_deref(), Some("::1"));
    assert_eq!(info.port, Some(5433));
    assert_eq!(info.dbname.as_deref(), Some("db"));
}

#[test]
fn url_percent_encoded_host_is_decoded() {
    let info = parse("postgres://%2Fvar%2Frun%2Fpostgresql/db");
    assert_eq!(info.host.as_deref(), Some("/var/run/postgresql"));
}

#[test]
fn url_without_host_takes_host_from_query() {
    let info = parse("postgres:///db?host=/tmp/sock");
    assert_eq!(
        info,
        ConnInfo {
            host: Some("/tmp/sock".into()),
            dbname: Some("db".into()),
            ..ConnInfo::default()
        }
    );
}

#[test]
fn url_query_parameters_map_to_fields() {
    let info = parse(
        "postgresql://u@h/db?sslmode=require&sslrootcert=/etc/ca.pem&application_name=my%20app\
         &hostaddr=10.0.0.1&port=7000",
    );
    assert_eq!(
        info,
        ConnInfo {
            host: Some("h".into()),
            hostaddr: Some("10.0.0.1".into()),
            port: Some(7000),
            dbname: Some("db".into()),
            user: Some("u".into()),
            sslmode: Some(SslMode::Require),
            sslrootcert: Some(PathBuf::from("/etc/ca.pem")),
            application_name: Some("my app".into()),
            params: Vec::new(),
        }
    );
}

#[test]
fn url_unknown_query_parameters_go_to_params_in_order() {
    let info = parse("postgres://h/db?connect_timeout=5&options=-c%20geqo%3Doff&keepalives=1");
    assert_eq!(
        info.params,
        params(&[
            ("connect_timeout", "5"),
            ("options", "-c geqo=off"),
            ("keepalives", "1"),
        ])
    );
}

// libpq decodes only `%XX` in URLs; `+` is not a space.
#[test]
fn url_query_keeps_plus_signs() {
    let info = parse("postgres://h/db?application_name=a+b&sslrootcert=/ca+1.pem&options=x%2By");
    assert_eq!(info.application_name.as_deref(), Some("a+b"));
    assert_eq!(info.sslrootcert, Some(PathBuf::from("/ca+1.pem")));
    assert_eq!(info.params, params(&[("options", "x+y")]));
}

// key=value forms

#[test]
fn key_values_simple() {
    assert_eq!(
        parse("host=localhost port=5432 dbname=app user=bob hostaddr=127.0.0.1"),
        ConnInfo {
            host: Some("localhost".into()),
            hostaddr: Some("127.0.0.1".into()),
            port: Some(5432),
            dbname: Some("app".into()),
            user: Some("bob".into()),
            ..ConnInfo::default()
        }
    );
}

#[test]
fn key_values_empty_input() {
    assert_eq!(parse(""), ConnInfo::default());
    assert_eq!(parse("   \t\n "), ConnInfo::default());
}

#[test]
fn key_values_spaces_around_equals() {
    let info = parse("  host = localhost\tport=\t6432   dbname =app ");
    assert_eq!(info.host.as_deref(), Some("localhost"));
    assert_eq!(info.port, Some(6432));
    assert_eq!(info.dbname.as_deref(), Some("app"));
}

#[test]
fn key_values_quoted_value_with_spaces() {
    let info = parse("dbname='my db' application_name = 'a  b c' host=h");
    assert_eq!(info.dbname.as_deref(), Some("my db"));
    assert_eq!(info.application_name.as_deref(), Some("a  b c"));
    assert_eq!(info.host.as_deref(), Some("h"));
}

#[test]
fn key_values_escapes_inside_quotes() {
    let info = parse(r"dbname='it\'s' user='back\\slash'");
    assert_eq!(info.dbname.as_deref(), Some("it's"));
    assert_eq!(info.user.as_deref(), Some(r"back\slash"));
}

#[test]
fn key_values_backslash_escape_outside_quotes() {
    let info = parse(r"dbname=my\ db user=a\\b host=h");
    assert_eq!(info.dbname.as_deref(), Some("my db"));
    assert_eq!(info.user.as_deref(), Some(r"a\b"));
    assert_eq!(info.host.as_deref(), Some("h"));
}

#[test]
fn key_values_empty_quoted_value() {
    // An empty value means "unset", as in libpq.
    let info = parse("application_name='' host=h");
    assert_eq!(info.application_name, None);
    assert_eq!(info.host.as_deref(), Some("h"));
}

#[test]
fn key_values_fields_and_params() {
    let info =
        parse("sslmode=verify-ca sslrootcert=/x.pem connect_timeout=10 target_session_attrs=any");
    assert_eq!(info.sslmode, Some(SslMode::VerifyCa));
    assert_eq!(info.sslrootcert, Some(PathBuf::from("/x.pem")));
    assert_eq!(
        info.params,
        params(&[("connect_timeout", "10"), ("target_session_attrs", "any")])
    );
}

// Errors

#[test]
fn password_in_url_is_refused_without_echoing_it() {
    let input = format!("postgres://u:{SECRET}@h/db");
    let error = ConnInfo::parse(&input).unwrap_err();
    assert_not_leaked(&error, SECRET);
    let message = conninfo_message::<()>(Err(error));
    assert!(message.contains("password"), "{message}");
}

#[test]
fn password_in_url_query_is_refused_without_echoing_it() {
    let error = ConnInfo::parse(&format!("postgres://u@h/db?password={SECRET}")).unwrap_err();
    assert_not_leaked(&error, SECRET);
    let message = conninfo_message::<()>(Err(error));
    assert!(message.contains("password"), "{message}");
}

#[test]
fn password_in_key_values_is_refused_without_echoing_it() {
    for input in [
        format!("host=h password={SECRET}"),
        format!("password='{SECRET}' host=h"),
    ] {
        let error = ConnInfo::parse(&input).unwrap_err();
        assert_not_leaked(&error, SECRET);
        let message = conninfo_message::<()>(Err(error));
        assert!(message.contains("password"), "{input}: {message}");
    }
}

#[test]
fn insecure_sslmodes_are_refused() {
    for mode in ["disable", "allow", "prefer"] {
        for input in [
            format!("host=h sslmode={mode}"),
            format!("postgres://h/db?sslmode={mode}"),
        ] {
            let message = parse_error(&input);
            assert!(message.contains(mode), "{input}: {message}");
            assert!(message.contains("verify-full"), "{input}: {message}");
        }
    }
}

#[test]
fn unknown_sslmode_is_refused() {
    let message = parse_error("sslmode=bogus");
    assert!(message.contains("unknown sslmode"), "{message}");
    assert!(message.contains("bogus"), "{message}");
}

#[test]
fn bad_port_is_refused() {
    for (input, value) in [
        ("port=abc", "abc"),
        ("port=70000", "70000"),
        ("port=-1", "-1"),
        ("postgres://h/db?port=abc", "abc"),
    ] {
        let message = parse_error(input);
        assert!(message.contains("port"), "{input}: {message}");
        assert!(message.contains(value), "{input}: {message}");
    }
}

#[test]
fn bad_port_in_url_authority_is_refused() {
    let message = parse_error("postgres://h:70000/db");
    assert!(message.contains("not a valid URL"), "{message}");
}

#[test]
fn missing_equals_is_refused() {
    let message = parse_error("host localhost");
    assert!(message.contains("missing \"=\""), "{message}");
    assert!(message.contains("\"host\""), "{message}");
    let message = parse_error("host=h dbname");
    assert!(message.contains("\"dbname\""), "{message}");
}

#[test]
fn unterminated_quote_is_refused() {
    let message = parse_error("host='abc");
    assert!(message.contains("unterminated"), "{message}");
    assert!(message.contains("\"host\""), "{message}");
    // A trailing backslash inside the quotes does not close them.
    let message = parse_error(r"host='abc\'");
    assert!(message.contains("unterminated"), "{message}");
}

#[test]
fn wrong_scheme_is_refused() {
    for input in ["mysql://h/db", "http://h/db", "postgre://h/db"] {
        let message = parse_error(input);
        assert!(message.contains("postgres://"), "{input}: {message}");
        assert!(message.contains("postgresql://"), "{input}: {message}");
    }
}

#[test]
fn multi_host_url_is_refused() {
    let message = parse_error("postgres://h1:5432,h2:5432/db");
    assert!(message.contains("several hosts"), "{message}");
}

// Without a port after the first host the `url` crate accepts `h1,h2` as one opaque host.
#[test]
fn multi_host_url_without_ports_is_refused() {
    for input in ["postgres://h1,h2/db", "postgres://h1,h2:5432/db"] {
        let message = conninfo_message(ConnInfo::parse(input));
        assert!(message.contains("several hosts"), "{input}: {message}");
    }
}

// from_vars

#[test]
fn from_vars_maps_libpq_variables() {
    let info = ConnInfo::from_vars([
        ("PGHOST", "srv"),
        ("PGHOSTADDR", "10.1.2.3"),
        ("PGPORT", "6543"),
        ("PGDATABASE", "app"),
        ("PGUSER", "alice@contoso.com"),
        ("PGSSLMODE", "verify-ca"),
        ("PGSSLROOTCERT", "/etc/ca.pem"),
        ("PGAPPNAME", "svc"),
    ])
    .unwrap();
    assert_eq!(
        info,
        ConnInfo {
            host: Some("srv".into()),
            hostaddr: Some("10.1.2.3".into()),
            port: Some(6543),
            dbname: Some("app".into()),
            user: Some("alice@contoso.com".into()),
            sslmode: Some(SslMode::VerifyCa),
            sslrootcert: Some(PathBuf::from("/etc/ca.pem")),
            application_name: Some("svc".into()),
            params: Vec::new(),
        }
    );
}

#[test]
fn from_vars_accepts_owned_strings() {
    let vars = vec![("PGHOST".to_owned(), "srv".to_owned())];
    assert_eq!(
        ConnInfo::from_vars(vars).unwrap().host.as_deref(),
        Some("srv")
    );
}

#[test]
fn from_vars_ignores_empty_values() {
    let info = ConnInfo::from_vars([
        ("PGHOST", ""),
        ("PGPORT", ""),
        ("PGSSLMODE", ""),
        ("PGDATABASE", "app"),
    ])
    .unwrap();
    assert_eq!(
        info,
        ConnInfo {
            dbname: Some("app".into()),
            ..ConnInfo::default()
        }
    );
}

#[test]
fn from_vars_ignores_pgpassword() {
    let info = ConnInfo::from_vars([("PGPASSWORD", SECRET), ("PGHOST", "srv")]).unwrap();
    assert_eq!(
        info,
        ConnInfo {
            host: Some("srv".into()),
            ..ConnInfo::default()
        }
    );
    let debug = format!("{info:?}");
    assert!(!debug.contains(SECRET), "{debug}");
}

#[test]
fn from_vars_ignores_unrelated_variables() {
    let info = ConnInfo::from_vars([
        ("PATH", "/usr/bin"),
        ("HOME", "/root"),
        ("PGCONNECT_TIMEOUT", "5"),
        ("pghost", "lower"),
    ])
    .unwrap();
    assert_eq!(info, ConnInfo::default());
}

#[test]
fn from_vars_refuses_insecure_sslmode() {
    let message = conninfo_message(ConnInfo::from_vars([("PGSSLMODE", "prefer")]));
    assert!(message.contains("prefer"), "{message}");
    assert!(message.contains("verify-full"), "{message}");
}

#[test]
fn from_vars_refuses_bad_port() {
    let message = conninfo_message(ConnInfo::from_vars([("PGPORT", "abc")]));
    assert!(message.contains("abc"), "{message}");
}

// or

#[test]
fn or_keeps_explicit_values_and_fills_the_rest() {
    let explicit = parse("host=srv dbname=mine connect_timeout=3 options=-cx");
    let defaults = parse(
        "host=srv hostaddr=10.0.0.1 port=6432 dbname=theirs user=bob sslmode=require \
         sslrootcert=/ca.pem application_name=app connect_timeout=30 keepalives=1",
    );
    assert_eq!(
        explicit.or(defaults),
        ConnInfo {
            host: Some("srv".into()),
            hostaddr: Some("10.0.0.1".into()),
            port: Some(6432),
            dbname: Some("mine".into()),
            user: Some("bob".into()),
            sslmode: Some(SslMode::Require),
            sslrootcert: Some(PathBuf::from("/ca.pem")),
            application_name: Some("app".into()),
            params: params(&[
                ("connect_timeout", "3"),
                ("options", "-cx"),
                ("keepalives", "1"),
            ]),
        }
    );
}

#[test]
fn or_does_not_apply_another_hosts_server_settings() {
    // The attack of a `.env` or a stale environment: the user names one server, the defaults
    // point its address elsewhere and switch off verification.
    let defaults = ConnInfo::from_vars([
        ("PGHOSTADDR", "127.0.0.2"),
        ("PGSSLMODE", "require"),
        ("PGSSLROOTCERT", "/attacker-ca.pem"),
        ("PGPORT", "6432"),
        ("PGDATABASE", "app"),
        ("PGUSER", "alice@contoso.com"),
        ("PGAPPNAME", "tool"),
    ])
    .unwrap();
    for explicit in [
        "postgres://localhost:5432/postgres",
        "host=srv.postgres.database.azure.com",
        "hostaddr=10.1.2.3",
    ] {
        let info = parse(explicit).or(defaults.clone());
        let named = parse(explicit);
        assert_eq!(info.hostaddr, named.hostaddr, "{explicit}");
        assert_eq!(info.port, named.port, "{explicit}");
        assert_eq!(info.sslmode, None, "{explicit}");
        assert_eq!(info.sslrootcert, None, "{explicit}");
        assert_eq!(info.tls_options(), TlsOptions::verify_full(), "{explicit}");
        // What does not decide where the token goes still fills in.
        assert_eq!(
            info.user.as_deref(),
            Some("alice@contoso.com"),
            "{explicit}"
        );
        assert_eq!(info.application_name.as_deref(), Some("tool"), "{explicit}");
    }
    // Defaults for another named host are just as foreign.
    let other = ConnInfo::from_vars([("PGHOST", "other"), ("PGHOSTADDR", "127.0.0.2")]).unwrap();
    let info = parse("host=srv").or(other);
    assert_eq!((info.host.as_deref(), info.hostaddr), (Some("srv"), None));
}

#[test]
fn or_applies_the_server_settings_of_the_same_host() {
    let defaults = ConnInfo::from_vars([
        ("PGHOST", "localhost"),
        ("PGPORT", "6432"),
        ("PGSSLROOTCERT", "/emulator-ca.pem"),
    ])
    .unwrap();
    let info = parse("postgres://localhost/postgres").or(defaults.clone());
    assert_eq!(info.port, Some(6432));
    assert_eq!(info.sslrootcert, Some(PathBuf::from("/emulator-ca.pem")));
    // No explicit server at all: the defaults say which.
    let info = parse("dbname=app").or(defaults);
    assert_eq!(info.host.as_deref(), Some("localhost"));
    assert_eq!(info.port, Some(6432));
}

#[test]
fn or_with_empty_sides() {
    let full = parse("host=h port=1 user=u sslmode=verify-ca connect_timeout=3");
    assert_eq!(full.clone().or(ConnInfo::default()), full);
    assert_eq!(ConnInfo::default().or(full.clone()), full);
}

// tls_options

#[test]
fn tls_options_default_to_verify_full() {
    let tls = ConnInfo::default().tls_options();
    assert_eq!(tls.mode, SslMode::VerifyFull);
    assert_eq!(tls.root_cert, None);
    assert_eq!(tls, TlsOptions::verify_full());
}

#[test]
fn tls_options_follow_sslmode_and_sslrootcert() {
    assert_eq!(
        parse("sslmode=require sslrootcert=/x.pem").tls_options(),
        TlsOptions {
            mode: SslMode::Require,
            root_cert: Some("/x.pem".into()),
        }
    );
    assert_eq!(
        parse("sslrootcert=/y.pem").tls_options(),
        TlsOptions {
            mode: SslMode::VerifyFull,
            root_cert: Some("/y.pem".into()),
        }
    );
}

// read_env_file

/// A file under the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "pgentra-conninfo-test-{}-{}.env",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn read_env_file_reads_pairs() {
    let file = TempFile::new(
        "# a comment\n\
         PGHOST=srv.example.com\n\
         \n\
         export PGUSER=alice@contoso.com\n\
         PGDATABASE='my db'\n\
         PGAPPNAME=\"my app\"\n\
         PGPORT=6432 # trailing comment\n",
    );
    assert_eq!(
        read_env_file(&file.0).unwrap(),
        params(&[
            ("PGHOST", "srv.example.com"),
            ("PGUSER", "alice@contoso.com"),
            ("PGDATABASE", "my db"),
            ("PGAPPNAME", "my app"),
            ("PGPORT", "6432"),
        ])
    );
}

#[test]
fn read_env_file_refuses_a_huge_file_without_reading_it_all() {
    let file = TempFile::new("");
    let handle = std::fs::File::options().write(true).open(&file.0).unwrap();
    // A sparse file: larger than the limit, but costs no disk.
    handle.set_len(64 << 20).unwrap();
    let message = conninfo_message(read_env_file(&file.0));
    assert!(message.contains("larger than 1024 KiB"), "{message}");
}

#[test]
fn env_file_cannot_redirect_the_token_or_weaken_tls() {
    for line in [
        "PGHOSTADDR=127.0.0.2",
        "PGSSLMODE=require",
        "PGSSLMODE=verify-ca",
        "PGSSLROOTCERT=/tmp/attacker.pem",
        "export PGSSLROOTCERT=system",
    ] {
        let file = TempFile::new(&format!("PGHOST=localhost\n{line}\n"));
        let message = conninfo_message(ConnInfo::from_env_file(&file.0));
        let name = line
            .trim_start_matches("export ")
            .split('=')
            .next()
            .unwrap();
        assert!(message.contains(name), "{line}: {message}");
        assert!(
            message.contains("connection string or the environment"),
            "{message}"
        );
    }
    let file = TempFile::new("PGHOST=srv\nPGPORT=6432\nPGDATABASE=app\nPGSSLMODE=verify-full\n");
    let info = ConnInfo::from_env_file(&file.0).unwrap();
    assert_eq!(
        (info.host.as_deref(), info.port, info.dbname.as_deref()),
        (Some("srv"), Some(6432), Some("app"))
    );
    assert_eq!(info.tls_options(), TlsOptions::verify_full());
}

/// Runs this test binary's test `name` in a child process in `dir`, with only `vars` as its
/// libpq environment, and returns what it printed. (The working directory is per process.)
fn run_child_in(dir: &Path, name: &str, vars: &[(&str, &str)]) -> String {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .current_dir(dir)
        .env_clear()
        .env("PGENTRA_CONNINFO_CHILD", "1")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// In a child (see [`run_child_in`]): prints what `from_env` and `from_env_with_dotenv` read.
#[test]
fn child_prints_what_the_environment_gives() {
    if std::env::var_os("PGENTRA_CONNINFO_CHILD").is_none() {
        return;
    }
    let env = ConnInfo::from_env().unwrap();
    println!("from_env host={:?} hostaddr={:?}", env.host, env.hostaddr);
    match ConnInfo::from_env_with_dotenv() {
        Ok(info) => println!(
            "with_dotenv host={:?} db={:?} port={:?}",
            info.host, info.dbname, info.port
        ),
        Err(error) => println!("with_dotenv error={error}"),
    }
}

#[test]
fn from_env_never_reads_a_dotenv_in_the_working_directory() {
    let dir = std::env::temp_dir().join(format!("pgentra-conninfo-dotenv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        "PGHOST=evil.example\nPGHOSTADDR=127.0.0.2\n",
    )
    .unwrap();
    let printed = run_child_in(
        &dir,
        "conninfo::tests::child_prints_what_the_environment_gives",
        &[],
    );
    assert!(
        printed.contains("from_env host=None hostaddr=None"),
        "{printed}"
    );
    // Asked for, the file is read, and its hostaddr refused.
    assert!(
        printed.contains("with_dotenv error=") && printed.contains("PGHOSTADDR"),
        "{printed}"
    );

    std::fs::write(
        dir.join(".env"),
        "PGHOST=from-file\nPGDATABASE=app\nPGPORT=6000\n",
    )
    .unwrap();
    let printed = run_child_in(
        &dir,
        "conninfo::tests::child_prints_what_the_environment_gives",
        &[("PGHOST", "from-env")],
    );
    assert!(
        printed.contains(r#"with_dotenv host=Some("from-env") db=Some("app") port=Some(6000)"#),
        "{printed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_env_file_feeds_from_vars() {
    let file = TempFile::new("PGHOST=srv\nPGSSLMODE=require\nOTHER=x\n");
    let info = ConnInfo::from_vars(read_env_file(&file.0).unwrap()).unwrap();
    assert_eq!(info.host.as_deref(), Some("srv"));
    assert_eq!(info.sslmode, Some(SslMode::Require));
}

#[test]
fn read_env_file_does_not_echo_a_malformed_line() {
    let file = TempFile::new("PGHOST=srv\nBAD LINE SECRETVALUE123\n");
    let error = read_env_file(&file.0).unwrap_err();
    assert_not_leaked(&error, "SECRETVALUE123");
    let message = conninfo_message::<()>(Err(error));
    assert!(message.contains(&file.0.display().to_string()), "{message}");
}

#[test]
fn read_env_file_missing_file_is_io_error() {
    let path = std::env::temp_dir().join(format!(
        "pgentra-conninfo-test-{}-missing.env",
        std::process::id()
    ));
    match read_env_file(&path) {
        Err(Error::Io {
            path: reported,
            source,
        }) => {
            assert_eq!(reported, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn empty_values_are_unset_and_repeated_keys_replace() {
    let info = parse("postgres://h/db?host=&connect_timeout=1&connect_timeout=2");
    assert_eq!(info.host.as_deref(), Some("h"));
    assert_eq!(info.params, params(&[("connect_timeout", "2")]));
}
