-- The doorbell carries the change. Each statement that writes permd.tuples or
-- permd.limits notifies permd_changes with its rows, so that a daemon can apply a commit
-- as soon as the notification arrives, without a poll's round trip. Postgres delivers the
-- notifications of different transactions in commit order, and those of one transaction
-- in the order they were sent (ARCHITECTURE.md, "The notification carries the change").
--
-- Payload (JSON text, under NOTIFY's 8,000 bytes):
--   {"x": xid8 as text, "n": the statement's number in its transaction (so that Postgres
--    never folds two statements' notifications into one: it drops a notification equal
--    to an earlier one of the same transaction),
--    "k": 't' (tuples) or 'l' (limits),
--    "d": rows gone  ([subject, object, permission] or [subject, name]) or null,
--    "u": rows there ([subject, object, permission, expires_at µs or null] or
--         [subject, name, value]) or null}
-- A statement of more than 200 rows, a payload that would not fit (about 150 rows of
-- short names: the notification's 8,000 bytes are the usual bound), a TRUNCATE and a
-- reload request send only {"x": ..., "n": ...}: "fetch this one from the changelog".
-- The changelog stays the source of truth: a daemon that misses a notification, or
-- cannot place it, reads the change from the changelog as before.

CREATE OR REPLACE FUNCTION permd.ring() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('permd.notify', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM pg_notify('permd_changes', json_build_object('x', pg_current_xact_id()::text)::text);
    END IF;
END
$$;

-- One statement's notification. `gone` and `came` are at most 201 rows (a 201st means
-- "more than 200"): the statement's size never makes the trigger's own work large.
CREATE FUNCTION permd.ring_changes(kind "char", gone json, came json) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    xid text;
    n text;
BEGIN
    IF coalesce(current_setting('permd.notify', true), '') IN ('off', 'false', '0') THEN
        RETURN;
    END IF;
    xid := pg_current_xact_id()::text;
    -- A counter local to the transaction; needs no privilege a writer might lack.
    n := set_config('permd.statement',
                    (coalesce(nullif(current_setting('permd.statement', true), ''), '0')::bigint + 1)::text,
                    true);
    IF coalesce(json_array_length(gone), 0) <= 200 AND coalesce(json_array_length(came), 0) <= 200 THEN
        payload := json_build_object('x', xid, 'n', n::bigint, 'k', kind, 'd', gone, 'u', came)::text;
    END IF;
    IF payload IS NULL OR octet_length(payload) > 7999 THEN
        payload := json_build_object('x', xid, 'n', n::bigint)::text;
    END IF;
    PERFORM pg_notify('permd_changes', payload);
END
$$;

CREATE OR REPLACE FUNCTION permd.log_tuples_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT DISTINCT 't', subject, object FROM new_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('t', NULL,
            (SELECT json_agg(json_build_array(subject, object, permission,
                                              permd.epoch_micros(expires_at)))
             FROM (SELECT * FROM new_rows LIMIT 201) r));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.log_tuples_old() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT DISTINCT 't', subject, object FROM old_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('t',
            (SELECT json_agg(json_build_array(subject, object, permission))
             FROM (SELECT * FROM old_rows LIMIT 201) r),
            NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.log_tuples_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT 't', subject, object FROM old_rows
    UNION
    SELECT 't', subject, object FROM new_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('t',
            (SELECT json_agg(json_build_array(subject, object, permission))
             FROM (SELECT * FROM old_rows LIMIT 201) r),
            (SELECT json_agg(json_build_array(subject, object, permission,
                                              permd.epoch_micros(expires_at)))
             FROM (SELECT * FROM new_rows LIMIT 201) r));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.log_limits_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT DISTINCT 'l', subject FROM new_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('l', NULL,
            (SELECT json_agg(json_build_array(subject, name, value))
             FROM (SELECT * FROM new_rows LIMIT 201) r));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.log_limits_old() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT DISTINCT 'l', subject FROM old_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('l',
            (SELECT json_agg(json_build_array(subject, name))
             FROM (SELECT * FROM old_rows LIMIT 201) r),
            NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION permd.log_limits_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT 'l', subject FROM old_rows
    UNION
    SELECT 'l', subject FROM new_rows;
    IF FOUND THEN
        PERFORM permd.ring_changes('l',
            (SELECT json_agg(json_build_array(subject, name))
             FROM (SELECT * FROM old_rows LIMIT 201) r),
            (SELECT json_agg(json_build_array(subject, name, value))
             FROM (SELECT * FROM new_rows LIMIT 201) r));
    END IF;
    RETURN NULL;
END
$$;
