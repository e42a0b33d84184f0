-- permd core contract: the precomputed permission set, its changelog and the doorbell.
-- Model-agnostic: applies to a database that holds nothing else of ours.

CREATE SCHEMA IF NOT EXISTS permd;

-- The full precomputed permission set. object = '' is a global permission,
-- subject = '*' means every subject, object = '*' means every (non-global) object.
-- A row whose expires_at has passed is absent at read time.
CREATE TABLE permd.tuples (
    subject    text NOT NULL CHECK (octet_length(subject) BETWEEN 1 AND 1024),
    object     text NOT NULL CHECK (octet_length(object) <= 1024),
    permission text NOT NULL CHECK (octet_length(permission) BETWEEN 1 AND 1024),
    expires_at timestamptz NULL CHECK (isfinite(expires_at)),
    PRIMARY KEY (subject, object, permission)
);

-- Numeric plan limits, e.g. ('user:1', 'projects', 10).
CREATE TABLE permd.limits (
    subject text   NOT NULL CHECK (octet_length(subject) BETWEEN 1 AND 1024),
    name    text   NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 1024),
    value   bigint NOT NULL,
    PRIMARY KEY (subject, name)
);

-- Keys only: which (subject, object) pair of tuples ('t'), which subject's limits ('l')
-- changed, or a reload marker ('r', written by TRUNCATE). Readers re-read the current
-- rows of each key, so replay is idempotent and order-insensitive. The xid8 column lets
-- readers stop at the oldest running transaction and never skip a slow committer.
CREATE TABLE permd.changelog (
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    kind       "char"      NOT NULL CHECK (kind IN ('t', 'l', 'r')),
    subject    text        NOT NULL DEFAULT '',
    object     text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (xid, id)
);
CREATE INDEX changelog_created_at ON permd.changelog (created_at);

-- The highest changelog position ever pruned. A reader whose cursor is below it may have
-- missed rows and must reload in full.
CREATE TABLE permd.retention (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_xid xid8    NOT NULL DEFAULT '0',
    pruned_id  bigint  NOT NULL DEFAULT 0
);
INSERT INTO permd.retention DEFAULT VALUES;

-- The doorbell. Rung once per writing transaction (NOTIFY folds identical payloads),
-- unless the setting permd.notify is 'off' (ALTER DATABASE ... SET permd.notify = off,
-- or per session/transaction). Correctness never depends on it.
CREATE FUNCTION permd.ring() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('permd.notify', true), '') NOT IN ('off', 'false', '0') THEN
        PERFORM pg_notify('permd_changes', '');
    END IF;
END
$$;

CREATE FUNCTION permd.log_tuples_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT DISTINCT 't', subject, object FROM new_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION permd.log_tuples_old() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT DISTINCT 't', subject, object FROM old_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

-- An UPDATE may change the key itself, so both the old and the new keys are logged.
CREATE FUNCTION permd.log_tuples_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject, object)
    SELECT 't', subject, object FROM old_rows
    UNION
    SELECT 't', subject, object FROM new_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION permd.log_limits_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT DISTINCT 'l', subject FROM new_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION permd.log_limits_old() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT DISTINCT 'l', subject FROM old_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION permd.log_limits_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind, subject)
    SELECT 'l', subject FROM old_rows
    UNION
    SELECT 'l', subject FROM new_rows;
    IF FOUND THEN PERFORM permd.ring(); END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION permd.log_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind) VALUES ('r');
    PERFORM permd.ring();
    RETURN NULL;
END
$$;

-- One trigger per event: transition tables cannot span events.
CREATE TRIGGER tuples_insert AFTER INSERT ON permd.tuples
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION permd.log_tuples_new();
CREATE TRIGGER tuples_update AFTER UPDATE ON permd.tuples
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION permd.log_tuples_update();
CREATE TRIGGER tuples_delete AFTER DELETE ON permd.tuples
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION permd.log_tuples_old();
CREATE TRIGGER tuples_truncate AFTER TRUNCATE ON permd.tuples
    FOR EACH STATEMENT EXECUTE FUNCTION permd.log_truncate();

