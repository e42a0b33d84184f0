//! libpq's connection strings, the URL form (`postgres://…?name=value&…`) and the key=value
//! form (`host=… dbname='my db'`): the parameters permd reads itself are taken out of them
//! before tokio-postgres parses the rest, which refuses what it does not know. First of
//! all ([`resolve`]) a URL is written in the key=value form, as libpq reads it, and the
//! parameters of the service it names (`pg_service.conf`) are added.

use std::io;
use std::path::{Path, PathBuf};

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::Config;

use super::environment::Env;
use super::Error;

/// Parameters (name, value), in the order written.
type Parameters = Vec<(String, String)>;

/// Takes the parameters named `names` out of `url`: what is left, and the parameters taken
/// (decoded), in the order written. A string of neither form is left whole, for
/// tokio-postgres to say why.
pub(super) fn take(url: &str, names: &[&str]) -> (String, Parameters) {
    if is_url(url) {
        take_from_query(url, names)
    } else {
        take_from_pairs(url, names).unwrap_or_else(|| (url.to_owned(), Vec::new()))
    }
}

/// The URL form: options in the query, `&`-separated and percent-encoded.
fn take_from_query(url: &str, names: &[&str]) -> (String, Parameters) {
    let Some((head, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name);
        if names.contains(&name.as_str()) {
            taken.push((name, decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    (rest, taken)
}

/// The key=value form: `name = value` pairs apart by white space, a value either bare
/// (backslash escapes) or in single quotes (backslash escapes). `None` if it is not one.
fn take_from_pairs(url: &str, names: &[&str]) -> Option<(String, Parameters)> {
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    let mut chars = url.char_indices().peekable();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut name = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            name.push(c);
        }
        skip_space(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_space(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.peek().copied() {
                None if quoted => return None,
                None => break,
                Some((_, '\'')) if quoted => {
                    chars.next();
                    break;
                }
                Some((_, c)) if !quoted && c.is_whitespace() => break,
                Some((_, '\\')) => {
                    chars.next();
                    value.push(chars.next()?.1);
                }
                Some((_, c)) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(url.len(), |&(at, _)| at);
        if names.contains(&name.as_str()) {
            taken.push((name, value));
        } else {
            kept.push(&url[start..end]);
        }
    }
    Some((kept.join(" "), taken))
}

/// libpq's connection parameters (Postgres 17's, `service` aside): the names a service
/// file may set, and those a connection string can give.
const KEYWORDS: [&str; 40] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Where libpq (Debian's build, as `pg_config --sysconfdir` says) looks for the system's
/// service file when `PGSYSCONFDIR` is not set.
const SYSCONFDIR: &str = "/etc/postgresql-common";

/// libpq's connection string as permd reads it: one key=value string, a URL's parts
/// written as the parameters they stand for ([`url_as_pairs`]), with the parameters of
/// the service it names added ([`with_service`]). So what the string gives is what it
/// names, whatever its form, and every reader after this one (the TLS options, libpq's
/// own, tokio-postgres, the environment's fill) reads one form.
pub(super) fn resolve(url: &str, env: Env<'_>) -> Result<String, Error> {
    match url_as_pairs(url) {
        Some(pairs) => with_service(&pairs, env),
        None => with_service(url, env),
    }
}

/// A URL (`postgres://user:password@host:port,…/dbname?name=value&…`) written in the
/// key=value form, as libpq reads one: user and password only when not empty, the hosts
/// and their ports as lists, `port` only where one is written (so `PGPORT`, or a
/// service's port, fills in what a URL naming its host alone leaves out, as in libpq;
/// tokio-postgres's own reading puts 5432 there), a parameter given twice the last
/// time. `None` for the key=value form, and for a URL that cannot be read, which is left
/// whole for tokio-postgres to say why.
fn url_as_pairs(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|decoded| decoded.into_owned())
    };
    let mut pairs: Parameters = Vec::new();
    let mut set = |name: &str, value: String| {
        pairs.retain(|(given, _)| given != name);
        pairs.push((name.to_owned(), value));
    };
    let (authority, rest) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let servers = match authority.split_once('@') {
        Some((credentials, servers)) => {
            let (user, password) = match credentials.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (credentials, None),
            };
            let user = decode(user)?;
            if !user.is_empty() {
                set("user", user);
            }
            if let Some(password) = password.map(decode) {
                let password = password?;
                if !password.is_empty() {
                    set("password", password);
                }
            }
            servers
        }
        None => authority,
    };
    if !servers.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for server in servers.split(',') {
            let (host, port) = match server.strip_prefix('[') {
                Some(bracketed) => {
                    let (host, after) = bracketed.split_once(']')?;
                    match after {
                        "" => (host, ""),
                        _ => (host, after.strip_prefix(':')?),
                    }
                }
                None => server.split_once(':').unwrap_or((server, "")),
            };
            hosts.push(decode(host)?);
            ports.push(decode(port)?);
        }
        set("host", hosts.join(","));
        if ports.iter().any(|port| !port.is_empty()) {
            set("port", ports.join(","));
        }
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let dbname = decode(path.strip_prefix('/').unwrap_or(path))?;
    if !dbname.is_empty() {
        set("dbname", dbname);
    }
    for parameter in query.split('&').filter(|parameter| !parameter.is_empty()) {
        let (name, value) = parameter.split_once('=')?;
        set(&decode(name)?, decode(value)?);
    }
    Some(
        pairs
            .iter()
            .map(|(name, value)| format!("{name}='{}'", quoted(value)))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `value` escaped for a single-quoted value of the key=value form.
pub(super) fn quoted(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// `pairs` (the key=value form) with the parameters of the service it names (`service=`,
/// else `PGSERVICE`) added where it does not give them, as libpq reads a service: from
/// the file `PGSERVICEFILE` names, else `~/.pg_service.conf`, else (the service not
/// found there) `pg_service.conf` in `PGSYSCONFDIR` (else libpq's own directory). So the
/// string's own parameters stand before the service's, and the service's before the
/// environment's (`environment::fill` fills in only what the string then leaves out).
/// The `service` parameter itself is taken out. A service named but found nowhere, or a
/// file that libpq would refuse, refuses the string, with the file and line.
fn with_service(pairs: &str, env: Env<'_>) -> Result<String, Error> {
    if is_url(pairs) {
        // A URL that could not be read: tokio-postgres says why.
        return Ok(pairs.to_owned());
    }
    let (rest, taken) = take(pairs, &["service"]);
    let Some(name) = taken
        .into_iter()
        .next_back()
        .map(|(_, name)| name)
        .or_else(|| env("PGSERVICE"))
    else {
        return Ok(pairs.to_owned());
    };
    let (_, given) = take(&rest, &KEYWORDS);
    let mut out = rest;
    for (key, value) in service(&name, env)? {
        if !given.iter().any(|(given, _)| *given == key) {
            out.push_str(&format!(" {key}='{}'", quoted(&value)));
        }
    }
    Ok(out)
}

fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The parameters of service `name`, from the first file that defines it.
fn service(name: &str, env: Env<'_>) -> Result<Parameters, Error> {
    let user = env("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pg_service.conf")));
    let system = Path::new(&env("PGSYSCONFDIR").unwrap_or_else(|| SYSCONFDIR.into()))
        .join("pg_service.conf");
    for file in user.into_iter().chain([system]) {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(Error::Url(format!(
                    "service file \"{}\": {error}",
                    file.display()
                )))
            }
        };
        let section = section(&text, name).map_err(|(line, why)| {
            Error::Url(format!(
                "service file \"{}\", line {line}: {why}",
                file.display()
            ))
        })?;
        if let Some(parameters) = section {
            return Ok(parameters);
        }
    }
    Err(Error::Url(format!(
        "definition of service \"{name}\" not found (looked in PGSERVICEFILE or \
         ~/.pg_service.conf, then pg_service.conf in PGSYSCONFDIR or {SYSCONFDIR})"
    )))
}

/// The parameters of section `[name]` of a service file, `None` if it has none; or the
/// line (from 1) that libpq would refuse, and why. As libpq: white space around a line is
/// dropped, `#` starts a comment line, a parameter is `key=value` with the value as
/// written, and the first setting of a key stands.
fn section(text: &str, name: &str) -> Result<Option<Parameters>, (usize, String)> {
    let mut found: Option<Parameters> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(group) = line.strip_prefix('[') {
            if found.is_some() {
                break;
            }
            if group
                .strip_prefix(name)
                .is_some_and(|end| end.starts_with(']'))
            {
                found = Some(Vec::new());
            }
            continue;
        }
        let Some(parameters) = found.as_mut() else {
            continue;
        };
        let Some((key, value)) = line.split_once('=') else {
            return Err((i + 1, format!("\"{line}\" is not key=value")));
        };
        if key == "service" {
            return Err((i + 1, "a service cannot name another service".into()));
        }
        if !KEYWORDS.contains(&key) {
            return Err((
                i + 1,
                format!("\"{key}\" is not a libpq parameter (libpq takes no space before =)"),
            ));
        }
        if !parameters.iter().any(|(given, _)| given == key) {
            parameters.push((key.to_owned(), value.to_owned()));
        }
    }
    Ok(found)
}

/// libpq's parameters that tokio-postgres does not know and permd reads itself: taken out
/// of the URL before tokio-postgres reads the rest, then given to [`apply`].
pub(super) const OPTIONS: [&str; 11] = [
    "target_session_attrs",
    "client_encoding",
    "fallback_application_name",
    "keepalives_count",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "passfile",
    "requirepeer",
    "require_auth",
    "replication",
];

/// libpq's settings that tokio-postgres's `Config` does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Libpq {
    /// `passfile`: the password file, before `PGPASSFILE` and `~/.pgpass`.
    pub(crate) passfile: Option<PathBuf>,
    /// What `target_session_attrs` asks of a server's recovery; the values tokio-postgres
    /// knows (`read-write`, `read-only`) are in the `Config`.
    pub(crate) recovery: Option<Recovery>,
    /// `require_auth`: the authentication methods the server may use.
    pub(crate) require_auth: Option<RequireAuth>,
    /// `requirepeer`: the user a server reached by a Unix socket must run as.
    pub(crate) requirepeer: Option<String>,
}

