-- app.flush(), mended: a SERIALIZABLE writer beside READ COMMITTED ones could leave the
-- precomputed permissions short. Its flush waits for the flushes before it (the advisory
-- lock) but keeps computing from the snapshot its transaction began with, which may miss
-- a flush that committed meanwhile: a user joins a group while someone else shares a
-- folder with that group, and the user never gets the folder. Postgres's own checks catch
-- this only when every writer is SERIALIZABLE.
--
-- Now every flush, once it holds the lock, counts itself in app.flush_clock's one row. A
-- transaction whose snapshot is older than the last committed flush can update that row
-- only under READ COMMITTED, where each statement after the lock takes a new snapshot;
-- under SERIALIZABLE (and REPEATABLE READ) Postgres refuses the update with a
-- serialization failure (SQLSTATE 40001), and the writer retries as for any other
-- conflict.
--
-- The statement goes right after the lock in the app.flush() of 1002, which stays as it
-- is otherwise (its text is patched here rather than copied whole).

CREATE TABLE app.flush_clock (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    flushes bigint NOT NULL
);
INSERT INTO app.flush_clock VALUES (true, 0);

DO $$
DECLARE
    lock CONSTANT text := 'PERFORM pg_advisory_xact_lock(7370587495047230561);';
    definition text := pg_get_functiondef('app.flush()'::regprocedure);
BEGIN
    IF position(lock IN definition) = 0 THEN
        RAISE EXCEPTION 'app.flush() does not take the lock this migration expects';
    END IF;
    EXECUTE replace(
        definition,
        lock,
        lock || E'\n    -- A snapshot older than the last flush fails here unless READ COMMITTED.'
             || E'\n    UPDATE app.flush_clock SET flushes = flushes + 1;'
    );
END
$$;
