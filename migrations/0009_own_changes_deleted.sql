-- A transaction's own changelog rows, deleted in that transaction, are its own cluster's.
--
-- 0007 and 0008 took a changelog row (or a pruning mark) at or above the statement
-- snapshot's xmax for one restored from another cluster. Every row the snapshot sees from
-- another transaction is below it; the deleting transaction's own rows are not always: its
-- id is at or above the xmax whenever no later transaction has ended since it was given
-- one (under REPEATABLE READ always, the snapshot being taken before the first write). So
-- a transaction that wrote permd.tuples and then deleted its own changelog rows (`DELETE
-- FROM permd.changelog`, a TRUNCATE, or permd.forget_restored_xids(), which
-- prune_changelog() calls first) moved no mark, or put it back below those rows, and a
-- daemon skipped that write for good. Now the transaction's own id counts as this
-- cluster's: such rows move the mark, forget_restored_xids() keeps them, and a mark at that
-- id is not replaced.

CREATE OR REPLACE FUNCTION permd.record_deleted_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    own xid8 := pg_current_xact_id_if_assigned();
    last_xid xid8;
    last_id bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        SELECT xid, id INTO last_xid, last_id FROM permd.changelog
        WHERE xid < pg_snapshot_xmax(pg_current_snapshot()) OR xid = own
        ORDER BY xid DESC, id DESC LIMIT 1;
    ELSE
        SELECT xid, id INTO last_xid, last_id FROM gone
        WHERE xid < pg_snapshot_xmax(pg_current_snapshot()) OR xid = own
        ORDER BY xid DESC, id DESC LIMIT 1;
    END IF;
    IF last_xid IS NOT NULL THEN
        -- A mark restored from another cluster would hold this one back for good: it is
        -- replaced first, as forget_restored_xids() replaces it.
        UPDATE permd.retention
        SET pruned_xid = pg_snapshot_xmin(pg_current_snapshot()), pruned_id = 0
        WHERE pruned_xid >= pg_snapshot_xmax(pg_current_snapshot())
            AND pruned_xid IS DISTINCT FROM own;
        UPDATE permd.retention SET pruned_xid = last_xid, pruned_id = last_id
        WHERE (pruned_xid, pruned_id) < (last_xid, last_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.forget_restored_xids() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    own xid8 := pg_current_xact_id_if_assigned();
    deleted bigint;
BEGIN
    WITH d AS (
        DELETE FROM permd.changelog
        WHERE xid >= pg_snapshot_xmax(pg_current_snapshot()) AND xid IS DISTINCT FROM own
        RETURNING 1
    )
    SELECT count(*) INTO deleted FROM d;
    UPDATE permd.retention
    SET pruned_xid = pg_snapshot_xmin(pg_current_snapshot()), pruned_id = 0
    WHERE pruned_xid >= pg_snapshot_xmax(pg_current_snapshot())
        AND pruned_xid IS DISTINCT FROM own;
    RETURN deleted;
END
$$;