/// A way the server may authenticate the client, by libpq's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthMethod {
    /// The server asks for nothing (`trust`, `peer`).
    None,
    Password,
    Md5,
    Gss,
    Sspi,
    ScramSha256,
}

impl AuthMethod {
    const ALL: [AuthMethod; 6] = [
        AuthMethod::None,
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::Gss,
        AuthMethod::Sspi,
        AuthMethod::ScramSha256,
    ];

    /// libpq's name, in `require_auth`.
    fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }

    /// What the server asked for, as an error says it.
    pub(crate) fn asked(self) -> &'static str {
        match self {
            AuthMethod::None => "no authentication",
            AuthMethod::Password => "a cleartext password",
            AuthMethod::Md5 => "an MD5 password",
            AuthMethod::Gss => "GSSAPI authentication",
            AuthMethod::Sspi => "SSPI authentication",
            AuthMethod::ScramSha256 => "SCRAM authentication",
        }
    }

    /// The method an authentication request of the protocol starts (its code:
    /// AuthenticationCleartextPassword 3, MD5Password 5, GSS 7, SSPI 9, SASL 10); `None`
    /// for the messages that go on with one (8, 11, 12), and the others.
    pub(crate) fn of_request(code: i32) -> Option<AuthMethod> {
        match code {
            3 => Some(AuthMethod::Password),
            5 => Some(AuthMethod::Md5),
            7 => Some(AuthMethod::Gss),
            9 => Some(AuthMethod::Sspi),
            10 => Some(AuthMethod::ScramSha256),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// libpq's `require_auth`: the methods listed, of which the server must use one, or
/// (each with `!`) those it must not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequireAuth {
    listed: u8,
    negated: bool,
}

impl RequireAuth {
    /// Reads a list as libpq does: libpq's names, each once, all negated or none.
    fn parse(value: &str) -> Result<RequireAuth, String> {
        let mut listed = 0;
        let mut negated = None;
        for item in value.split(',') {
            let (negative, name) = match item.strip_prefix('!') {
                Some(name) => (true, name),
                None => (false, item),
            };
            if *negated.get_or_insert(negative) != negative {
                return Err("negated and plain methods cannot be mixed".into());
            }
            let Some(method) = AuthMethod::ALL.into_iter().find(|m| m.name() == name) else {
                return Err(format!(
                    "\"{name}\" is not one of password, md5, gss, sspi, scram-sha-256, none"
                ));
            };
            if listed & method.bit() != 0 {
                return Err(format!("{name} is given twice"));
            }
            listed |= method.bit();
        }
        Ok(RequireAuth {
            listed,
            negated: negated.unwrap_or(false),
        })
    }

    /// Whether the server may authenticate the client by `method`.
    pub(crate) fn allows(self, method: AuthMethod) -> bool {
        (self.listed & method.bit() != 0) != self.negated
    }
}

impl std::fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = AuthMethod::ALL
            .into_iter()
            .filter(|method| self.listed & method.bit() != 0)
            .map(|method| format!("{}{}", if self.negated { "!" } else { "" }, method.name()))
            .collect();
        write!(f, "require_auth={}", names.join(","))
    }
}

