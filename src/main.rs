//! The `permd` binary: parse the command line, set up logging, call the library.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use permd::config::{Cli, Command, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(filter) => filter,
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "permd: --log (PERMD_LOG) {:?} is not a log filter: {error} (e.g. `info`, \
                 `permd=debug,info`)",
                cli.log
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // By default a failed write is reported with `eprint!`, which panics when stderr
        // is gone (a log pipe whose reader exited): the panic took down whichever task was
        // logging, the applier or the signal handler, and the daemon went on answering
        // from a mirror that no longer followed Postgres and ignored SIGTERM. A log line
        // that cannot be written is lost instead.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => {
            logs.json().flatten_event(true).init();
            log_panics();
        }
        LogFormat::Text | LogFormat::Plain => logs
            .with_ansi(
                matches!(cli.log_format, LogFormat::Text)
                    && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .init(),
    }
    let runtime = match permd::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "permd: start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let error = permd::error_chain(error.as_ref());
            tracing::error!("{error}");
            // Also as a line of its own for whoever reads the terminal, unless every line
            // must be JSON. Not `eprintln!`, which panics when stderr is gone.
            if !matches!(cli.log_format, LogFormat::Json) {
                let _ = writeln!(std::io::stderr(), "permd: {error}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match command {
        Command::Migrate(args) => {
            interruptible(shutdown, async {
                let pool = permd::db::pool(&args.database_url).await?;
                // One server session for every step (`db::migrate`).
                let mut connection = pool.acquire().await.context("connect to the database")?;
                permd::db::migrate(&mut *connection).await?;
                if args.reference_model {
                    permd::db::migrate_reference_model(&mut *connection).await?;
                }
                tracing::info!(reference_model = args.reference_model, "migrations applied");
                Ok(())
            })
            .await
        }
        Command::Serve(args) => {
            let settings = args.server.settings(&args.database_url)?;
            permd::cancel_on_signals(shutdown.clone());
            permd::reload_on_sighup(settings.tls.clone(), None);
            let daemon = permd::Daemon::start(settings, shutdown).await?;
            daemon.wait().await
        }
        Command::Verify(args) => {
            let target = args.target()?;
            let verdict =
                interruptible(shutdown, permd::verify::verify(&args.database_url, &target)).await?;
            // Not `print!`, which panics when stdout is gone (`verify | head`): the
            // verdict is the exit status.
            let _ = write!(std::io::stdout(), "{}", verdict.text());
            match (verdict.differing(), verdict.unverified()) {
                (0, 0) => Ok(()),
                (subjects, 0) => {
                    anyhow::bail!("permd differs from the database in {subjects} subject(s)")
                }
                (0, daemons) => anyhow::bail!("{daemons} daemon(s) could not be verified"),
                (subjects, daemons) => anyhow::bail!(
                    "permd differs from the database in {subjects} subject(s), and {daemons} \
                     daemon(s) could not be verified"
                ),
            }
        }
        Command::Route(args) => {
            let settings = args.settings()?;
            permd::cancel_on_signals(shutdown.clone());
            // SIGHUP is the router's to take (its certificate, and its shards file).
            permd::route::run(settings, shutdown).await
        }
        Command::Demo(args) => {
            permd::cancel_on_signals(shutdown.clone());
            permd::demo::run(args, shutdown).await
        }
    }
}

/// Runs a one-off command until it ends or SIGINT or SIGTERM arrives, which ends it with an
/// error: either way its runtime then ends normally, and what it set up is taken down (the
/// relay's directory, `sync::Relay`), where the signal's default killed the process.
async fn interruptible<T>(
    shutdown: CancellationToken,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    permd::cancel_on_signals(shutdown.clone());
    tokio::select! {
        done = work => done,
        () = shutdown.cancelled() => anyhow::bail!("interrupted"),
    }
}

/// With JSON logs a panic's message becomes a log line too (an error with the panic's
/// place and message), where the default hook writes plain text to stderr: every line
/// stays JSON. (A panicked applier or server is then also reported by the daemon.)
fn log_panics() {
    std::panic::set_hook(Box::new(|panic| {
        tracing::error!(panic = %panic, "panicked");
    }));
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A log writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("the buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn with_json_logs_a_panic_is_one_json_line() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        super::log_panics();
        let caught = std::panic::catch_unwind(|| panic!("a bug"));
        let _ = std::panic::take_hook();
        assert!(caught.is_err());
        let text =
            String::from_utf8(captured.0.lock().expect("the buffer").clone()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(line["level"], "ERROR", "{line}");
        let panic = line["panic"].as_str().expect("the panic");
        assert!(
            panic.contains("a bug") && panic.contains("main.rs"),
            "{panic}"
        );
    }
}