CREATE TRIGGER limits_insert AFTER INSERT ON permd.limits
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION permd.log_limits_new();
CREATE TRIGGER limits_update AFTER UPDATE ON permd.limits
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION permd.log_limits_update();
CREATE TRIGGER limits_delete AFTER DELETE ON permd.limits
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION permd.log_limits_old();
CREATE TRIGGER limits_truncate AFTER TRUNCATE ON permd.limits
    FOR EACH STATEMENT EXECUTE FUNCTION permd.log_truncate();

-- The read-your-writes token: the calling transaction's xid (assigning one if needed).
-- A check with at_least=TOKEN is answered once every transaction below the daemon's
-- watermark, and so this one, is applied.
CREATE FUNCTION permd.write_token() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT pg_current_xact_id()::text
$$;

-- Microseconds since the Unix epoch, the daemon's representation of expires_at.
CREATE FUNCTION permd.epoch_micros(t timestamptz) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT (extract(epoch FROM t) * 1000000)::bigint
$$;

-- The 64-bit fingerprint of one row: the first 8 bytes of md5 over a canonical text,
-- read big-endian as a signed integer. Fields are separated by the unit separator 0x1f.
CREATE FUNCTION permd.row_hash(line text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT ('x' || substr(md5(line), 1, 16))::bit(64)::bigint
$$;

-- An order-independent digest of every stored row of tuples and limits, expired rows
-- included (expiry is applied at read time, so the digest does not depend on a clock).
-- Format: '<tuples>:<limits>:<sum of row hashes mod 2^64, as 16 hex digits>'.
-- The daemon's GET /v1/digest computes the same value from memory.
CREATE FUNCTION permd.digest() RETURNS text LANGUAGE sql STABLE AS $$
    WITH h AS (
        SELECT permd.row_hash('t' || chr(31) || subject || chr(31) || object || chr(31)
                              || permission || chr(31)
                              || coalesce(permd.epoch_micros(expires_at)::text, '')) AS v,
               1 AS t, 0 AS l
        FROM permd.tuples
        UNION ALL
        SELECT permd.row_hash('l' || chr(31) || subject || chr(31) || name || chr(31) || value),
               0, 1
        FROM permd.limits
    ), s AS (
        SELECT coalesce(sum(t), 0) AS t, coalesce(sum(l), 0) AS l,
               mod(mod(coalesce(sum(v::numeric), 0), 18446744073709551616) + 18446744073709551616,
                   18446744073709551616) AS v
        FROM h
    )
    SELECT s.t || ':' || s.l || ':' ||
           lpad(to_hex((div(s.v, 4294967296))::bigint), 8, '0') ||
           lpad(to_hex((mod(s.v, 4294967296))::bigint), 8, '0')
    FROM s
$$;

-- Retention: delete changelog rows older than keep_for whose transactions have ended,
-- and remember the highest position deleted, so that a daemon whose cursor is below it
-- reloads in full instead of missing rows. Returns the number of rows deleted.
CREATE FUNCTION permd.prune_changelog(keep_for interval DEFAULT '1 day') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8 := pg_snapshot_xmin(pg_current_snapshot());
    last_xid xid8;
    last_id bigint;
    deleted bigint;
BEGIN
    WITH d AS (
        DELETE FROM permd.changelog
        WHERE created_at < now() - keep_for AND xid < horizon
        RETURNING xid, id
    ), m AS (
        SELECT xid, id FROM d ORDER BY xid DESC, id DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM d), (SELECT xid FROM m), (SELECT id FROM m)
    INTO deleted, last_xid, last_id;
    IF deleted > 0 THEN
        UPDATE permd.retention SET pruned_xid = last_xid, pruned_id = last_id
        WHERE (pruned_xid, pruned_id) < (last_xid, last_id);
    END IF;
    RETURN deleted;
END
$$;
