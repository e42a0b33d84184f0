//! A throwaway PgBouncer in front of a test cluster, started from the machine's own
//! `pgbouncer` (Debian's package; `.ci/run` installs it), as the cluster is: as an
//! unprivileged user when we are root (PgBouncer refuses root too), on a free port, its
//! directory removed at drop. A shell watchdog owns it and stops it when our end of its
//! stdin closes, so no PgBouncer outlives the test binary, however that ends.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use super::DEADLINE;

/// PgBouncer's pooling modes.
#[derive(Debug, Clone, Copy)]
pub enum PoolMode {
    /// A server connection per client connection, for as long as it lasts.
    Session,
    /// A server connection per transaction.
    Transaction,
    /// A server connection per statement (no transaction of more than one).
    Statement,
}

/// A running PgBouncer. Dropping it stops it and removes its directory.
pub struct Bouncer {
    port: u16,
    dir: PathBuf,
    watchdog: Child,
    commands: Option<ChildStdin>,
}

/// Starts PgBouncer in the background, then waits on stdin: a line `restart` stops it
/// and starts it again (answering `started`), end of input stops it and removes its
/// directory. SIGTERM, PgBouncer's immediate shutdown: its SIGINT waits for every client
/// to leave.
const WATCHDOG: &str = r#"
bin="$1"; ini="$2"
trap '' INT TERM HUP
"$bin" "$ini" 2>>"$(dirname "$ini")/pgbouncer.log" & pid=$!
while read -r command; do
  case "$command" in
    restart) kill -TERM "$pid"; wait "$pid"
             "$bin" "$ini" 2>>"$(dirname "$ini")/pgbouncer.log" & pid=$!
             echo started ;;
    *) break ;;
  esac
done
kill -TERM "$pid"; wait "$pid"
rm -rf "$(dirname "$ini")"
"#;

impl Bouncer {
    /// PgBouncer on a free port in front of the server of `url` (a test URL,
    /// `postgres://user@127.0.0.1:PORT/database`), pooling in `mode`, with PgBouncer's
    /// defaults otherwise (no startup parameter ignored), letting in `postgres` without a
    /// password (`auth_type = trust`); and `url` through it.
    pub fn in_front_of(url: &str, mode: PoolMode) -> (Self, String) {
        Self::with_settings(url, mode, &[])
    }

    /// [`Self::in_front_of`], with PgBouncer's `settings` (of its `[pgbouncer]` section:
    /// `default_pool_size`, the server sessions at most for each database and user, 20
    /// unless given; `server_round_robin`, …).
    pub fn with_settings(url: &str, mode: PoolMode, settings: &[(&str, &str)]) -> (Self, String) {
        let (head, rest) = url.split_once("@127.0.0.1:").expect("a test URL");
        let (server_port, database) = rest.split_once('/').expect("a test URL");
        let bouncer = Self::start(server_port.parse().expect("a port"), mode, settings);
        let through = format!("{head}@127.0.0.1:{}/{database}", bouncer.port);
        (bouncer, through)
    }

