//! libpq's environment. What the database URL leaves out is taken from the `PG*` variables,
//! as `psql` and every libpq client take it, and a password it does not give from the
//! password file (`PGPASSFILE`, else `~/.pgpass`), read again at each connection so that a
//! password rotated in the file is used at the next reconnect. `serve` and the one-off
//! commands read both through this module (sqlx, under the one-off commands, read the
//! variables itself and `serve` none: a `migrate` could work where `serve` then failed).

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;
use tokio_postgres::Config;

use super::{error_chain, Error};

/// Where a variable's value comes from: the process's environment, or a test's.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment (an empty variable is not set, as in libpq).
pub(crate) fn process(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The TLS (and GSSAPI) options' variables, each with its option (read by
/// `tls::split_with`; `sslpassword` has none, as in libpq).
pub(crate) const TLS: [(&str, &str); 13] = [
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcrl", "PGSSLCRL"),
    ("sslcrldir", "PGSSLCRLDIR"),
    ("sslcertmode", "PGSSLCERTMODE"),
    ("sslsni", "PGSSLSNI"),
    ("sslcompression", "PGSSLCOMPRESSION"),
    ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
    ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION"),
    ("sslnegotiation", "PGSSLNEGOTIATION"),
    ("gssencmode", "PGGSSENCMODE"),
];

/// The other variables, each with the key=value parameter it stands for.
const VARIABLES: [(&str, &str); 11] = [
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGAPPNAME", "application_name"),
    ("PGOPTIONS", "options"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// Fills in what `config` leaves out from `env`: each variable is read as its parameter
/// would be in the URL, and refused with its name when it cannot be. `PGHOST` and
/// `PGHOSTADDR` apply only when the URL names no server at all; the settings that have a
/// default (`channel_binding`, `load_balance_hosts`) when the URL leaves them at it.
/// (`PGTARGETSESSIONATTRS` is read with the URL's `target_session_attrs`, by `conninfo`:
/// libpq has values tokio-postgres does not.)
pub(crate) fn fill(config: &mut Config, env: Env<'_>) -> Result<(), Error> {
    let serverless = config.get_hosts().is_empty() && config.get_hostaddrs().is_empty();
    let defaults = Config::new();
    for (variable, key) in VARIABLES {
        let Some(value) = env(variable) else {
            continue;
        };
        let quoted = super::conninfo::quoted(&value);
        let given: Config = format!("{key}='{quoted}'").parse().map_err(|e| {
            let shown = if key == "password" { "…" } else { &value };
            Error::Url(format!(
                "the environment's {variable}={shown}: {}",
                error_chain(&e)
            ))
        })?;
        match key {
            "host" if serverless => {
                for host in given.get_hosts() {
                    match host {
                        Host::Tcp(name) => config.host(name),
                        Host::Unix(dir) => config.host_path(dir),
                    };
                }
            }
            "hostaddr" if serverless => {
                for addr in given.get_hostaddrs() {
                    config.hostaddr(*addr);
                }
            }
            "port" if config.get_ports().is_empty() => {
                for port in given.get_ports() {
                    config.port(*port);
                }
            }
            "dbname" if config.get_dbname().is_none() => {
                config.dbname(given.get_dbname().unwrap_or_default());
            }
            "user" if config.get_user().is_none() => {
                config.user(given.get_user().unwrap_or_default());
            }
            "password" if config.get_password().is_none() => {
                config.password(given.get_password().unwrap_or_default());
            }
            "application_name" if config.get_application_name().is_none() => {
                config.application_name(given.get_application_name().unwrap_or_default());
            }
            "options" if config.get_options().is_none() => {
                config.options(given.get_options().unwrap_or_default());
            }
            "connect_timeout" if config.get_connect_timeout().is_none() => {
                if let Some(timeout) = given.get_connect_timeout() {
                    config.connect_timeout(*timeout);
                }
            }
            "channel_binding" if config.get_channel_binding() == defaults.get_channel_binding() => {
                config.channel_binding(given.get_channel_binding());
            }
            "load_balance_hosts"
                if config.get_load_balance_hosts() == defaults.get_load_balance_hosts() =>
            {
                config.load_balance_hosts(given.get_load_balance_hosts());
            }
            _ => {}
        }
    }
    Ok(())
}

/// The password for a connection to `config`'s `i`th server: the URL's (or
/// `PGPASSWORD`'s, once [`fill`]ed), else the password file's line for it, read now: the
/// URL's `passfile`, else `PGPASSFILE`'s, else `~/.pgpass`.
pub(crate) fn password(
    config: &Config,
    passfile: Option<&Path>,
    i: usize,
    env: Env<'_>,
) -> Option<Vec<u8>> {
    if let Some(password) = config.get_password() {
        return Some(password.to_vec());
    }
    let path = passfile
        .map(Path::to_path_buf)
        .or_else(|| env("PGPASSFILE").map(PathBuf::from))
        .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".pgpass")))?;
    let contents = match read_private(&path) {
        Ok(contents) => contents?,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "the password file cannot be read");
            return None;
        }
    };
    let port = super::connect::port(config, i);
    // libpq's name for a user given nowhere: the process's (tokio-postgres asks the system).
    let user = config
        .get_user()
        .map(str::to_owned)
        .or_else(|| env("USER"))
        .or_else(|| env("LOGNAME"))?;
    let database = config.get_dbname().unwrap_or(&user);
    // The host as libpq matches it: the name, else the address, else localhost; a Unix
    // socket's directory, or localhost (which libpq matches for its default directory).
    let hosts: Vec<String> = match (config.get_hosts().get(i), config.get_hostaddrs().get(i)) {
        (Some(Host::Tcp(name)), _) => vec![name.clone()],
        (Some(Host::Unix(dir)), _) => vec![dir.display().to_string(), "localhost".into()],
        (None, Some(addr)) => vec![addr.to_string()],
        (None, None) => vec!["localhost".into()],
    };
    hosts
        .iter()
        .find_map(|host| lookup(&contents, host, port, database, &user))
        .map(String::into_bytes)
}

