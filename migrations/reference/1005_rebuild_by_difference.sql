-- app.rebuild_permissions() writes by difference, and the model's names are read
-- without a regular expression.
--
-- The rebuild of 1001 (with 1004's clock) deleted and rewrote the whole folder closure,
-- deleted the stored rows missing from the desired set with one anti-join, and then
-- inserted every desired row with ON CONFLICT DO NOTHING: at the demo's 3.2 million
-- tuples about 30 s whether anything had changed or not, all of it under the advisory
-- lock that every model write's flush waits for. Now the closure and the tuples are each
-- compared with what they should be in one full join, and only the rows that differ are
-- deleted or inserted: a rebuild that finds nothing to change takes a third of that
-- time, and one into an empty table (a bulk load) is a little faster too, since no row
-- needs ON CONFLICT's speculative insertion (the lock keeps every other writer of the
-- model's rows out).
--
-- app.subject_user() and app.object_resource(), which every scan of the stored rows
-- calls once a row, matched a regular expression: most of the time of such a scan.
-- They now test the same strings with LIKE, a length and ltrim().
--
-- A rebuild that changed a tenth of the closure or of the tuples or more (a bulk load)
-- analyzes that table, and app.flush() runs with jit off: right after the demo's seeding
-- a model write took ~1.1 s (a JIT compile of a statement the planner, without
-- statistics, thought costly), then ~45 ms with jit off, and ~3 ms with statistics.
--
-- What the functions return, and the rows a rebuild leaves, are as before.

CREATE OR REPLACE FUNCTION app.subject_user(subject text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    -- subject ~ '^user:[0-9]{1,18}$', without the regular expression.
    SELECT CASE WHEN subject LIKE 'user:%' AND octet_length(subject) BETWEEN 6 AND 23
                     AND ltrim(substr(subject, 6), '0123456789') = ''
                THEN substr(subject, 6)::bigint END
$$;

CREATE OR REPLACE FUNCTION app.object_resource(object text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    -- object ~ '^resource:[0-9]{1,18}$', without the regular expression.
    SELECT CASE WHEN object LIKE 'resource:%' AND octet_length(object) BETWEEN 10 AND 27
                     AND ltrim(substr(object, 10), '0123456789') = ''
                THEN substr(object, 10)::bigint END
$$;

-- Every model tuple whose stored row differs from what the rules say: missing (wanted and
-- not stored), extra (stored and not wanted), or with another expiry (both). One full join
-- of the desired rows and the stored ones, each of which holds a key at most once; read
-- by app.rebuild_permissions() and app.verify_permissions().
CREATE VIEW app.tuple_differences AS
    WITH desired AS (
        SELECT * FROM app.desired_resource_tuples
        UNION ALL
        SELECT * FROM app.desired_global(NULL)
    ), stored AS (
        SELECT t.subject, t.object, t.permission, t.expires_at FROM permd.tuples t
        WHERE app.subject_user(t.subject) IS NOT NULL
          AND (t.object IN ('', '*') OR t.object LIKE 'resource:%')
    )
    SELECT coalesce(d.subject, s.subject) AS subject, coalesce(d.object, s.object) AS object,
           coalesce(d.permission, s.permission) AS permission,
           d.subject IS NOT NULL AS wanted, d.expires_at AS wanted_expires_at,
           s.subject IS NOT NULL AS stored, s.expires_at AS stored_expires_at
    FROM desired d
    FULL JOIN stored s ON s.subject = d.subject AND s.object = d.object AND s.permission = d.permission
    WHERE d.subject IS NULL OR s.subject IS NULL OR d.expires_at IS DISTINCT FROM s.expires_at;

-- The flush reads a few rows a statement, and JIT never pays for itself there; but when
-- the planner's estimates are off (the statistics of a table just filled by a bulk load
-- and a rebuild, before autovacuum analyzes it) a statement's estimated cost passed
-- jit_above_cost and every write took ~1.1 s compiling it, at the demo's size.
ALTER FUNCTION app.flush() SET jit = off;

-- Recomputes the closure and every model tuple and limit from the source tables and
-- writes only the difference (so a running permd sees a normal change feed, not a
-- reload). Returns the rows added and removed (a row whose expiry changes counts once
-- in each).
CREATE OR REPLACE FUNCTION app.rebuild_permissions()
RETURNS TABLE (tuples_added bigint, tuples_removed bigint, limits_changed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    reachable bigint;
    total bigint;
    closure_changed bigint;
    written bigint;
    added bigint;
    removed bigint;
    limits bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7370587495047230561);
    -- A snapshot older than the last flush fails here unless READ COMMITTED.
    UPDATE app.flush_clock SET flushes = flushes + 1;
    DELETE FROM app.pending WHERE xid = pg_current_xact_id();
    DELETE FROM app.flush_requests WHERE xid = pg_current_xact_id();

    -- The closure from the parent pointers, against the stored one.
    CREATE TEMP TABLE tree_difference ON COMMIT DROP AS
    WITH RECURSIVE down (id, path) AS (
        SELECT id, ARRAY[id] FROM app.resources WHERE parent_id IS NULL
        UNION ALL
        SELECT r.id, d.path || r.id FROM down d JOIN app.resources r ON r.parent_id = d.id
    ), desired AS (
        SELECT d.id AS resource_id, a.id AS ancestor_id, (cardinality(d.path) - a.ord)::int AS depth
        FROM down d, unnest(d.path) WITH ORDINALITY a(id, ord)
    )
    SELECT coalesce(d.resource_id, s.resource_id) AS resource_id,
           coalesce(d.ancestor_id, s.ancestor_id) AS ancestor_id,
           d.depth, d.resource_id IS NOT NULL AS wanted, s.resource_id IS NOT NULL AS stored
    FROM desired d
    FULL JOIN app.resource_tree s ON s.resource_id = d.resource_id AND s.ancestor_id = d.ancestor_id
    WHERE d.resource_id IS NULL OR s.resource_id IS NULL OR d.depth <> s.depth;
    ANALYZE tree_difference;
    DELETE FROM app.resource_tree t USING tree_difference x
    WHERE x.stored AND (t.resource_id, t.ancestor_id) = (x.resource_id, x.ancestor_id);
    GET DIAGNOSTICS closure_changed = ROW_COUNT;
    INSERT INTO app.resource_tree (resource_id, ancestor_id, depth)
    SELECT resource_id, ancestor_id, depth FROM tree_difference WHERE wanted
    ORDER BY resource_id, ancestor_id;
    GET DIAGNOSTICS written = ROW_COUNT;
    closure_changed := closure_changed + written;
    DROP TABLE tree_difference;
    SELECT count(*) INTO reachable FROM app.resource_tree WHERE depth = 0;
    SELECT count(*) INTO total FROM app.resources;
    IF reachable <> total THEN
        RAISE EXCEPTION '% resources are in a cycle of parent_id (not under any root)', total - reachable
            USING ERRCODE = 'check_violation';
    END IF;

    CREATE TEMP TABLE tuple_difference ON COMMIT DROP AS
    SELECT * FROM app.tuple_differences;
    ANALYZE tuple_difference;
    WITH gone AS (
        DELETE FROM permd.tuples t USING tuple_difference x
        WHERE x.stored AND (t.subject, t.object, t.permission) = (x.subject, x.object, x.permission)
        RETURNING 1
    )
    SELECT count(*) INTO removed FROM gone;
    -- In key order: appending to the primary key's btree is far cheaper than scattering.
    INSERT INTO permd.tuples (subject, object, permission, expires_at)
    SELECT subject, object, permission, wanted_expires_at FROM tuple_difference WHERE wanted
    ORDER BY subject, object, permission;
    GET DIAGNOSTICS added = ROW_COUNT;
    DROP TABLE tuple_difference;

    SELECT count(*) INTO limits FROM (
        (SELECT * FROM app.desired_limits(NULL)
         EXCEPT SELECT subject, name, value FROM permd.limits WHERE app.subject_user(subject) IS NOT NULL)
        UNION ALL
        (SELECT subject, name, value FROM permd.limits WHERE app.subject_user(subject) IS NOT NULL
         EXCEPT SELECT * FROM app.desired_limits(NULL))
    ) x;
    PERFORM app.sync_global(NULL);

    -- Fresh statistics for the two tables every flush reads, where this rebuild changed a
    -- tenth of them or more (a bulk load: never analyzed, reltuples is -1). Until
    -- autovacuum's next look a flush would otherwise plan for the tables as they were,
    -- ~45 ms a write instead of ~3 at the demo's size. (A role that does not own a table
    -- gets a warning, and the table waits for autovacuum.)
    IF closure_changed > 0.1 * greatest((SELECT reltuples FROM pg_class
                                         WHERE oid = 'app.resource_tree'::regclass), 0) THEN
        ANALYZE app.resource_tree;
    END IF;
    IF added + removed > 0.1 * greatest((SELECT reltuples FROM pg_class
                                         WHERE oid = 'permd.tuples'::regclass), 0) THEN
        ANALYZE permd.tuples;
    END IF;
    RETURN QUERY SELECT added, removed, limits;
END
$$;

-- Every difference between the stored and the desired model rows: what is missing and
-- what is extra (a wrong expiry or value shows as one of each). Empty when all is right.
-- The tuples are compared as the rebuild compares them (app.tuple_differences), rather
-- than by two EXCEPTs that each sorted both sets.
CREATE OR REPLACE FUNCTION app.verify_permissions()
RETURNS TABLE (problem text, kind text, subject text, object text, permission text,
               expires_at timestamptz, value bigint)
LANGUAGE sql STABLE AS $$
    WITH differing AS MATERIALIZED (
        SELECT * FROM app.tuple_differences
    ), desired_limits AS (
        SELECT * FROM app.desired_limits(NULL)
    ), stored_limits AS (
        SELECT l.subject, l.name, l.value FROM permd.limits l
        WHERE app.subject_user(l.subject) IS NOT NULL
    )
    (SELECT 'missing', 'tuple', d.subject, d.object, d.permission, d.wanted_expires_at, NULL::bigint
     FROM differing d WHERE d.wanted
     UNION ALL
     SELECT 'extra', 'tuple', d.subject, d.object, d.permission, d.stored_expires_at, NULL
     FROM differing d WHERE d.stored
     UNION ALL
     SELECT 'missing', 'limit', d.subject, NULL, d.name, NULL, d.value
     FROM (SELECT * FROM desired_limits EXCEPT SELECT * FROM stored_limits) d
     UNION ALL
     SELECT 'extra', 'limit', s.subject, NULL, s.name, NULL, s.value
     FROM (SELECT * FROM stored_limits EXCEPT SELECT * FROM desired_limits) s)
    ORDER BY 3, 4, 5, 1
$$;
