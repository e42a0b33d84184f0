//! Whether logical replication writes permd's tables in a way the changelog cannot follow.
//!
//! On a subscriber (a server that logical replication writes), the apply worker's writes
//! fire only the triggers that are `ENABLE ALWAYS` (`session_replication_role` is
//! `replica` in it): with permd's triggers as the migrations make them, a replicated
//! write to `permd.tuples` never reaches the changelog, and a daemon that follows the
//! subscriber would go stale without a word. The changelog and the retention mark hold
//! the writing server's transaction ids, which mean nothing on another server, so they
//! must be the subscriber's own. The applier refuses such a database with what to do
//! (`Applier::check_subscriptions`), at each connection and at each periodic look.

/// Each permd table a subscription of this database writes, with the permd triggers on it
/// that are not `ENABLE ALWAYS` (`tgenabled <> 'A'`), by name.
pub(crate) const SUBSCRIBED: &str = "\
    SELECT s.subname::text, c.relname::text,
           coalesce((SELECT array_agg(t.tgname::text ORDER BY t.tgname)
                     FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                     WHERE t.tgrelid = c.oid AND NOT t.tgisinternal
                       AND p.pronamespace = 'permd'::regnamespace
                       AND t.tgenabled <> 'A'), '{}')
    FROM pg_subscription_rel r
    JOIN pg_subscription s ON s.oid = r.srsubid
    JOIN pg_class c ON c.oid = r.srrelid
    WHERE c.relnamespace = 'permd'::regnamespace
    ORDER BY c.relname, s.subname";

/// One row of [`SUBSCRIBED`].
#[derive(Debug)]
pub(crate) struct Subscribed {
    pub(crate) subscription: String,
    pub(crate) table: String,
    /// permd's triggers on the table that the subscription's writes do not fire.
    pub(crate) not_always: Vec<String>,
}

/// Why permd cannot follow a database whose tables `subscribed` lists, with what to do;
/// `None` when it can: nothing subscribed, or `tuples` and `limits` with every permd
/// trigger on them `ENABLE ALWAYS` (and `notify_key`, if it is), but never the changelog
/// or the retention mark.
pub(crate) fn refusal(subscribed: &[Subscribed]) -> Option<String> {
    let mut problems = Vec::new();
    for Subscribed {
        subscription,
        table,
        not_always,
    } in subscribed
    {
        match table.as_str() {
            "tuples" | "limits" if !not_always.is_empty() => {
                let fix: Vec<String> = not_always
                    .iter()
                    .map(|trigger| {
                        format!("ALTER TABLE permd.{table} ENABLE ALWAYS TRIGGER {trigger};")
                    })
                    .collect();
                problems.push(format!(
                    "subscription {subscription} writes permd.{table}, and its writes fire \
                     only triggers that are ENABLE ALWAYS, so they would never reach the \
                     changelog: run {}",
                    fix.join(" ")
                ));
            }
            "changelog" | "retention" => problems.push(format!(
                "subscription {subscription} writes permd.{table}, which must be this \
                 server's own (it holds the writing server's transaction ids): do not \
                 replicate it"
            )),
            // The notification key may come from the publisher: the triggers here sign
            // with whatever key this server's table holds, and permd reads the same one.
            _ => {}
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(subscription: &str, table: &str, not_always: &[&str]) -> Subscribed {
        Subscribed {
            subscription: subscription.to_owned(),
            table: table.to_owned(),
            not_always: not_always.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn tuples_and_limits_may_be_subscribed_with_their_triggers_always() {
        assert_eq!(refusal(&[]), None);
        assert_eq!(
            refusal(&[
                row("s", "limits", &[]),
                row("s", "notify_key", &[]),
                row("s", "tuples", &[])
            ]),
            None
        );
        let refused =
            refusal(&[row("s", "tuples", &["tuples_delete", "tuples_insert"])]).expect("refused");
        assert!(
            refused.contains("subscription s writes permd.tuples"),
            "{refused}"
        );
        assert!(
            refused.contains(
                "ALTER TABLE permd.tuples ENABLE ALWAYS TRIGGER tuples_delete; \
                 ALTER TABLE permd.tuples ENABLE ALWAYS TRIGGER tuples_insert;"
            ),
            "{refused}"
        );
    }

    #[test]
    fn the_changelog_and_the_retention_mark_must_be_the_servers_own() {
        for table in ["changelog", "retention"] {
            let refused =
                refusal(&[row("s", "tuples", &[]), row("t", table, &[])]).expect("refused");
            assert!(
                refused.contains(&format!("subscription t writes permd.{table}")),
                "{refused}"
            );
            assert!(!refused.contains("permd.tuples,"), "{refused}");
        }
    }
}