/// The file's contents; `None` (with a warning, as libpq gives) when others than its owner
/// may read it, or when there is none.
fn read_private(path: &std::path::Path) -> io::Result<Option<String>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the password file has group or world access, so it is not read; its \
             permissions should be u=rw (0600) or less"
        );
        return Ok(None);
    }
    std::fs::read_to_string(path).map(Some)
}

/// The password of the first line of a password file that matches: `host:port:database:
/// user:password`, each of the first four `*` for any, `\` escaping `:` and `\`, `#`
/// starting a comment line.
fn lookup(contents: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), database, user];
    contents
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = fields(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                return None;
            };
            [h, p, d, u]
                .iter()
                .zip(wanted)
                .all(|(field, wanted)| *field == "*" || *field == wanted)
                .then(|| password.clone())
        })
}

/// A line's fields, split at each `:` not escaped, escapes undone; everything after the
/// fourth `:` is the password (itself unescaped up to an unescaped `:`).
fn fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' if fields.len() == 4 => break,
            ':' => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn filled(url: &str, pairs: &[(&str, &str)]) -> Result<Config, Error> {
        let mut config: Config = url.parse().expect("a URL");
        fill(&mut config, &env(pairs)).map(|()| config)
    }

    /// The variables fill in what the URL leaves out, and only that.
    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let all = [
            ("PGHOST", "db1,/run/postgresql"),
            ("PGPORT", "6432"),
            ("PGDATABASE", "app"),
            ("PGUSER", "permd"),
            ("PGPASSWORD", "it's"),
            ("PGAPPNAME", "mirror"),
            ("PGOPTIONS", "-c statement_timeout=0"),
            ("PGCONNECT_TIMEOUT", "7"),
            ("PGCHANNELBINDING", "require"),
        ];
        let config = filled("postgres://", &all).expect("filled");
        assert_eq!(
            config.get_hosts(),
            &[
                Host::Tcp("db1".into()),
                Host::Unix("/run/postgresql".into())
            ]
        );
        assert_eq!(config.get_ports(), &[6432]);
        assert_eq!(config.get_dbname(), Some("app"));
        assert_eq!(config.get_user(), Some("permd"));
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
        assert_eq!(config.get_application_name(), Some("mirror"));
        assert_eq!(config.get_options(), Some("-c statement_timeout=0"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(
            config.get_channel_binding(),
            tokio_postgres::config::ChannelBinding::Require
        );
        // What the URL gives stays; PGHOST does not add to the URL's server.
        let config = filled(
            "host=db9 port=5433 dbname=own user=me password=pw application_name=x",
            &all,
        )
        .expect("filled");
        assert_eq!(config.get_hosts(), &[Host::Tcp("db9".into())]);
        assert_eq!(config.get_ports(), &[5433]);
        assert_eq!(config.get_dbname(), Some("own"));
        assert_eq!(config.get_user(), Some("me"));
        assert_eq!(config.get_password(), Some(&b"pw"[..]));
        assert_eq!(config.get_application_name(), Some("x"));
        let config = filled("hostaddr=10.0.0.1", &all).expect("filled");
        assert!(config.get_hosts().is_empty());
        // A value that cannot be read names its variable, and never shows a password.
        match filled("postgres://h", &[("PGPORT", "fifty")]) {
            Err(Error::Url(why)) => assert!(why.contains("PGPORT=fifty"), "{why}"),
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn a_password_file_is_read_as_libpq_reads_it() {
        let file = "# comment\n\
                    db1:5432:app:permd:first\n\
                    *:*:app:permd:second\n\
                    db2:5432:*:*:with\\:colon\\\\and backslash\n\
                    /run/postgresql:5432:app:sock:socket\n\
                    short:line\n";
        assert_eq!(
            lookup(file, "db1", 5432, "app", "permd").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(file, "db3", 6432, "app", "permd").as_deref(),
            Some("second")
        );
        assert_eq!(
            lookup(file, "db2", 5432, "other", "me").as_deref(),
            Some("with:colon\\and backslash")
        );
        assert_eq!(lookup(file, "db1", 5432, "app", "nobody"), None);
        assert_eq!(lookup(file, "short", 5432, "line", "x"), None);

        let dir = crate::Scratch::new("pgpass");
        let path = dir.join("pgpass");
        std::fs::write(&path, file).expect("write the file");
        let config: Config = "host=/run/postgresql dbname=app user=sock"
            .parse()
            .expect("a URL");
        let path_text = path.display().to_string();
        let env = env(&[("PGPASSFILE", &path_text)]);
        let mode = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        mode(0o600);
        assert_eq!(password(&config, None, 0, &env), Some(b"socket".to_vec()));
        // The URL's `passfile` comes before `PGPASSFILE`.
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, "*:*:*:*:from the URL's file\n").expect("write the file");
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        assert_eq!(
            password(&config, Some(&elsewhere), 0, &env),
            Some(b"from the URL's file".to_vec())
        );
        // Readable by others: not read, as libpq refuses it.
        mode(0o640);
        assert_eq!(password(&config, None, 0, &env), None);
        drop(dir);
        // The URL's password comes first; no file, no password.
        let given: Config = "host=h password=mine".parse().expect("a URL");
        assert_eq!(password(&given, None, 0, &env), Some(b"mine".to_vec()));
        assert_eq!(password(&config, None, 0, &env), None);
    }
}
