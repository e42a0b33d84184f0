-- app.desired_pair_tuples(), which every flush calls for the pairs a write can affect,
-- computes each pair's level once.
--
-- Its CTE `levels` was referenced once, so Postgres inlined it, and the level (a subquery
-- over the pair's ancestors calling app.level_on() on each) was then evaluated twice a
-- pair: in the filter (`level IS NOT NULL OR listed`) and again in the permissions it
-- unnests. MATERIALIZED keeps the CTE a step of its own, evaluated once: a flush of a
-- share with one user took 1.5 to 1.7 ms instead of 2.1 to 2.6 at the demo's size
-- (benches/README.md, "Each pair's level once"). What it returns is unchanged.
--
-- The function is patched by its text, as 1003 and 1004 patch theirs, with a guard.

DO $$
DECLARE
    levels CONSTANT text := '), levels AS (';
    definition text := pg_get_functiondef('app.desired_pair_tuples()'::regprocedure);
BEGIN
    IF position(levels IN definition) = 0 THEN
        RAISE EXCEPTION 'app.desired_pair_tuples() is not the one this migration expects';
    END IF;
    EXECUTE replace(definition, levels, '), levels AS MATERIALIZED (');
END
$$;
