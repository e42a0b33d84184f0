-- app.flush() runs only the steps of the kinds of change its transaction queued.
--
-- Every flush ran all of its steps whatever the transaction had changed: a share with a
-- user went through the tree's re-placement, the deleted resources' step, one statement
-- of nine branches (grants, group shares, memberships, statuses, creations, moves) and
-- the users' global step, each on no rows but its own. Each of those statements costs
-- its executor start-up at every flush (and its statement triggers on permd.tuples, for
-- the deleted resources' step), and a session plans all of them at its first flush,
-- which it does holding the model's lock. The flush now reads which kinds its
-- transaction queued once, and runs a step only for those; the nine branches are five
-- statements, one for each kind (or pair of kinds) of change, and the scope of a resource
-- they share is app.scope_of(), which the planner inlines. What each computes is
-- unchanged: the pairs of a kind come from the same joins as before, and duplicates
-- between statements are harmless (the pairs' step reads them DISTINCT).
--
-- In the `writes` bench (the demo's scale) a share commits in 0.7 to 0.9 ms instead of
-- 0.9 to 1.2, a grant or a subscription change in 0.6 to 0.8 instead of 1.0 to 1.2, a
-- write as a new connection's first (its flush planned then) in 10 to 12 ms instead of
-- 15 to 19, and the ceiling of single shares is ~870 to 1,480 a second (1 to 16 writers)
-- instead of ~640 to 940 (benches/README.md, "The flush by kind").
--
-- The function is replaced whole (its steps move into IFs), so a flush changed by hand
-- since 1009 is refused rather than overwritten: the guard compares its source with the
-- one 1001 to 1009 leave. The settings 1005 and 1009 gave it are given again (CREATE OR
-- REPLACE resets them).

DO $$
BEGIN
    IF (SELECT md5(prosrc) FROM pg_proc WHERE oid = 'app.flush()'::regprocedure)
       IS DISTINCT FROM '6efa841c3e4904e09f53d7b94bc06ced' THEN
        RAISE EXCEPTION 'app.flush() is not the one migrations 1001 to 1009 leave'
            USING HINT = 'It was changed by hand: restore the one 1009 leaves before migrating, '
                         'or merge this migration''s steps into yours and record it by hand.';
    END IF;
END
$$;

-- A resource, its subtree and its ancestors: the resources whose pairs a grant on it can
-- change. Plain SQL, so the planner inlines it where the flush joins it.
CREATE FUNCTION app.scope_of(resource bigint) RETURNS TABLE (id bigint)
LANGUAGE sql STABLE AS $$
    SELECT t.resource_id FROM app.resource_tree t WHERE t.ancestor_id = resource
    UNION
    SELECT t.ancestor_id FROM app.resource_tree t WHERE t.resource_id = resource
$$;

CREATE OR REPLACE FUNCTION app.flush() RETURNS void LANGUAGE plpgsql
SET jit = off SET enable_seqscan = off AS $$
DECLARE
    users bigint[];
    -- The kinds of change this transaction queued; each step below runs only for its own.
    kinds "char"[];
    -- Whether any user x resource pair is queued ('x'): the pairs' step runs only then.
    pairs_queued boolean;
BEGIN
    PERFORM set_config('permd_app.queued', 'off', true);
    SELECT array_agg(DISTINCT kind) INTO kinds
    FROM app.pending WHERE xid = pg_current_xact_id();
    IF kinds IS NULL THEN
        RETURN;
    END IF;
    pairs_queued := 'x' = ANY (kinds);

    -- One flush at a time, each after the previous one committed: READ COMMITTED gives
    -- every statement below a snapshot that includes all earlier flushes.
    PERFORM pg_advisory_xact_lock(7370587495047230561);
    -- A snapshot older than the last flush fails here unless READ COMMITTED.
    UPDATE app.flush_clock SET flushes = flushes + 1;

    -- The tree again, now that every earlier transaction's moves are visible.
    IF 'r' = ANY (kinds) THEN
        PERFORM app.place(q.a)
        FROM (SELECT DISTINCT a FROM app.pending
              WHERE xid = pg_current_xact_id() AND kind = 'r') q
        WHERE EXISTS (SELECT FROM app.resources r WHERE r.id = q.a);
    END IF;

    -- Deleted resources: their tuples go, and whoever held them is re-evaluated on the
    -- remaining ancestors (a 'list' may have depended on them).
    -- The parents a deleted resource had in this transaction are the one it was deleted
    -- from and every one a move took it from ('m'): it may have been moved, then deleted.
    IF 'd' = ANY (kinds) THEN
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
        pairs_queued := pairs_queued OR FOUND;
        -- A resource deleted and created again with the same id in this transaction has left
        -- its old place like a move: its old ancestors are re-evaluated as for a move.
        INSERT INTO app.pending (kind, a, b)
        SELECT DISTINCT 'm', d.a, d.b
        FROM app.pending d
        WHERE d.xid = pg_current_xact_id() AND d.kind = 'd' AND d.b IS NOT NULL
          AND EXISTS (SELECT FROM app.resources r WHERE r.id = d.a);
        IF FOUND THEN
            kinds := kinds || 'm'::"char";
        END IF;
    END IF;

    -- Every other change becomes the user x resource pairs it can affect, one statement
    -- for each kind of change, run only when the transaction queued that kind.
    -- A user's own grant: that user on the resource, its subtree and its ancestors.
    IF 'p' = ANY (kinds) THEN
        INSERT INTO app.pending (kind, a, b)
        SELECT DISTINCT 'x', q.a, s.id
        FROM (SELECT DISTINCT a, b FROM app.pending
              WHERE xid = pg_current_xact_id() AND kind = 'p') q
        CROSS JOIN LATERAL app.scope_of(q.b) s(id);
        pairs_queued := pairs_queued OR FOUND;
    END IF;
    -- A group's grant: its members now, and whoever held anything below (members who
    -- left, or a group deleted along with its shares), on the same scope.
    IF 'P' = ANY (kinds) THEN
        INSERT INTO app.pending (kind, a, b)
        WITH q AS (
            SELECT DISTINCT a, b FROM app.pending
            WHERE xid = pg_current_xact_id() AND kind = 'P'
        ), scope AS (
            SELECT q.a, q.b, s.id
            FROM q CROSS JOIN LATERAL app.scope_of(q.b) s(id)
        ), shared AS (
            -- users holding tuples anywhere below a group-shared resource
            SELECT DISTINCT q.a, q.b, app.subject_user(pt.subject) AS user_id
            FROM q
            JOIN app.resource_tree t ON t.ancestor_id = q.b
            JOIN permd.tuples pt ON pt.object = 'resource:' || t.resource_id
            WHERE app.subject_user(pt.subject) IS NOT NULL
        )
        SELECT 'x', m.user_id, s.id
        FROM scope s JOIN app.group_members m ON m.group_id = s.a
        UNION
        SELECT 'x', h.user_id, s.id
        FROM scope s JOIN shared h ON h.a = s.a AND h.b = s.b;
        pairs_queued := pairs_queued OR FOUND;
    END IF;
    -- A membership: the user on the scope of every share of the group.
    IF 'M' = ANY (kinds) THEN
        INSERT INTO app.pending (kind, a, b)
        SELECT DISTINCT 'x', q.a, s.id
        FROM (SELECT DISTINCT a, b FROM app.pending
              WHERE xid = pg_current_xact_id() AND kind = 'M') q
        JOIN app.shares sh ON sh.group_id = q.b
        CROSS JOIN LATERAL app.scope_of(sh.resource_id) s(id);
        pairs_queued := pairs_queued OR FOUND;
    END IF;
    -- A user's status: everything the user holds or has a grant above or below.
    IF 'u' = ANY (kinds) THEN
        INSERT INTO app.pending (kind, a, b)
        WITH q AS (
            SELECT DISTINCT a FROM app.pending
            WHERE xid = pg_current_xact_id() AND kind = 'u'
        )
        SELECT 'x', q.a, app.object_resource(pt.object)
        FROM q
        JOIN permd.tuples pt ON pt.subject = 'user:' || q.a AND pt.object LIKE 'resource:%'
        WHERE app.object_resource(pt.object) IS NOT NULL
        UNION
        SELECT 'x', q.a, s.id
        FROM q
        CROSS JOIN LATERAL app.grants_of(q.a) g
        CROSS JOIN LATERAL app.scope_of(g.resource_id) s(id);
        pairs_queued := pairs_queued OR FOUND;
    END IF;
    -- A created or moved resource.
    IF kinds && '{r,m}'::"char"[] THEN
        INSERT INTO app.pending (kind, a, b)
        WITH q AS (
            SELECT DISTINCT kind, a, b FROM app.pending
            WHERE xid = pg_current_xact_id() AND kind IN ('r', 'm')
        ), moved AS (
            SELECT DISTINCT a FROM q
        ), movers AS (
            -- whoever held tuples or has a grant below it
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
        -- on its subtree, everyone who held or now holds a grant on it, below it or
        -- above it ...
        SELECT 'x', u.user_id, t.resource_id
        FROM q
        JOIN app.resource_tree t ON t.ancestor_id = q.a
        CROSS JOIN LATERAL (
            SELECT m.user_id FROM movers m WHERE m.a = q.a
            UNION
            SELECT g.user_id
            FROM app.resource_tree up CROSS JOIN LATERAL app.grants_on(up.ancestor_id) g
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
        pairs_queued := pairs_queued OR FOUND;
    END IF;

    -- Pairs: write the difference.
    IF pairs_queued THEN
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
    END IF;

    -- Users whose plans, grants or status changed: global tuples and limits.
    IF kinds && '{g,u,G}'::"char"[] THEN
        SELECT array_agg(DISTINCT u) INTO users FROM (
            SELECT a FROM app.pending WHERE xid = pg_current_xact_id() AND kind IN ('g', 'u')
            UNION
            SELECT s.user_id
            FROM app.pending q JOIN app.user_subscriptions s ON s.plan_id = q.a
            WHERE q.xid = pg_current_xact_id() AND q.kind = 'G' AND s.status = 'ACTIVE'
        ) changed(u);
        IF users IS NOT NULL THEN
            PERFORM app.sync_global(users);
        END IF;
    END IF;

    DELETE FROM app.pending WHERE xid = pg_current_xact_id();
    DELETE FROM app.flush_requests WHERE xid = pg_current_xact_id();
END
$$;
