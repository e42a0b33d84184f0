-- Ask every daemon to load everything again from a fresh snapshot (after a bulk fix-up
-- done with the triggers disabled, say). It is an ordinary changelog row, so it is seen
-- in order, by every daemon, exactly once.
CREATE FUNCTION permd.request_reload() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO permd.changelog (kind) VALUES ('r');
    PERFORM permd.ring();
END
$$;
