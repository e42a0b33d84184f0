//! A throwaway Postgres cluster started from the machine's own `initdb`/`postgres`, for
//! `permd demo` and the tests.
//!
//! Postgres refuses to run as root, so when we are root the cluster runs as the
//! `postgres` user (or `nobody`). A small shell watchdog owns the server: it stops the
//! server and removes the data directory when our end of its stdin closes, which happens
//! even if this process is killed, so no cluster outlives its owner.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context as _};

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Keep the cluster here (created if missing, reused if initialized) instead of a
    /// temporary directory that is removed at stop.
    pub data_dir: Option<PathBuf>,
    /// Settings tuned for throwaway speed (no fsync). Never for data you keep.
    pub unsafe_fast: bool,
    /// Listen on this port instead of a free one.
    pub port: Option<u16>,
    /// Start a hot standby of the cluster listening on this local port (a base backup
    /// that then streams its WAL) instead of a new cluster.
    pub standby_of: Option<u16>,
    /// Accept TLS with this certificate (`ssl=on`).
    pub tls: Option<ServerTls>,
    /// More server settings, each `name=value` (as `postgres -c`); they win over permd's.
    pub settings: Vec<String>,
}

/// A server's certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The certificate (chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// CAs whose client certificates the server checks, when a client shows one (PEM;
    /// `ssl_ca_file`). `pg_stat_ssl` then shows the client's name.
    pub client_ca_pem: Option<String>,
}

/// How to stop the server (for fault tests): Postgres' shutdown modes, or SIGKILL of the
/// postmaster, which leaves orphaned backends and a stale pid file behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit.
    Fast,
    /// Exit at once without a checkpoint; crash recovery at the next start.
    Immediate,
    /// SIGKILL the postmaster.
    Kill,
}

/// A running throwaway cluster. Dropping it stops the server (and removes its directory
/// unless `data_dir` was given).
pub struct Cluster {
    port: u16,
    dir: PathBuf,
    /// `data_dir` was given: the directory stays at stop.
    keep: bool,
    /// The watchdog and the two ends of its command channel. A `Mutex` so a shared
    /// (`&'static`) cluster can still be stopped and restarted by one caller at a time.
    control: Mutex<Control>,
}

struct Control {
    watchdog: Child,
    commands: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
}

/// The watchdog: starts the server with pg_ctl, then obeys one command per stdin line and
/// answers each on stdout. End of input (our process ended, however) stops the server and
/// removes the directory.
const WATCHDOG: &str = r#"
dir="$1"; bin="$2"; port="$3"; keep="$4"; shift 4
trap '' INT TERM HUP
opts="-p $port -k $dir -c listen_addresses=127.0.0.1"
for setting in "$@"; do opts="$opts -c $setting"; done
if [ -f "$dir/data/PG_VERSION" ]; then
  :
elif [ -n "$PERMD_PG_PRIMARY_PORT" ]; then
  # The primary's checkpoint at once (a spread one takes minutes once a table is filled).
  "$bin/pg_basebackup" -h 127.0.0.1 -p "$PERMD_PG_PRIMARY_PORT" -U postgres -D "$dir/data" -R -X stream --no-sync --checkpoint=fast >"$dir/initdb.log" 2>&1 \
    || { echo "failed: pg_basebackup: $(tail -n 5 "$dir/initdb.log" | tr '\n' ' ')"; exit 1; }
else
  "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
    || { echo "failed: initdb: $(tail -n 5 "$dir/initdb.log" | tr '\n' ' ')"; exit 1; }
