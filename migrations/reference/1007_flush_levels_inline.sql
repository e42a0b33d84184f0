-- app.desired_pair_tuples() reads the grants on each ancestor in its own query rather
-- than through app.level_on().
--
-- app.level_on() is a scalar SQL function with an aggregate, which Postgres cannot
-- inline: every pair called it once per ancestor, each call a query of its own (30 calls
-- for a share with one user, ~2,000 for a folder shared with a team of 8). Its body now
-- stands in the subquery, as a lateral join on each ancestor, and the planner sees it
-- whole. Measured on the demo's database (the two forms swapped in turn): a share with a
-- user committed in 1.0 to 1.7 ms instead of ~2.0, a team folder shared with a group in
-- 89 to 93 ms instead of 133 to 163 (benches/README.md, "`app.level_on()` inline").
-- What it returns is unchanged (app.level_on() itself stays, for queries of your own).
--
-- The function is patched by its text, as 1006 patches it, with a guard.

DO $$
DECLARE
    called CONSTANT text :=
        '(SELECT max(app.level_on(p.user_id, t.ancestor_id)) FROM app.resource_tree t';
    inline CONSTANT text := $inline$(SELECT max(g.level) FROM app.resource_tree t
                CROSS JOIN LATERAL (
                    -- app.level_on's body, for each ancestor.
                    SELECT 3 FROM app.resources r WHERE r.id = t.ancestor_id AND r.owner_id = p.user_id
                    UNION ALL
                    SELECT CASE s.access WHEN 'write' THEN 2 ELSE 1 END
                    FROM app.shares s WHERE s.resource_id = t.ancestor_id AND s.user_id = p.user_id
                    UNION ALL
                    SELECT CASE s.access WHEN 'write' THEN 2 ELSE 1 END
                    FROM app.shares s
                    JOIN app.group_members m ON m.group_id = s.group_id AND m.user_id = p.user_id
                    WHERE s.resource_id = t.ancestor_id
                ) g(level)$inline$;
    definition text := pg_get_functiondef('app.desired_pair_tuples()'::regprocedure);
BEGIN
    IF position(called IN definition) = 0 THEN
        RAISE EXCEPTION 'app.desired_pair_tuples() is not the one this migration expects';
    END IF;
    EXECUTE replace(definition, called, inline);
END
$$;
