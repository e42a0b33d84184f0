//! libpq's connection strings, the URL form (`postgres://…?name=value&…`) and the key=value
//! form (`host=… dbname='my db'`): the parameters permd reads itself are taken out of them
//! before tokio-postgres parses the rest, which refuses what it does not know.

use std::path::PathBuf;

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::Config;

use super::environment::Env;
use super::Error;

/// Takes the parameters named `names` out of `url`: what is left, and the parameters taken
/// (decoded), in the order written. A string of neither form is left whole, for
/// tokio-postgres to say why.
pub(super) fn take(url: &str, names: &[&str]) -> (String, Vec<(String, String)>) {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_from_query(url, names)
    } else {
        take_from_pairs(url, names).unwrap_or_else(|| (url.to_owned(), Vec::new()))
    }
}

/// The URL form: options in the query, `&`-separated and percent-encoded.
fn take_from_query(url: &str, names: &[&str]) -> (String, Vec<(String, String)>) {
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
fn take_from_pairs(url: &str, names: &[&str]) -> Option<(String, Vec<(String, String)>)> {
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

/// libpq's parameters that tokio-postgres does not know and permd reads itself: taken out
/// of the URL before tokio-postgres reads the rest, then given to [`apply`].
pub(super) const OPTIONS: [&str; 12] = [
    "target_session_attrs",
    "client_encoding",
    "fallback_application_name",
    "keepalives_count",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "passfile",
    "service",
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
    mut taken: Vec<(String, String)>,
    env: Env<'_>,
) -> Result<Libpq, Error> {
    let mut libpq = Libpq::default();
    if !taken.iter().any(|(name, _)| name == "target_session_attrs") {
        if let Some(value) = env("PGTARGETSESSIONATTRS") {
            taken.push(("target_session_attrs".into(), value));
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
            "service" => {
                return refused(
                    "permd does not read pg_service.conf: give the service's parameters in the \
                     URL",
                )
            }
            "requirepeer" => {
                return refused(
                    "permd does not check the user of a Unix socket's server: connect over TCP \
                     with sslmode=verify-full to check whom you reach",
                )
            }
            "require_auth" => {
                return refused(
                    "permd does not restrict the authentication methods; to insist on SCRAM \
                     bound to TLS, give channel_binding=require",
                )
            }
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
}
