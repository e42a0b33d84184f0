-- The digest of permd.digest(), one per subject, for `permd verify` to narrow a
-- difference down to the subjects that differ. Same format and row hashes.
CREATE FUNCTION permd.subject_digests() RETURNS TABLE (subject text, digest text)
LANGUAGE sql STABLE AS $$
    WITH h AS (
        SELECT t.subject,
               permd.row_hash('t' || chr(31) || t.subject || chr(31) || t.object || chr(31)
                              || t.permission || chr(31)
                              || coalesce(permd.epoch_micros(t.expires_at)::text, '')) AS v,
               1 AS t, 0 AS l
        FROM permd.tuples t
        UNION ALL
        SELECT l.subject, permd.row_hash('l' || chr(31) || l.subject || chr(31) || l.name || chr(31) || l.value), 0, 1
        FROM permd.limits l
    ), s AS (
        SELECT h.subject, sum(h.t) AS t, sum(h.l) AS l,
               mod(mod(sum(h.v::numeric), 18446744073709551616) + 18446744073709551616,
                   18446744073709551616) AS v
        FROM h GROUP BY h.subject
    )
    SELECT s.subject,
           s.t || ':' || s.l || ':' ||
           lpad(to_hex((div(s.v, 4294967296))::bigint), 8, '0') ||
           lpad(to_hex((mod(s.v, 4294967296))::bigint), 8, '0')
    FROM s
$$;