/// libpq's `target_session_attrs` by the server's recovery (`pg_is_in_recovery()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// `primary`: not a standby.
    Primary,
    /// `standby`: a standby.
    Standby,
    /// `prefer-standby`: a standby if any host is one, else any server.
    PreferStandby,
}

/// Applies the parameters [`take`]n by [`OPTIONS`] to `config` (tokio-postgres's reading of
/// the rest, libpq's environment filled in) and returns what it cannot hold, or refuses
/// the URL with the reason: a parameter permd cannot honour is never ignored where it asks
/// for something. `target_session_attrs` is the URL's, else `PGTARGETSESSIONATTRS`.
pub(super) fn apply(
    config: &mut Config,
    mut taken: Parameters,
    env: Env<'_>,
) -> Result<Libpq, Error> {
    let mut libpq = Libpq::default();
    for (name, variable) in [
        ("target_session_attrs", "PGTARGETSESSIONATTRS"),
        ("require_auth", "PGREQUIREAUTH"),
        ("requirepeer", "PGREQUIREPEER"),
    ] {
        if !taken.iter().any(|(taken, _)| taken == name) {
            if let Some(value) = env(variable) {
                taken.push((name.into(), value));
            }
        }
    }
    for (name, value) in taken {
        let refused = |why: &str| Err(Error::Url(format!("{name}={value}: {why}")));
        match name.as_str() {
            "target_session_attrs" => match value.as_str() {
                "any" => {
                    config.target_session_attrs(TargetSessionAttrs::Any);
                }
                "read-write" => {
                    config.target_session_attrs(TargetSessionAttrs::ReadWrite);
                }
                "read-only" => {
                    config.target_session_attrs(TargetSessionAttrs::ReadOnly);
                }
                "primary" => libpq.recovery = Some(Recovery::Primary),
                "standby" => libpq.recovery = Some(Recovery::Standby),
                "prefer-standby" => libpq.recovery = Some(Recovery::PreferStandby),
                _ => {
                    return refused(
                        "not one of any, read-write, read-only, primary, standby, \
                         prefer-standby",
                    )
                }
            },
            // tokio-postgres speaks UTF8 to the server, whatever is asked; `auto` follows
            // the client's locale in libpq, whose text permd never prints.
            "client_encoding" => {
                let utf8 = ["utf8", "utf-8", "unicode", "auto"]
                    .iter()
                    .any(|name| name.eq_ignore_ascii_case(&value));
                if !utf8 {
                    return refused("permd speaks UTF8 to the server; leave it out");
                }
            }
            "fallback_application_name" => {
                if config.get_application_name().is_none() {
                    config.application_name(&value);
                }
            }
            "keepalives_count" => match value.trim().parse() {
                Ok(count) => {
                    config.keepalives_retries(count);
                }
                Err(_) => return refused("not a whole number of probes"),
            },
            // Used only to authenticate by GSSAPI, which permd (as a libpq built without
            // it) does not: a server that asks for it is refused at the connection.
            "krbsrvname" | "gsslib" | "gssdelegation" => {}
            "passfile" => libpq.passfile = Some(PathBuf::from(value)),
            "requirepeer" => libpq.requirepeer = Some(value),
            "require_auth" => match RequireAuth::parse(&value) {
                Ok(methods) => libpq.require_auth = Some(methods),
                Err(why) => return refused(&why),
            },
            // "replication"
            _ => {
                return refused(
                    "permd reads the changelog over an ordinary connection; leave it out",
                )
            }
        }
    }
    Ok(libpq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    fn applied(url: &str, env: &[(&str, &str)]) -> Result<(Config, Libpq), Error> {
        let (rest, taken) = take(url, &OPTIONS);
        let mut config: Config = rest.parse().expect("a URL");
        let env = |name: &str| {
            env.iter()
                .find(|(variable, _)| *variable == name)
                .map(|(_, value)| (*value).to_owned())
        };
        apply(&mut config, taken, &env).map(|libpq| (config, libpq))
    }

    /// `target_session_attrs` is the URL's, else `PGTARGETSESSIONATTRS`, in either case
    /// with libpq's values; `passfile` is the URL's.
    #[test]
    fn target_session_attrs_and_passfile_are_read_as_libpq_reads_them() {
        let primary = [("PGTARGETSESSIONATTRS", "primary")];
        let (config, libpq) = applied(
            "postgres://h/db?target_session_attrs=prefer-standby&passfile=%2Frun%2Fpgpass",
            &primary,
        )
        .expect("read");
        assert_eq!(
            libpq,
            Libpq {
                passfile: Some("/run/pgpass".into()),
                recovery: Some(Recovery::PreferStandby),
                require_auth: None,
                requirepeer: None,
            }
        );
        assert_eq!(config.get_target_session_attrs(), TargetSessionAttrs::Any);
        let (_, libpq) = applied("host=h", &primary).expect("read");
        assert_eq!(libpq.recovery, Some(Recovery::Primary));
        let (config, libpq) =
            applied("host=h", &[("PGTARGETSESSIONATTRS", "read-write")]).expect("read");
        assert_eq!(
            config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(libpq.recovery, None);
        // The URL's `any` stands against the environment.
        let (config, libpq) =
            applied("postgres://h/db?target_session_attrs=any", &primary).expect("read");
        assert_eq!(
            (config.get_target_session_attrs(), libpq.recovery),
            (TargetSessionAttrs::Any, None)
        );
        match applied("host=h", &[("PGTARGETSESSIONATTRS", "standby-only")]) {
            Err(Error::Url(why)) => assert!(why.contains("prefer-standby"), "{why}"),
            other => panic!("accepted: {other:?}"),
        }
    }

    /// A service's parameters fill in what the URL leaves out, in either form, before the
    /// environment does; `service=` names it, else `PGSERVICE`; the user's file
    /// (`PGSERVICEFILE`) is read before the system's (`PGSYSCONFDIR`), and a file libpq
    /// would refuse is refused with its line.
    #[test]
    fn a_service_is_read_as_libpq_reads_it() {
        let dir = crate::Scratch::new("service");
        let user_file = dir.join("user.conf");
        std::fs::write(
            &user_file,
            "# the user's\n[other]\nport=1\n\n  [app]  \nhost=db.internal\nport=6000\n\
             user=svc\nport=6001\noptions=-c statement_timeout=5s\n\
             application_name=it's\ntarget_session_attrs=primary\n[after]\nport=2\n",
        )
        .expect("write the user's file");
        std::fs::write(
            dir.join("pg_service.conf"),
            "[app]\nport=7000\n[system]\nhost=sys.internal\n",
        )
        .expect("write the system's file");
        let (user_text, dir_text) = (user_file.display().to_string(), dir.display().to_string());
        let env_with = |extra: &[(&'static str, &str)]| {
            let mut env = vec![
                ("PGSERVICEFILE", user_text.clone()),
                ("PGSYSCONFDIR", dir_text.clone()),
                ("PGUSER", "from-env".to_owned()),
            ];
            env.extend(
                extra
                    .iter()
                    .map(|(name, value)| (*name, (*value).to_owned())),
            );
            env
        };
        let read = |url: &str, env: &[(&str, String)]| {
            let env = |name: &str| {
                env.iter()
                    .find(|(variable, _)| *variable == name)
                    .map(|(_, value)| value.clone())
            };
            let url = resolve(url, &env)?;
            let (rest, taken) = take(&url, &OPTIONS);
            let mut config: Config = rest.parse().expect("a URL");
            super::super::environment::fill(&mut config, &env)?;
            apply(&mut config, taken, &env).map(|libpq| (config, libpq))
        };
        let env = env_with(&[]);

        // The URL's host and database stand; the rest is the service's (its first port),
        // its user before PGUSER's.
        let (config, libpq) = read("postgres://h/db?service=app", &env).expect("read");
        assert_eq!(config.get_hosts(), [Host::Tcp("h".into())]);
        assert_eq!(config.get_dbname(), Some("db"));
        assert_eq!(config.get_ports(), [6000]);
        assert_eq!(config.get_user(), Some("svc"));
        assert_eq!(config.get_options(), Some("-c statement_timeout=5s"));
        assert_eq!(config.get_application_name(), Some("it's"));
        assert_eq!(libpq.recovery, Some(Recovery::Primary));
        // The key=value form, named by PGSERVICE.
        let env_named = env_with(&[("PGSERVICE", "app")]);
        let (config, _) = read("user=mine port=5", &env_named).expect("read");
        assert_eq!(config.get_hosts(), [Host::Tcp("db.internal".into())]);
        assert_eq!(config.get_ports(), [5]);
        assert_eq!(config.get_user(), Some("mine"));
        assert_eq!(config.get_options(), Some("-c statement_timeout=5s"));
        assert_eq!(config.get_application_name(), Some("it's"));
        // The URL's service before PGSERVICE's; found in the system's file only.
        let (config, _) = read("postgres://?service=system", &env_named).expect("read");
        assert_eq!(config.get_hosts(), [Host::Tcp("sys.internal".into())]);
        assert_eq!(config.get_user(), Some("from-env"));
        // No service: the string as it is.
        assert_eq!(
            resolve("host=h dbname=db", &|_| None).expect("read"),
            "host=h dbname=db"
        );

        let refused = |text: &str, url: &str| {
            std::fs::write(&user_file, text).expect("write the user's file");
            match read(url, &env) {
                Err(Error::Url(why)) => why,
                other => panic!("{text}: accepted: {other:?}"),
            }
        };
        let why = refused("[app]\nhost=h\n", "postgres://?service=missing");
        assert!(why.contains("service \"missing\" not found"), "{why}");
        let why = refused("[app]\nhost=h\nservice=other\n", "service=app");
        assert!(why.contains("line 3: a service cannot name"), "{why}");
        let why = refused("[app]\n# ok\nhost h\n", "service=app");
        assert!(why.contains("line 3: \"host h\" is not key=value"), "{why}");
        let why = refused("[app]\nhost =h\n", "service=app");
        assert!(
            why.contains("line 2: \"host \" is not a libpq parameter"),
            "{why}"
        );
        // What the service asks is read as if the URL asked it.
        let why = refused("[app]\nreplication=database\n", "service=app");
        assert!(why.contains("replication=database"), "{why}");
    }

    /// A URL is read as libpq reads it: its parts as the parameters they stand for, a port
    /// only where one is written (so that `PGPORT` fills it in), a host list split, a
    /// parameter given twice the last time; one that cannot be read is left whole.
    #[test]
    fn a_url_is_read_as_its_parameters() {
        let pairs = |url: &str| url_as_pairs(url).expect("a URL");
        assert_eq!(
            pairs("postgresql://me:p%40ss'w@[::1]:6000,h2,%2Frun%2Fpg/my%20db?sslmode=require&port=7000,,1"),
            "user='me' password='p@ss\\'w' host='::1,h2,/run/pg' dbname='my db' \
             sslmode='require' port='7000,,1'"
        );
        assert_eq!(pairs("postgres://h/db"), "host='h' dbname='db'");
        assert_eq!(pairs("postgres://"), "");
        assert_eq!(pairs("postgres://:@/?host=a,b"), "host='a,b'");
        for unreadable in ["postgres://[::1/db", "postgres://h/db?sslmode", "host=h"] {
            assert_eq!(url_as_pairs(unreadable), None, "{unreadable}");
        }
        // PGPORT for the URL's host (tokio-postgres's reading of the URL put 5432 there).
        let env = |name: &str| (name == "PGPORT").then(|| "6543".to_owned());
        let mut config: Config = resolve("postgres://h/db", &env)
            .expect("read")
            .parse()
            .expect("read");
        super::super::environment::fill(&mut config, &env).expect("filled");
        assert_eq!(
            (config.get_hosts(), config.get_ports()),
            (&[Host::Tcp("h".into())][..], &[6543][..])
        );
        let config: Config = resolve("postgres://h:5433,[::1]/db", &env)
            .expect("read")
            .parse()
            .expect("read");
        assert_eq!(config.get_ports(), [5433, 5432]);
    }

    /// `require_auth` (or `PGREQUIREAUTH`) is read as libpq reads it: its names, each once,
    /// all negated or none; and said back as given.
    #[test]
    fn require_auth_is_read_as_libpq_reads_it() {
        let (_, libpq) = applied(
            "postgres://h/db?require_auth=scram-sha-256,none",
            &[("PGREQUIREAUTH", "password")],
        )
        .expect("read");
        let methods = libpq.require_auth.expect("read");
        assert!(methods.allows(AuthMethod::ScramSha256) && methods.allows(AuthMethod::None));
        assert!(!methods.allows(AuthMethod::Password) && !methods.allows(AuthMethod::Md5));
        assert_eq!(methods.to_string(), "require_auth=none,scram-sha-256");
        let (_, libpq) = applied("host=h", &[("PGREQUIREAUTH", "!password,!md5")]).expect("read");
        let methods = libpq.require_auth.expect("read");
        assert!(!methods.allows(AuthMethod::Password) && methods.allows(AuthMethod::None));
        assert_eq!(methods.to_string(), "require_auth=!password,!md5");
        assert_eq!(applied("host=h", &[]).expect("read").1.require_auth, None);
        for (value, why) in [
            ("scram", "\"scram\" is not one of"),
            ("md5,!password", "cannot be mixed"),
            ("md5,md5", "md5 is given twice"),
            ("", "\"\" is not one of"),
        ] {
            match applied(&format!("host=h require_auth='{value}'"), &[]) {
                Err(Error::Url(said)) => assert!(said.contains(why), "{value}: {said}"),
                other => panic!("{value}: accepted: {other:?}"),
            }
        }
    }
}
