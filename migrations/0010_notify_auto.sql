-- permd.notify = 'auto': ring only while a daemon listens for rings.
--
-- A notifying commit holds a cluster-wide lock until its commit record is flushed, so
-- notifying commits go one at a time, each with its own WAL flush: 2,000 to 3,500 a
-- second on the development machine's disk however many writers, where `off` made 7,100
-- to 9,900 (benches/README.md, `commit_rate`). With 'auto' a daemon that hears many
-- writes stops listening for them and polls the changelog every few milliseconds instead
-- (`--busy-poll-ms`); writers then send nothing, and their commits share WAL flushes.
-- When the writes stop, it listens again, and writers ring (with their rows, as 'on').
--
-- How a writer knows: a listening daemon holds one of eight session advisory locks
-- (1886547300, slot), 1886547300 being 'prmd', exclusively. A transaction's first
-- statement that writes permd's tables tries each slot in share mode, held until the
-- transaction ends: one it cannot take is a listening daemon's, and the transaction
-- rings; if it takes all eight, no daemon listens, and it stays silent. A daemon takes a
-- slot only when no silent transaction holds it, so when it listens again every silent
-- transaction has ended, and the poll it makes right after reads them. Later statements
-- of the transaction do as its first did (permd.rings, local to the transaction), so a
-- daemon never hears half a transaction. Nothing here can lose a commit: a silent one is
-- read by the poll, as with 'off', at most one poll interval later.
--
-- Notifications of 'auto' writers carry "a": true, so that a daemon knows whose writes it
-- could stop listening for ('on' writers ring whatever it does).

CREATE FUNCTION permd.rings() RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    setting text := coalesce(current_setting('permd.notify', true), '');
    decided text;
BEGIN
    IF setting IN ('off', 'false', '0') THEN
        RETURN false;
    END IF;
    IF setting IS DISTINCT FROM 'auto' THEN
        RETURN true;
    END IF;
    decided := current_setting('permd.rings', true);
    IF decided IN ('yes', 'no') THEN
        RETURN decided = 'yes';
    END IF;
    -- The transaction's id exists before a daemon can see the slots as taken: a daemon
    -- that takes a slot after this sees it in the snapshot of its next poll.
    PERFORM pg_current_xact_id();
    FOR slot IN 0..7 LOOP
        IF NOT pg_try_advisory_xact_lock_shared(1886547300, slot) THEN
            PERFORM set_config('permd.rings', 'yes', true);
            RETURN true;
        END IF;
    END LOOP;
    PERFORM set_config('permd.rings', 'no', true);
    RETURN false;
END
$$;

-- As in 0006: 'auto' asks permd.rings(), and its notifications say so.
CREATE OR REPLACE FUNCTION permd.ring_changes(kind "char", gone json, came json) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    xid text;
    n text;
    auto boolean := current_setting('permd.notify', true) IS NOT DISTINCT FROM 'auto';
    inner_pad bytea;
    outer_pad bytea;
BEGIN
    IF NOT permd.rings() THEN
        RETURN;
    END IF;
    xid := pg_current_xact_id()::text;
    -- A counter local to the transaction; needs no privilege a writer might lack.
    n := set_config('permd.statement',
                    (coalesce(nullif(current_setting('permd.statement', true), ''), '0')::bigint + 1)::text,
                    true);
    IF current_setting('permd.notify', true) IS DISTINCT FROM 'doorbell'
       AND coalesce(json_array_length(gone), 0) <= 200 AND coalesce(json_array_length(came), 0) <= 200 THEN
        IF auto THEN
            payload := json_build_object('x', xid, 'n', n::bigint, 'a', true, 'k', kind, 'd', gone, 'u', came)::text;
        ELSE
            payload := json_build_object('x', xid, 'n', n::bigint, 'k', kind, 'd', gone, 'u', came)::text;
        END IF;
        SELECT k.inner_pad, k.outer_pad INTO inner_pad, outer_pad FROM permd.notify_key k;
        IF inner_pad IS NULL OR octet_length(payload) > 7935 THEN
            payload := NULL;
        ELSE
            payload := encode(sha256(outer_pad || sha256(inner_pad || convert_to(payload, 'UTF8'))), 'hex')
                       || payload;
        END IF;
    END IF;
    IF payload IS NULL AND auto THEN
        payload := json_build_object('x', xid, 'n', n::bigint, 'a', true)::text;
    ELSIF payload IS NULL THEN
        payload := json_build_object('x', xid, 'n', n::bigint)::text;
    END IF;
    PERFORM pg_notify('permd_changes', payload);
END
$$;

REVOKE EXECUTE ON FUNCTION permd.rings() FROM PUBLIC;
