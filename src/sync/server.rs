//! Which server a session reached, and whether the applier can go on there from where
//! the last session left off.
//!
//! Transaction ids that were handed out but never made durable before a crash are handed
//! out again after it, possibly below the applier's place: a server that recovered from a
//! crash since the last session cannot be caught up from the changelog. The reset times
//! of the shared statistics tell (`Incarnation`): Postgres discards them whenever it starts
//! after anything but a clean shutdown (a crash, an immediate stop, a killed backend's
//! restart of every process, a restored backup), and keeps them through a clean restart,
//! after which the changelog is whole and the place good. Another server than the last
//! session's (another host of the URL, a failover, an address that now leads elsewhere)
//! has statistics reset at other times too, and needs the same reload: it need not hold
//! all the last one held, nor continue its transaction ids. Which of the two it was, by
//! the address the server gives (none over a Unix socket) and its cluster's system
//! identifier (which its standbys share), is only said, never decided on (`Place`).
//! Another database of the same server (its oid) is reloaded from too, saying so.

use std::time::Duration;

use tokio_postgres::Client;

use super::applier::timed;
use super::Error;

/// The server a session reached: what tells a crash, where it is, and when it started.
#[derive(Debug, Clone)]
pub(super) struct Server {
    incarnation: Incarnation,
    place: Place,
    /// `pg_postmaster_start_time()`, as seconds since the epoch: a clean restart moves it
    /// (said in the log, nothing more).
    pub(super) started: String,
}

impl Server {
    /// Reads the server `client` is connected to, each round trip bounded by `limit`.
    /// The times as seconds since the epoch: as text they would follow the session's time
    /// zone and date style, which the database's or the role's settings can change between
    /// two sessions of one server.
    pub(super) async fn read(client: &Client, limit: Duration) -> Result<Self, Error> {
        let row = timed(
            limit,
            "the server's start time",
            client.query_one(
                "SELECT extract(epoch FROM pg_postmaster_start_time())::text, \
                    coalesce(extract(epoch FROM \
                        (SELECT stats_reset FROM pg_stat_bgwriter))::text, ''), \
                    coalesce(extract(epoch FROM \
                        (SELECT stats_reset FROM pg_stat_archiver))::text, ''), \
                    coalesce(host(inet_server_addr()), ''), \
                    coalesce(inet_server_port()::text, ''), current_database()::text, \
                    (SELECT oid FROM pg_database WHERE datname = current_database())::text",
                &[],
            ),
        )
        .await?;
        let started: String = row.try_get(0)?;
        let reset: [String; 2] = [row.try_get(1)?, row.try_get(2)?];
        let place = Place::new(
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
            row.try_get(6)?,
        )
        .of_cluster(system_identifier(client, limit).await);
        Ok(Self {
            incarnation: Incarnation {
                reset: (!reset.iter().any(String::is_empty)).then_some(reset),
                started: started.clone(),
            },
            place,
            started,
        })
    }

    /// Why a session on this server cannot go on from where a session on `last` left
    /// off, if it cannot: it recovered from a crash since, or it is another server, or
    /// another database. The same server, another database (a service or a name that now
    /// leads to another, one dropped and created again under the same name): nothing of
    /// its changelog follows from the last one's place either.
    pub(super) fn reload_since(&self, last: &Server) -> Option<String> {
        let moved = last.place.moved_to(&self.place);
        if self.incarnation.recovered_since(&last.incarnation) {
            return Some(moved.unwrap_or_else(|| "postgres recovered from a crash".into()));
        }
        moved
    }
}

/// The system identifier of the server's cluster, or nothing where it cannot be read
/// (`pg_control_system()`, which a managed service may refuse): it only names another
/// server that a crash would otherwise be told from by nothing (`Place::moved_to`). A
/// statement of its own, outside any transaction, so that its error costs nothing.
async fn system_identifier(client: &Client, limit: Duration) -> String {
    let read = timed(
        limit,
        "the cluster's system identifier",
        client.query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        ),
    )
    .await
    .and_then(|row| Ok(row.try_get::<_, String>(0)?));
    read.unwrap_or_else(|error| {
        tracing::debug!(%error, "cannot read the cluster's system identifier");
        String::new()
    })
}

/// What a crash changes about a server: the reset times of two kinds of its shared
/// statistics, the background writer's and the WAL archiver's, which Postgres resets
/// together whenever it starts after anything but a clean shutdown, and keeps through a
/// clean one. Its start time stands in where they are null.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Incarnation {
    /// `pg_stat_bgwriter.stats_reset` and `pg_stat_archiver.stats_reset`, as seconds since
    /// the epoch; `None` if either is null.
    reset: Option<[String; 2]>,
    /// `pg_postmaster_start_time()`, as seconds since the epoch.
    started: String,
}

impl Incarnation {
    /// Whether the server recovered from a crash (or is another one) since it was `last`.
    /// Both reset times must have moved: a crash resets every kind of shared statistics,
    /// while `pg_stat_reset_shared('bgwriter')` (or `'archiver'`), which a monitoring job
    /// may run, resets one kind alone. A reset of each kind between two sessions reads as
    /// a crash too, which costs a full load and loses nothing; a crash never reads as
    /// anything else.
    fn recovered_since(&self, last: &Incarnation) -> bool {
        match (&self.reset, &last.reset) {
            (Some([writer, archiver]), Some([last_writer, last_archiver])) => {
                writer != last_writer && archiver != last_archiver
            }
            (None, None) => self.started != last.started,
            _ => true,
        }
    }
}

