-- app.sync_global_of() leaves the global tuples and limits that do not change alone.
--
-- It wrote every desired row with INSERT ... ON CONFLICT DO UPDATE ... WHERE the value
-- differs. A conflicting row whose value is the same is not updated, but Postgres locks
-- it first (a lock on the tuple, written to its page and to the WAL) before it reads the
-- WHERE: a plan's limit changed for its ~1,600 subscribers locked their ~4,800 global
-- tuples, none of which changed. Each INSERT now skips the desired rows already stored
-- as they are (NOT EXISTS, by the primary key); rows that differ still go through ON
-- CONFLICT, and new ones are inserted. Every write here happens under the model's lock,
-- as before. By hand on the demo's database, the function for PRO's subscribers with
-- nothing to change took 50 to 51 ms instead of 61 to 64; in the `writes` bench a PRO
-- plan's limit change commits in 64 to 69 ms instead of 72 to 81 (benches/README.md,
-- "Unchanged global rows left alone").
--
-- Patched by its text, as 1003, 1004, 1006 and 1007 patch theirs, with a guard.

DO $$
DECLARE
    tuples CONSTANT text := E'    SELECT subject, object, permission, expires_at FROM desired\n'
                            '    ON CONFLICT (subject, object, permission)';
    limits CONSTANT text := E'    SELECT subject, name, value FROM desired\n'
                            '    ON CONFLICT (subject, name)';
    definition text := pg_get_functiondef('app.sync_global_of(bigint[])'::regprocedure);
BEGIN
    IF position(tuples IN definition) = 0 OR position(limits IN definition) = 0 THEN
        RAISE EXCEPTION 'app.sync_global_of() is not the one this migration expects';
    END IF;
    definition := replace(definition, tuples,
        E'    SELECT subject, object, permission, expires_at FROM desired d\n'
        '    WHERE NOT EXISTS (SELECT FROM permd.tuples t\n'
        '                      WHERE (t.subject, t.object, t.permission)\n'
        '                            = (d.subject, d.object, d.permission)\n'
        '                        AND t.expires_at IS NOT DISTINCT FROM d.expires_at)\n'
        '    ON CONFLICT (subject, object, permission)');
    EXECUTE replace(definition, limits,
        E'    SELECT subject, name, value FROM desired d\n'
        '    WHERE NOT EXISTS (SELECT FROM permd.limits l\n'
        '                      WHERE (l.subject, l.name) = (d.subject, d.name)\n'
        '                        AND l.value = d.value)\n'
        '    ON CONFLICT (subject, name)');
END
$$;
