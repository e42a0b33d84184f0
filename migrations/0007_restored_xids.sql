-- Transaction ids restored from another cluster.
--
-- A dump of this database restored into another cluster (pg_dump and pg_restore, or psql;
-- a copy made to move to a new server, to upgrade by dump, to refresh a staging copy)
-- brings permd.changelog's rows and permd.retention's pruning mark with the transaction
-- ids of the cluster they were written in. Where those are above this cluster's own, they
-- mean nothing here: a daemon took such rows for changes still waiting behind an open
-- transaction (its lag grew for ever: never ready), and such a mark for rows pruned past
-- every cursor it could have (it loaded the whole set again at every poll). A daemon now
-- passes them over (it loads once, its cursor then being past nothing pruned here), and
-- this function removes them; prune_changelog() calls it first.

-- Every row a statement's snapshot sees was committed before that snapshot was taken, by
-- a transaction whose id is below the snapshot's xmax, and the triggers write the id of
-- the writing transaction: a row at or above it was copied from elsewhere. Each statement
-- takes its own snapshot (READ COMMITTED), so each asks its own.
-- The mark is replaced with the horizon rather than cleared: rows pruned here while it
-- stood (by prune_changelog() before this migration, which could not move it down) went
-- unrecorded, so a daemon whose cursor is below the horizon loads in full once.
CREATE FUNCTION permd.forget_restored_xids() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    WITH d AS (
        DELETE FROM permd.changelog
        WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
        RETURNING 1
    )
    SELECT count(*) INTO deleted FROM d;
    UPDATE permd.retention
    SET pruned_xid = pg_snapshot_xmin(pg_current_snapshot()), pruned_id = 0
    WHERE pruned_xid >= pg_snapshot_xmax(pg_current_snapshot());
    RETURN deleted;
END
$$;

-- As in 0001, after forgetting what was restored from elsewhere: with a mark from another
-- cluster above every id of this one, its own prunes could never move the mark.
CREATE OR REPLACE FUNCTION permd.prune_changelog(keep_for interval DEFAULT '1 day')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8;
    last_xid xid8;
    last_id bigint;
    deleted bigint;
BEGIN
    deleted := permd.forget_restored_xids();
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    WITH d AS (
        DELETE FROM permd.changelog
        WHERE created_at < now() - keep_for AND xid < horizon
        RETURNING xid, id
    ), m AS (
        SELECT xid, id FROM d ORDER BY xid DESC, id DESC LIMIT 1
    )
    SELECT deleted + (SELECT count(*) FROM d), (SELECT xid FROM m), (SELECT id FROM m)
    INTO deleted, last_xid, last_id;
    IF last_xid IS NOT NULL THEN
        UPDATE permd.retention SET pruned_xid = last_xid, pruned_id = last_id
        WHERE (pruned_xid, pruned_id) < (last_xid, last_id);
    END IF;
    RETURN deleted;
END
$$;
