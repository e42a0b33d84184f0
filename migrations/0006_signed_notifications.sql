-- Notifications that carry rows are signed. Postgres has no privilege on LISTEN or
-- NOTIFY: any role that can connect to the database may notify permd_changes, including
-- a role with no privilege on permd's tables, or a SQL injection in a read-only query
-- (`SELECT pg_notify(...)`). Since 0005 a notification's rows are applied to the mirror,
-- so an unsigned one would let anyone grant anything until a reload. Each notification
-- with rows now starts with an HMAC-SHA256 of its JSON, under a key only the owner of
-- permd's schema (and so its trigger functions) and permd itself can read:
--     64 hex digits of HMAC-SHA256(key, json) followed by the JSON of 0005.
-- Notifications without rows (TRUNCATE, request_reload(), a statement too large) stay
-- unsigned: they only make permd poll the changelog. ARCHITECTURE.md, "Signed
-- notifications", gives the whole design, replays included.
--
-- A role that may LISTEN still sees the rows that change. Where that matters,
-- permd.notify = 'doorbell' (ALTER DATABASE ... SET, or SET LOCAL in a transaction) sends
-- the transaction id alone, as a doorbell: permd then reads each commit from the
-- changelog at once, as before 0005.

-- The key, as HMAC's two padded keys (key XOR 0x36.., key XOR 0x5c..; the key is 64
-- bytes, SHA-256's block), so that signing is two sha256() calls. One row.
CREATE TABLE permd.notify_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    inner_pad bytea NOT NULL CHECK (octet_length(inner_pad) = 64),
    outer_pad bytea NOT NULL CHECK (octet_length(outer_pad) = 64),
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON permd.notify_key FROM PUBLIC;

-- Each byte of `key` XOR `pad`.
CREATE FUNCTION permd.xor_bytes(key bytea, pad integer) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT decode(string_agg(lpad(to_hex(get_byte(key, i) # pad), 2, '0'), '' ORDER BY i), 'hex')
    FROM generate_series(0, octet_length(key) - 1) i
$$;

-- A new random key (488 random bits: four v4 UUIDs, from the server's strong random
-- source). A running permd reads the new key when a notification stops verifying; until
-- then it polls for each commit, as with notifications off.
CREATE FUNCTION permd.rotate_notify_key() RETURNS void
LANGUAGE sql AS $$
    INSERT INTO permd.notify_key (inner_pad, outer_pad)
    SELECT permd.xor_bytes(key, 54), permd.xor_bytes(key, 92)
    FROM (SELECT decode(string_agg(replace(gen_random_uuid()::text, '-', ''), ''), 'hex') AS key
          FROM generate_series(1, 4)) k
    ON CONFLICT (one) DO UPDATE
        SET inner_pad = excluded.inner_pad, outer_pad = excluded.outer_pad, created_at = now()
$$;
REVOKE EXECUTE ON FUNCTION permd.rotate_notify_key() FROM PUBLIC;
SELECT permd.rotate_notify_key();

-- As in 0005, with the signature. The JSON is kept under 7,936 bytes so that the 64 hex
-- digits still fit in NOTIFY's 8,000.
CREATE OR REPLACE FUNCTION permd.ring_changes(kind "char", gone json, came json) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    xid text;
    n text;
    inner_pad bytea;
    outer_pad bytea;
BEGIN
    IF coalesce(current_setting('permd.notify', true), '') IN ('off', 'false', '0') THEN
        RETURN;
    END IF;
    xid := pg_current_xact_id()::text;
    -- A counter local to the transaction; needs no privilege a writer might lack.
    n := set_config('permd.statement',
                    (coalesce(nullif(current_setting('permd.statement', true), ''), '0')::bigint + 1)::text,
                    true);
    IF current_setting('permd.notify', true) IS DISTINCT FROM 'doorbell'
       AND coalesce(json_array_length(gone), 0) <= 200 AND coalesce(json_array_length(came), 0) <= 200 THEN
        payload := json_build_object('x', xid, 'n', n::bigint, 'k', kind, 'd', gone, 'u', came)::text;
        SELECT k.inner_pad, k.outer_pad INTO inner_pad, outer_pad FROM permd.notify_key k;
        IF inner_pad IS NULL OR octet_length(payload) > 7935 THEN
            payload := NULL;
        ELSE
            payload := encode(sha256(outer_pad || sha256(inner_pad || convert_to(payload, 'UTF8'))), 'hex')
                       || payload;
        END IF;
    END IF;
    IF payload IS NULL THEN
        payload := json_build_object('x', xid, 'n', n::bigint)::text;
    END IF;
    PERFORM pg_notify('permd_changes', payload);
END
$$;

-- The trigger functions run as the owner of permd's schema, whatever role writes: so a
-- writer needs no privilege on the key (nor on the changelog, TRUNCATE included). Nobody else may call them
-- or attach them to a table of their own (a temporary table with a trigger would
-- otherwise sign any rows it liked); a trigger fires whatever the writer's privileges on
-- its function. The search path is pinned, as for every SECURITY DEFINER function.
ALTER FUNCTION permd.log_tuples_new() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_tuples_old() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_tuples_update() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_limits_new() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_limits_old() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_limits_update() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION permd.log_truncate() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION
    permd.log_tuples_new(), permd.log_tuples_old(), permd.log_tuples_update(),
    permd.log_limits_new(), permd.log_limits_old(), permd.log_limits_update(),
    permd.log_truncate(),
    permd.ring_changes("char", json, json)
FROM PUBLIC;
