-- app.desired_pair_tuples(), which every flush calls for the pairs a write can affect,
-- computes each pair's level once.
--
-- Its CTE `levels` was referenced once, so Postgres inlined it, and the level (a subquery
-- over the pair's ancestors calling app.level_on() on each) was then evaluated twice a
-- pair: in the filter (`level IS NOT NULL OR listed`) and again in the permissions it
-- unnests. MATERIALIZED keeps the CTE a step of its own, evaluated once: a flush of a
-- share with one user took 1.5 to 1.7 ms instead of 2.1 to 2.6 at the demo's size
-- (benches/README.md, "Model writes at once"). What it returns is unchanged.

CREATE OR REPLACE FUNCTION app.desired_pair_tuples()
RETURNS TABLE (subject text, object text, permission text)
LANGUAGE sql STABLE AS $$
    WITH pairs AS (
        SELECT DISTINCT q.a AS user_id, q.b AS resource_id
        FROM app.pending q
        JOIN app.users u ON u.id = q.a AND u.status = 'ACTIVE'
        WHERE q.xid = pg_current_xact_id() AND q.kind = 'x'
    ), paths AS (
        -- Everything at or above a grant of these users: where 'list' reaches. Computed
        -- from the users' few grants up, never from a resource down (it may be the root).
        SELECT DISTINCT u.user_id, t.ancestor_id AS resource_id
        FROM (SELECT DISTINCT user_id FROM pairs) u
        CROSS JOIN LATERAL app.grants_of(u.user_id) g
        JOIN app.resource_tree t ON t.resource_id = g.resource_id
    ), levels AS MATERIALIZED (
        -- The best grant at or above the resource, and whether one is at or below it.
        SELECT p.user_id, p.resource_id,
               (SELECT max(app.level_on(p.user_id, t.ancestor_id)) FROM app.resource_tree t
                WHERE t.resource_id = p.resource_id) AS level,
               paths.user_id IS NOT NULL AS listed
        FROM pairs p
        LEFT JOIN paths USING (user_id, resource_id)
    )
    SELECT 'user:' || l.user_id, 'resource:' || l.resource_id, p
    FROM levels l, unnest(app.level_permissions(coalesce(l.level, 0))) p
    WHERE l.level IS NOT NULL OR l.listed
$$;
