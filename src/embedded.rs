//! A throwaway Postgres cluster started from the machine's own `initdb`/`postgres`, for
//! `permd demo` and the tests.
//!
//! Postgres refuses to run as root, so when we are root the cluster runs as the
//! `postgres` user (or `nobody`). A small shell watchdog owns the server: it stops the
//! server and removes the data directory when our end of its stdin closes, which happens
//! even if this process is killed, so no cluster outlives its owner.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Keep the cluster here (created if missing, reused if initialized) instead of a
    /// temporary directory that is removed at stop.
    pub data_dir: Option<PathBuf>,
    /// Settings tuned for throwaway speed (no fsync). Never for data you keep.
    pub unsafe_fast: bool,
}

/// A running throwaway cluster. Dropping it stops the server (and removes its directory
/// unless `data_dir` was given).
pub struct Cluster {
    port: u16,
    dir: PathBuf,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

const WATCHDOG: &str = r#"
dir="$1"; bin="$2"; port="$3"; keep="$4"; shift 4
trap '' INT TERM HUP
if [ ! -f "$dir/data/PG_VERSION" ]; then
  "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
    || { echo "initdb failed: $(tail -n 5 "$dir/initdb.log")" >&2; exit 1; }
fi
"$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 "$@" >>"$dir/postgres.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/watchdog.pid"
read _ignored
kill -INT "$pid" 2>/dev/null
wait "$pid"
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
        let user = unprivileged_user()?;
        if let Some((uid, gid)) = user {
            chown_tree(&dir, uid, gid)?;
        }
        let port = free_port()?;
        let mut settings: Vec<String> = ["max_connections=200", "shared_buffers=128MB"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
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
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("permd-pg-watchdog")
            .arg(&dir)
            .arg(&bin)
            .arg(port.to_string())
            .arg(if keep { "1" } else { "0" });
        for s in &settings {
            command.arg("-c").arg(s);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
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
        let stdin = watchdog.stdin.take();
        let mut cluster = Self {
            port,
            dir,
            watchdog,
            stdin,
        };
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let pid_file = self.dir.join("data").join("postmaster.pid");
        loop {
            // postmaster.pid's last line says "ready" once connections are accepted.
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                if text.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                    return Ok(());
                }
            }
            if let Some(status) = self.watchdog.try_wait()? {
                bail!(
                    "postgres exited during start-up ({status}); {}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not become ready within {timeout:?}; {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "log tail: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
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

    /// The postmaster's process id.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("watchdog.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server and waits for the watchdog to clean up.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.watchdog.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The directory of `initdb` and `postgres`: `PERMD_PG_BIN`, else next to an `initdb`
/// on PATH, else the newest `/usr/lib/postgresql/*/bin`.
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

/// When we are root: the uid/gid of `postgres` (or `nobody`) to run the cluster as.
fn unprivileged_user() -> anyhow::Result<Option<(u32, u32)>> {
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

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> anyhow::Result<u16> {
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