    fn start(server_port: u16, mode: PoolMode, settings: &[(&str, &str)]) -> Self {
        let bin = binary();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "permd-bouncer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create PgBouncer's directory");
        let port = permd::embedded::free_port().expect("a free port");
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        };
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")
            .expect("write PgBouncer's auth file");
        let ini = dir.join("pgbouncer.ini");
        let mut given: String = settings
            .iter()
            .map(|(name, value)| format!("{name} = {value}\n"))
            .collect();
        if !settings
            .iter()
            .any(|(name, _)| *name == "default_pool_size")
        {
            given.push_str("default_pool_size = 20\n");
        }
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port={}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {}\n\
                 pool_mode = {mode}\n\
                 max_client_conn = 200\n\
                 {given}",
                server_port,
                dir.join("users.txt").display()
            ),
        )
        .expect("write pgbouncer.ini");
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("permd-bouncer-watchdog")
            .arg(&bin)
            .arg(&ini)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        use std::os::unix::process::CommandExt as _;
        command.process_group(0);
        if let Some((uid, gid)) = permd::embedded::unprivileged_user().expect("read the users") {
            for path in [&dir, &dir.join("users.txt"), &ini] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
            }
            command.uid(uid).gid(gid);
        }
        let mut watchdog = command
            .spawn()
            .expect("start PgBouncer's watchdog (/bin/sh)");
        let commands = watchdog.stdin.take();
        let bouncer = Self {
            port,
            dir,
            watchdog,
            commands,
        };
        bouncer.wait_until_listening();
        bouncer
    }

    /// Waits until PgBouncer accepts connections; fails the test with its log if it does
    /// not within the deadline.
    fn wait_until_listening(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < DEADLINE,
                "PgBouncer did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stops PgBouncer (its clients' connections close) and starts it again.
    pub fn restart(&mut self) {
        let commands = self.commands.as_mut().expect("PgBouncer's watchdog");
        writeln!(commands, "restart").expect("tell PgBouncer's watchdog");
        let mut answer = String::new();
        BufReader::new(
            self.watchdog
                .stdout
                .as_mut()
                .expect("the watchdog's answers"),
        )
        .read_line(&mut answer)
        .expect("read the watchdog's answer");
        assert_eq!(answer.trim(), "started", "{}", self.log());
        self.wait_until_listening();
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // End of input tells the watchdog to stop PgBouncer.
        self.commands.take();
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The values of the settings `names` in a server session a client of `url` (through a
/// PgBouncer) gets, each read in the simple protocol, which leaves nothing prepared
/// behind. In transaction mode that is the server session freed last.
pub async fn settings_through(url: &str, names: &[&str]) -> Vec<String> {
    settings_of(&mut client_through(url).await, names).await
}

/// The values of the settings `names` in `client`'s server session (in the simple
/// protocol: nothing prepared stays behind).
pub async fn settings_of(client: &mut sqlx::PgConnection, names: &[&str]) -> Vec<String> {
    use sqlx::Row as _;
    let mut values = Vec::new();
    for name in names {
        let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut *client)
            .await
            .expect("SHOW");
        values.push(row.try_get(0).expect("a value"));
    }
    values
}

/// `n` clients of `url` (through a PgBouncer in transaction mode), each in a transaction
/// at once, so that each holds a server session of its own: PgBouncer opens as many as
/// it needs. Committed, they leave those sessions idle.
pub async fn clients_in_sessions(url: &str, n: usize) -> Vec<sqlx::PgConnection> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut client = client_through(url).await;
        sqlx::raw_sql("BEGIN; SELECT 1")
            .execute(&mut client)
            .await
            .expect("hold a server session");
        clients.push(client);
    }
    clients
}

/// Has the PgBouncer in transaction mode at `url` open `n` server sessions, left idle.
pub async fn idle_sessions(url: &str, n: usize) {
    for mut client in clients_in_sessions(url, n).await {
        sqlx::raw_sql("COMMIT")
            .execute(&mut client)
            .await
            .expect("commit");
    }
}

/// A client of `url`, through a PgBouncer (which refuses the startup parameter sqlx
/// sends by default, `extra_float_digits`).
pub async fn client_through(url: &str) -> sqlx::PgConnection {
    use sqlx::ConnectOptions as _;
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a test URL");
    options
        .extra_float_digits(None)
        .connect()
        .await
        .expect("connect through PgBouncer")
}

/// `pgbouncer` on PATH, else Debian's `/usr/sbin/pgbouncer`.
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| candidate.is_file())
    });
    let binary = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"));
    assert!(
        binary.is_file(),
        "no pgbouncer on PATH nor at /usr/sbin/pgbouncer: install the pgbouncer package \
         (.ci/run does)"
    );
    binary
}
