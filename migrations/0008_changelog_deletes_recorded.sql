-- Rows deleted from the changelog by any means are recorded in the pruning mark.
--
-- Until now only permd.prune_changelog() moved the mark. An operator who reclaimed the
-- changelog's space by hand (`DELETE FROM permd.changelog WHERE created_at < …`, or
-- `TRUNCATE permd.changelog`) deleted rows a daemon not yet caught up (disconnected, or
-- polling on a long interval with NOTIFY off) had still to read, and the mark did not say
-- so: that daemon skipped those changes for good. Now a statement trigger moves the mark
-- past whatever a DELETE or a TRUNCATE takes away, as prune_changelog() does, so such a
-- daemon loads in full instead.
--
-- Rows with transaction ids this cluster has not reached (restored from another one:
-- 0007) are left out, as forget_restored_xids() deletes them: they were never a change
-- here. The function runs as the schema's owner (as 0006's triggers), so that whoever may
-- delete from the changelog need not also update permd.retention.

-- A TRUNCATE has no transition table: the rows are read before they go.
CREATE FUNCTION permd.record_deleted_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_xid xid8;
    last_id bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        SELECT xid, id INTO last_xid, last_id FROM permd.changelog
        WHERE xid < pg_snapshot_xmax(pg_current_snapshot())
        ORDER BY xid DESC, id DESC LIMIT 1;
    ELSE
        SELECT xid, id INTO last_xid, last_id FROM gone
        WHERE xid < pg_snapshot_xmax(pg_current_snapshot())
        ORDER BY xid DESC, id DESC LIMIT 1;
    END IF;
    IF last_xid IS NOT NULL THEN
        -- A mark restored from another cluster would hold this one back for good: it is
        -- replaced first, as forget_restored_xids() replaces it.
        UPDATE permd.retention
        SET pruned_xid = pg_snapshot_xmin(pg_current_snapshot()), pruned_id = 0
        WHERE pruned_xid >= pg_snapshot_xmax(pg_current_snapshot());
        UPDATE permd.retention SET pruned_xid = last_xid, pruned_id = last_id
        WHERE (pruned_xid, pruned_id) < (last_xid, last_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER changelog_deletes_recorded
AFTER DELETE ON permd.changelog
REFERENCING OLD TABLE AS gone
FOR EACH STATEMENT EXECUTE FUNCTION permd.record_deleted_changes();

CREATE TRIGGER changelog_truncates_recorded
BEFORE TRUNCATE ON permd.changelog
FOR EACH STATEMENT EXECUTE FUNCTION permd.record_deleted_changes();

REVOKE EXECUTE ON FUNCTION permd.record_deleted_changes() FROM PUBLIC;