/// Where a session's statements ran: the server as it names itself (its address and
/// port, `inet_server_addr()` and `inet_server_port()`; empty over a Unix socket), its
/// cluster (the system identifier `initdb` gave it, which its standbys share; empty where
/// it cannot be read) and the database (its name and oid, which a database dropped and
/// created again changes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    server: String,
    cluster: String,
    database: String,
    oid: String,
}

impl Place {
    fn new(host: &str, port: &str, database: String, oid: String) -> Self {
        let server = match (host.is_empty(), host.contains(':')) {
            (true, _) => String::new(),
            (false, true) => format!("[{host}]:{port}"),
            (false, false) => format!("{host}:{port}"),
        };
        Self {
            server,
            cluster: String::new(),
            database,
            oid,
        }
    }

    /// The same place, in the cluster of this system identifier.
    fn of_cluster(self, cluster: String) -> Self {
        Self { cluster, ..self }
    }

    /// Why a session at `now` reloads where the last session's was here, if it is
    /// elsewhere: another server (by its address, else by its cluster: over a Unix socket,
    /// or at an address that now leads to another cluster), or another database.
    fn moved_to(&self, now: &Place) -> Option<String> {
        let same_address = self.server == now.server;
        let named = |place: &Place| {
            let server = match place.server.as_str() {
                "" => "a Unix socket".to_owned(),
                server => server.to_owned(),
            };
            if same_address {
                format!("{server}, cluster {}", place.cluster)
            } else {
                server
            }
        };
        let other_cluster =
            !self.cluster.is_empty() && !now.cluster.is_empty() && self.cluster != now.cluster;
        if !same_address || other_cluster {
            return Some(format!(
                "another server than the last session's ({}, now {}), which need not hold \
                 all the last one held",
                named(self),
                named(now)
            ));
        }
        (self.oid != now.oid).then(|| {
            format!(
                "another database than the last session's ({}, oid {}, now {}, oid {}): \
                 dropped and created again, or another one named",
                self.database, self.oid, now.database, now.oid
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_server_or_database_is_told_from_a_crash() {
        let place =
            |host: &str, port: &str, oid: &str| Place::new(host, port, "app".into(), oid.into());
        let primary = place("10.0.0.1", "5432", "16384");
        assert_eq!(primary.server, "10.0.0.1:5432");
        assert_eq!(place("::1", "5432", "1").server, "[::1]:5432");
        assert_eq!(place("", "", "1").server, "");
        // The same place: a changed incarnation is a crash.
        assert_eq!(primary.moved_to(&primary.clone()), None);
        assert_eq!(
            primary
                .moved_to(&place("10.0.0.2", "5432", "16384"))
                .as_deref(),
            Some(
                "another server than the last session's (10.0.0.1:5432, now 10.0.0.2:5432), \
                 which need not hold all the last one held"
            )
        );
        assert_eq!(
            primary
                .moved_to(&place("10.0.0.1", "5432", "16390"))
                .as_deref(),
            Some(
                "another database than the last session's (app, oid 16384, now app, oid \
                 16390): dropped and created again, or another one named"
            )
        );
        assert!(place("", "", "1")
            .moved_to(&primary)
            .is_some_and(|why| why.contains("(a Unix socket, now 10.0.0.1:5432)")));
        // At one address, another cluster is another server; an identifier that could not
        // be read tells nothing.
        let socket = |cluster: &str| place("", "", "1").of_cluster(cluster.into());
        assert_eq!(
            socket("7001").moved_to(&socket("7002")).as_deref(),
            Some(
                "another server than the last session's (a Unix socket, cluster 7001, now a \
                 Unix socket, cluster 7002), which need not hold all the last one held"
            )
        );
        assert_eq!(socket("7001").moved_to(&socket("7001")), None);
        assert_eq!(socket("7001").moved_to(&socket("")), None);
        assert!(primary
            .clone()
            .of_cluster("7001".into())
            .moved_to(&primary.of_cluster("7002".into()))
            .is_some_and(|why| why.contains("(10.0.0.1:5432, cluster 7001, now")));
    }

    #[test]
    fn a_crash_moves_both_reset_times_where_a_reset_by_hand_moves_one() {
        let at = |writer: &str, archiver: &str, started: &str| Incarnation {
            reset: Some([writer.into(), archiver.into()]),
            started: started.into(),
        };
        let last = at("100", "100", "90");
        // A clean restart keeps the statistics.
        assert!(!at("100", "100", "95").recovered_since(&last));
        // `pg_stat_reset_shared('bgwriter')`, or `'archiver'`, resets one kind alone.
        assert!(!at("120", "100", "90").recovered_since(&last));
        assert!(!at("100", "120", "90").recovered_since(&last));
        // A crash resets both (to one time); so do two resets by hand, read as a crash.
        assert!(at("130", "130", "90").recovered_since(&last));
        assert!(at("120", "125", "90").recovered_since(&last));
        // Without reset times, the start time decides; a time that comes or goes is a
        // crash.
        let unknown = |started: &str| Incarnation {
            reset: None,
            started: started.into(),
        };
        assert!(!unknown("90").recovered_since(&unknown("90")));
        assert!(unknown("95").recovered_since(&unknown("90")));
        assert!(unknown("90").recovered_since(&last));
        assert!(last.recovered_since(&unknown("90")));
    }
}
