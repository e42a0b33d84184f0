-- app.flush(), mended: a resource moved and then deleted in the same transaction left
-- the 'list' its holders had on its old ancestors (the ones before the move). The flush
-- re-evaluated only the ancestors of the parent the resource was deleted from, and the
-- move's own re-evaluation ('m') looks for holders below the resource, of which a deleted
-- resource has none. Now the deletion re-evaluates the ancestors of every parent the
-- resource had in the transaction. Only the `gone` step below differs from 1001.

CREATE OR REPLACE FUNCTION app.flush() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    users bigint[];
BEGIN
    PERFORM set_config('permd_app.queued', 'off', true);
    IF NOT EXISTS (SELECT FROM app.pending WHERE xid = pg_current_xact_id()) THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') = 'repeatable read' THEN
        RAISE EXCEPTION 'the app schema cannot be written under REPEATABLE READ'
            USING HINT = 'Use READ COMMITTED (the default) or SERIALIZABLE: under REPEATABLE READ '
                         'the precomputed permissions could miss a concurrent write.';
    END IF;
    -- One flush at a time, each after the previous one committed: READ COMMITTED gives
    -- every statement below a snapshot that includes all earlier flushes.
    PERFORM pg_advisory_xact_lock(7370587495047230561);

    -- The tree again, now that every earlier transaction's moves are visible.
    PERFORM app.place(q.a)
    FROM (SELECT DISTINCT a FROM app.pending
          WHERE xid = pg_current_xact_id() AND kind = 'r') q
    WHERE EXISTS (SELECT FROM app.resources r WHERE r.id = q.a);

    -- Deleted resources: their tuples go, and whoever held them is re-evaluated on the
    -- remaining ancestors (a 'list' may have depended on them).
    -- The parents a deleted resource had in this transaction are the one it was deleted
    -- from and every one a move took it from ('m'): it may have been moved, then deleted.
    WITH gone AS (
        DELETE FROM permd.tuples t
        USING (SELECT DISTINCT a FROM app.pending
               WHERE xid = pg_current_xact_id() AND kind = 'd') d
        WHERE t.object = 'resource:' || d.a
          AND NOT EXISTS (SELECT FROM app.resources r WHERE r.id = d.a)
        RETURNING t.subject, d.a AS resource
    ), parents AS (
        SELECT DISTINCT a, b FROM app.pending
        WHERE xid = pg_current_xact_id() AND kind IN ('d', 'm') AND b IS NOT NULL
    )
    INSERT INTO app.pending (kind, a, b)
    SELECT DISTINCT 'x', app.subject_user(g.subject), t.ancestor_id
    FROM gone g
    JOIN parents p ON p.a = g.resource
    JOIN app.resource_tree t ON t.resource_id = p.b
    WHERE app.subject_user(g.subject) IS NOT NULL;
    -- A resource deleted and created again with the same id in this transaction has left
    -- its old place like a move: its old ancestors are re-evaluated as for a move.
    INSERT INTO app.pending (kind, a, b)
    SELECT DISTINCT 'm', d.a, d.b
    FROM app.pending d
    WHERE d.xid = pg_current_xact_id() AND d.kind = 'd' AND d.b IS NOT NULL
      AND EXISTS (SELECT FROM app.resources r WHERE r.id = d.a);

    -- Every other change becomes the user x resource pairs it can affect.
    INSERT INTO app.pending (kind, a, b)
    WITH q AS (
        SELECT DISTINCT kind, a, b FROM app.pending
        WHERE xid = pg_current_xact_id() AND kind <> 'x'
    ), scope AS (
        -- a resource with its subtree and its ancestors
        SELECT q.kind, q.a, q.b, s.id
        FROM q, LATERAL (
            SELECT t.resource_id FROM app.resource_tree t WHERE t.ancestor_id = q.b
            UNION
            SELECT t.ancestor_id FROM app.resource_tree t WHERE t.resource_id = q.b
        ) s(id)
        WHERE q.kind IN ('p', 'P')
    ), shared AS (
        -- users holding tuples anywhere below a group-shared resource
        SELECT DISTINCT q.a, q.b, app.subject_user(pt.subject) AS user_id
        FROM q
        JOIN app.resource_tree t ON t.ancestor_id = q.b
        JOIN permd.tuples pt ON pt.object = 'resource:' || t.resource_id
        WHERE q.kind = 'P' AND app.subject_user(pt.subject) IS NOT NULL
    ), moved AS (
        SELECT DISTINCT a FROM q WHERE kind IN ('r', 'm')
    ), movers AS (
        -- for a created or moved resource: whoever held tuples or has a grant below it
        SELECT m.a, app.subject_user(pt.subject) AS user_id
        FROM moved m
        JOIN app.resource_tree t ON t.ancestor_id = m.a
        JOIN permd.tuples pt ON pt.object = 'resource:' || t.resource_id
        WHERE app.subject_user(pt.subject) IS NOT NULL
        UNION
        SELECT m.a, g.user_id
        FROM moved m
        JOIN app.resource_tree t ON t.ancestor_id = m.a
        CROSS JOIN LATERAL app.grants_on(t.resource_id) g
    )
    -- a user's own grant: that user on the scope
    SELECT 'x', s.a, s.id FROM scope s WHERE s.kind = 'p'
    UNION
    -- a group's grant: its members now, and whoever held anything below (members who
    -- left, or a group deleted along with its shares)
    SELECT 'x', m.user_id, s.id
    FROM scope s JOIN app.group_members m ON m.group_id = s.a
    WHERE s.kind = 'P'
    UNION
    SELECT 'x', h.user_id, s.id
    FROM scope s JOIN shared h ON h.a = s.a AND h.b = s.b
    WHERE s.kind = 'P'
    UNION
    -- a membership: the user on the scope of every share of the group
    SELECT 'x', q.a, s.id
    FROM q
    JOIN app.shares sh ON sh.group_id = q.b
    CROSS JOIN LATERAL (
        SELECT t.resource_id FROM app.resource_tree t WHERE t.ancestor_id = sh.resource_id
        UNION
        SELECT t.ancestor_id FROM app.resource_tree t WHERE t.resource_id = sh.resource_id
    ) s(id)
    WHERE q.kind = 'M'
    UNION
    -- a user's status: everything the user holds or has a grant above or below
    SELECT 'x', q.a, app.object_resource(pt.object)
    FROM q JOIN permd.tuples pt ON pt.subject = 'user:' || q.a AND pt.object LIKE 'resource:%'
    WHERE q.kind = 'u' AND app.object_resource(pt.object) IS NOT NULL
    UNION
    SELECT 'x', q.a, s.id
    FROM q
    CROSS JOIN LATERAL app.grants_of(q.a) g
    CROSS JOIN LATERAL (
        SELECT t.resource_id FROM app.resource_tree t WHERE t.ancestor_id = g.resource_id
        UNION
        SELECT t.ancestor_id FROM app.resource_tree t WHERE t.resource_id = g.resource_id
    ) s(id)
    WHERE q.kind = 'u'
    UNION
    -- a created or moved resource: on its subtree, everyone who held or now holds a grant
    -- on it, below it or above it ...
    SELECT 'x', u.user_id, t.resource_id
    FROM q
    JOIN app.resource_tree t ON t.ancestor_id = q.a
    CROSS JOIN LATERAL (
        SELECT m.user_id FROM movers m WHERE m.a = q.a
        UNION
        SELECT g.user_id FROM app.resource_tree up CROSS JOIN LATERAL app.grants_on(up.ancestor_id) g
        WHERE up.resource_id = q.a
    ) u
    WHERE q.kind = 'r'
    UNION
    -- ... and on its new ancestors, whoever has something below it
    SELECT 'x', m.user_id, t.ancestor_id
    FROM q
    JOIN app.resource_tree t ON t.resource_id = q.a
    JOIN movers m ON m.a = q.a
    WHERE q.kind = 'r'
    UNION
    -- a move: the old ancestors, for whoever has something below it
    SELECT 'x', m.user_id, t.ancestor_id
    FROM q
    JOIN app.resource_tree t ON t.resource_id = q.b
    JOIN movers m ON m.a = q.a
    WHERE q.kind = 'm';

    -- Pairs: write the difference.
    WITH desired AS MATERIALIZED (
        SELECT * FROM app.desired_pair_tuples()
    ), pairs AS (
        SELECT DISTINCT 'user:' || a AS subject, 'resource:' || b AS object
        FROM app.pending WHERE xid = pg_current_xact_id() AND kind = 'x'
    ), stale AS (
        SELECT t.subject, t.object, t.permission
        FROM pairs p JOIN permd.tuples t ON t.subject = p.subject AND t.object = p.object
        EXCEPT
        SELECT subject, object, permission FROM desired
    ), removed AS (
        DELETE FROM permd.tuples t
        USING stale s
        WHERE (t.subject, t.object, t.permission) = (s.subject, s.object, s.permission)
    )
    INSERT INTO permd.tuples (subject, object, permission)
    SELECT subject, object, permission FROM desired
    ON CONFLICT (subject, object, permission) DO UPDATE SET expires_at = NULL
    WHERE permd.tuples.expires_at IS NOT NULL;

    -- Users whose plans, grants or status changed: global tuples and limits.
    SELECT array_agg(DISTINCT u) INTO users FROM (
        SELECT a FROM app.pending WHERE xid = pg_current_xact_id() AND kind IN ('g', 'u')
        UNION
        SELECT s.user_id FROM app.pending q JOIN app.user_subscriptions s ON s.plan_id = q.a
        WHERE q.xid = pg_current_xact_id() AND q.kind = 'G' AND s.status = 'ACTIVE'
    ) changed(u);
    IF users IS NOT NULL THEN
        PERFORM app.sync_global(users);
    END IF;

    DELETE FROM app.pending WHERE xid = pg_current_xact_id();
    DELETE FROM app.flush_requests WHERE xid = pg_current_xact_id();
END
$$;