fi
start() {
  # After a SIGKILL of the postmaster its orphaned backends hold the shared memory for a
  # moment, and the start fails: retry for a while.
  tries=0
  until "$bin/pg_ctl" start -w -t 60 -s -D "$dir/data" -l "$dir/postgres.log" -o "$opts" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -ge 150 ] && return 1
    sleep 0.1
  done
}
answer_start() { if start; then echo ready; else echo "failed: $(tail -n 5 "$dir/postgres.log" | tr '\n' ' ')"; fi; }
answer_start
while read -r command; do
  case "$command" in
    fast|immediate) "$bin/pg_ctl" stop -w -s -D "$dir/data" -m "$command" >/dev/null 2>&1; echo done ;;
    kill) kill -KILL "$(head -n 1 "$dir/data/postmaster.pid")" 2>/dev/null; echo done ;;
    start) answer_start ;;
    *) break ;;
  esac
done
"$bin/pg_ctl" stop -w -s -D "$dir/data" -m fast >/dev/null 2>&1
[ "$keep" = 1 ] || rm -rf "$dir"
"#;

impl Cluster {
    /// Starts a cluster on a free loopback port and waits until it accepts connections.
    pub fn start(options: &ClusterOptions) -> anyhow::Result<Self> {
        let bin = find_bin_dir()?;
        let keep = options.data_dir.is_some();
        let dir = match &options.data_dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!(
                "permd-pg-{}-{:016x}",
                std::process::id(),
                rand_u64()
            )),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut settings: Vec<String> = ["max_connections=200", "shared_buffers=128MB"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if let Some(tls) = &options.tls {
            settings.extend(server_tls(&dir, tls)?);
        }
        let user = unprivileged_user()?;
        if let Some((uid, gid)) = user {
            chown_tree(&dir, uid, gid)?;
        }
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        if options.unsafe_fast {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        // Last, so that they win over permd's.
        settings.extend(options.settings.iter().cloned());
        // The watchdog's own stderr (the shell's errors; the server logs to postgres.log)
        // goes to a file beside the data: inherited, it would keep our stderr open after we
        // exit, while the watchdog stops the server (a test runner waits for it, or calls
        // the test leaky).
        let watchdog_log = std::fs::File::create(dir.join("watchdog.log"))
            .with_context(|| format!("create {}", dir.join("watchdog.log").display()))?;
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("permd-pg-watchdog")
            .arg(&dir)
            .arg(&bin)
            .arg(port.to_string())
            .arg(if keep { "1" } else { "0" })
            .args(&settings)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(watchdog_log);
        if let Some(primary) = options.standby_of {
            command.env("PERMD_PG_PRIMARY_PORT", primary.to_string());
        }
        use std::os::unix::process::CommandExt as _;
        // A process group of its own: Ctrl-C in a terminal (or `timeout`) signals our
        // group, and the cluster must outlive that signal long enough for us to stop it
        // cleanly and remove its directory.
        command.process_group(0);
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid);
        }
        let mut watchdog = command
            .spawn()
            .context("start the postgres watchdog (/bin/sh)")?;
        let commands = watchdog.stdin.take();
        let answers = BufReader::new(watchdog.stdout.take().context("watchdog stdout")?);
        let cluster = Self {
            port,
            dir,
            keep,
            control: Mutex::new(Control {
                watchdog,
                commands,
                answers,
            }),
        };
        cluster.expect_answer("ready")?;
        Ok(cluster)
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the watchdog's next answer and checks it.
    fn expect_answer(&self, expected: &str) -> anyhow::Result<()> {
        let mut line = String::new();
        self.control()
            .answers
            .read_line(&mut line)
            .context("read the watchdog's answer")?;
        if line.trim() == expected {
            return Ok(());
        }
        let mut log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        log += &std::fs::read_to_string(self.dir.join("watchdog.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "postgres did not become {expected}: {} (log tail: {})",
            if line.is_empty() {
                "the watchdog exited"
            } else {
                line.trim()
            },
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }

    fn command(&self, command: &str, expected: &str) -> anyhow::Result<()> {
        {
            let mut control = self.control();
            let commands = control
                .commands
                .as_mut()
                .context("the cluster is stopped")?;
            writeln!(commands, "{command}").context("send to the watchdog")?;
        }
        self.expect_answer(expected)
    }

    /// Stops the server, leaving the data in place (see `start_server`).
    pub fn stop_server(&self, mode: StopMode) -> anyhow::Result<()> {
        let command = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
            StopMode::Kill => "kill",
        };
        self.command(command, "done")
    }

    /// Starts the server again on the same port and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        self.command("start", "ready")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the cluster (data/ and the server log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server and waits for the watchdog to clean up.
    pub fn stop(self) {
        self.shut_down();
    }

    fn shut_down(&self) {
        let mut control = self.control();
        // End of input tells the watchdog to stop the server and clean up.
        control.commands.take();
        let _ = control.watchdog.wait();
        // The watchdog removed what it could; when we are root it runs as another user,
        // who may not remove the directory itself from a parent that is not
        // world-writable (a TMPDIR of our own).
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The directory of `initdb` and `postgres`: `PERMD_PG_BIN`, else next to an `initdb`
/// on PATH, else the newest `/usr/lib/postgresql/*/bin`.
/// Writes the certificate and key beside the data (the key readable by its owner alone, as
/// Postgres demands) and returns the settings that serve them.
fn server_tls(dir: &Path, tls: &ServerTls) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, &tls.cert_pem).with_context(|| format!("write {}", cert.display()))?;
    std::fs::write(&key, &tls.key_pem).with_context(|| format!("write {}", key.display()))?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", key.display()))?;
    let mut settings = vec![
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ];
    if let Some(pem) = &tls.client_ca_pem {
        let ca = dir.join("client-ca.crt");
        std::fs::write(&ca, pem).with_context(|| format!("write {}", ca.display()))?;
        settings.push(format!("ssl_ca_file={}", ca.display()));
    }
    Ok(settings)
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PERMD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        let initdb = dir.join("initdb");
        if initdb.is_file() && dir.join("postgres").is_file() {
            // Resolve symlinks so the binaries find their share/ directory.
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(parent) = real.parent() {
                return Ok(parent.to_path_buf());
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "no Postgres server binaries found (initdb/postgres): install the postgresql package \
         or set PERMD_PG_BIN to their directory",
    )
}

/// When we are root: the uid/gid of `postgres` (or `nobody`) to run the cluster as (and
/// the tests' other servers, which refuse root as Postgres does).
pub fn unprivileged_user() -> anyhow::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt as _;
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Ok(Some((uid, gid)));
                }
            }
        }
    }
    bail!("running as root and no unprivileged user (postgres or nobody) to run Postgres as")
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            chown_tree(&path, uid, gid)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// A port that was free a moment ago on 127.0.0.1, for a server to bind later: below the
/// kernel's range of ephemeral ports when that leaves room (16,384 ports under its start).
/// A port of that range (what binding port 0 gives) may become some outgoing connection's
/// local port before the server binds it, or while it is down between a crash and a
/// restart: a test suite opening thousands of connections lost a cluster's start so
/// ("could not bind IPv4 address: Address already in use").
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok());
    if let Some(end) = ephemeral_start {
        let start = end.saturating_sub(16_384).max(1024);
        if end > start {
            for _ in 0..64 {
                let port = start + (rand_u64() % u64::from(end - start)) as u16;
                if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    return Ok(port);
                }
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A different random number on every call (std's per-map random keys).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port is free, and below the kernel's range of ephemeral ports when that leaves
    /// room (Linux's default range starts at 32768).
    #[test]
    fn a_free_port_is_taken_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("the kernel's ephemeral port range");
        let start: u16 = range
            .split_whitespace()
            .next()
            .and_then(|start| start.parse().ok())
            .expect("its start");
        for _ in 0..20 {
            let port = free_port().expect("a free port");
            assert!(
                start <= 1024 || (1024..start).contains(&port),
                "{port} in {range}"
            );
            TcpListener::bind(("127.0.0.1", port)).expect("still free");
        }
    }
}
