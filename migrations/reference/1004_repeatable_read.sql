-- REPEATABLE READ writers are accepted, and a rebuild counts itself on the flush clock.
--
-- 1001 refused model writes under REPEATABLE READ: such a transaction keeps the snapshot
-- it began with, so its flush could compute from a state without a flush that committed
-- meanwhile. Since 1003 every flush updates app.flush_clock once it holds the lock, and a
-- REPEATABLE READ transaction whose snapshot predates the last committed flush gets a
-- serialization failure (SQLSTATE 40001) there, exactly as a SERIALIZABLE one does: the
-- refusal has no reason left, and is taken out of app.flush().
--
-- app.rebuild_permissions() takes the same lock but did not count itself, so a rebuild
-- called under an old snapshot wrote the differences of that snapshot and ran into the
-- rows newer flushes wrote with a unique violation or a serialization failure, depending
-- on the row. It now updates the clock too: under an old snapshot it fails at once with
-- 40001, and a flush that began before the rebuild committed does as well.
--
-- Both functions are patched by their text, as 1003 did, with a guard each.

DO $$
DECLARE
    lock CONSTANT text := 'PERFORM pg_advisory_xact_lock(7370587495047230561);';
    refusal CONSTANT text :=
        'IF current_setting(''transaction_isolation'') = ''repeatable read'' THEN';
    flush text := pg_get_functiondef('app.flush()'::regprocedure);
    rebuild text := pg_get_functiondef('app.rebuild_permissions()'::regprocedure);
    start int := position(refusal IN flush);
BEGIN
    IF start = 0 THEN
        RAISE EXCEPTION 'app.flush() does not refuse REPEATABLE READ as this migration expects';
    END IF;
    -- From the IF to its END IF; (the refusal holds no other).
    EXECUTE overlay(flush PLACING '' FROM start
                    FOR position('END IF;' IN substr(flush, start)) + length('END IF;') - 1);

    IF position(lock IN rebuild) = 0 OR position('app.flush_clock' IN rebuild) > 0 THEN
        RAISE EXCEPTION 'app.rebuild_permissions() is not the one this migration expects';
    END IF;
    EXECUTE replace(
        rebuild,
        lock,
        lock || E'\n    -- A snapshot older than the last flush fails here unless READ COMMITTED.'
             || E'\n    UPDATE app.flush_clock SET flushes = flushes + 1;'
    );
END
$$;
