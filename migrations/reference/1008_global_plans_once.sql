-- The global tuples and limits of a few users (a grant, a subscription, a user's status:
-- what a flush hands to app.sync_global()) are written with plans made once a session.
--
-- app.desired_global() and app.desired_limits() took their users as
-- `only_users IS NULL OR user_id = ANY (only_users)`, one filter for every user (a
-- rebuild, NULL) and for a few (a flush). A plan made for any value of `only_users` (a
-- generic plan) cannot read a table by its index on the user through that OR, so
-- Postgres planned app.sync_global()'s two statements anew at every call, for the value
-- given (a custom plan): ~1.5 ms of planning for ~0.1 of work, at every COMMIT that
-- changed someone's grants, plans or status. Now the definitions are views that keep the
-- user's id (`app.global_held`, `app.desired_global_rows`, `app.desired_limit_rows`), and
-- app.sync_global() hands a set of users to app.sync_global_of(), whose statements read
-- the views for those users only and run on plans made once a session
-- (`plan_cache_mode = force_generic_plan`; every table read by its index on the user).
-- app.sync_global(NULL) (a rebuild) is as before. On the demo's database a call for one
-- user takes 0.35 to 0.6 ms instead of 1.4 to 2.0, and in the `writes` bench a grant or
-- a subscription change commits in 2.6 to 3.3 ms instead of 3.7 to 4.4 (benches/README.md,
-- "Global writes planned once").
--
-- What the functions return and write is unchanged; the views give the same rows with
-- `user_id` beside them. app.sync_global() is patched by its text, as 1006 and 1007
-- patch theirs, with a guard.

-- Each active user's global permissions, by name, with the latest expiry of their sources
-- (NULL when any source never expires or is a direct grant). The users are joined in each
-- branch, so that a filter on `user_id` reaches every table it reads.
CREATE VIEW app.global_held AS
    SELECT s.user_id, s.name,
           CASE WHEN bool_or(s.expires_at IS NULL) THEN NULL ELSE max(s.expires_at) END AS expires_at
    FROM (
        SELECT s.user_id, p.name, s.expires_at
        FROM app.user_subscriptions s
        JOIN app.users u ON u.id = s.user_id AND u.status = 'ACTIVE'
        JOIN app.plan_permissions pp ON pp.plan_id = s.plan_id
        JOIN app.permissions p ON p.id = pp.permission_id
        WHERE s.status = 'ACTIVE'
        UNION ALL
        SELECT g.user_id, p.name, NULL
        FROM app.user_permission_grants g
        JOIN app.users u ON u.id = g.user_id AND u.status = 'ACTIVE'
        JOIN app.permissions p ON p.id = g.permission_id
    ) s
    GROUP BY s.user_id, s.name;

-- Global tuples (object '') and the every-object access ('*') that ADMIN_ACCESS gives.
CREATE VIEW app.desired_global_rows AS
    SELECT h.user_id, 'user:' || h.user_id AS subject, ''::text AS object,
           h.name AS permission, h.expires_at
    FROM app.global_held h
    UNION ALL
    SELECT h.user_id, 'user:' || h.user_id, '*', p, h.expires_at
    FROM app.global_held h, unnest(app.level_permissions(3)) p
    WHERE h.name = 'ADMIN_ACCESS';

-- Limits: per name, the largest value over the user's ACTIVE subscriptions.
CREATE VIEW app.desired_limit_rows AS
    SELECT s.user_id, 'user:' || s.user_id AS subject, l.name, max(l.value) AS value
    FROM app.user_subscriptions s
    JOIN app.users u ON u.id = s.user_id AND u.status = 'ACTIVE'
    JOIN app.plan_limits l ON l.plan_id = s.plan_id
    WHERE s.status = 'ACTIVE'
    GROUP BY s.user_id, l.name;

-- Global permissions of the given users (all users when NULL).
CREATE OR REPLACE FUNCTION app.desired_global(only_users bigint[])
RETURNS TABLE (subject text, object text, permission text, expires_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT subject, object, permission, expires_at FROM app.desired_global_rows
    WHERE only_users IS NULL OR user_id = ANY (only_users)
$$;

-- Limits of the given users (all when NULL).
CREATE OR REPLACE FUNCTION app.desired_limits(only_users bigint[])
RETURNS TABLE (subject text, name text, value bigint)
LANGUAGE sql STABLE AS $$
    SELECT subject, name, value FROM app.desired_limit_rows
    WHERE only_users IS NULL OR user_id = ANY (only_users)
$$;

-- Writes the difference between the desired and the stored global tuples and limits of
-- `users` (not NULL). Its plans are made for any set of users, once a session: each
-- statement reads those users' rows only, by index (the stored rows are deleted where
-- they are read, not found again by a join whose plan would have to guess how many),
-- so the plan fits a few users, and is no worse than one made for the set given for a
-- plan's ~1,600 subscribers.
CREATE FUNCTION app.sync_global_of(users bigint[]) RETURNS void LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    subjects text[] := ARRAY(SELECT 'user:' || u FROM unnest(users) u);
BEGIN
    WITH desired AS MATERIALIZED (
        SELECT subject, object, permission, expires_at FROM app.desired_global_rows
        WHERE user_id = ANY (users)
    ), removed AS (
        DELETE FROM permd.tuples t
        WHERE t.subject = ANY (subjects) AND t.object IN ('', '*')
          AND NOT EXISTS (SELECT FROM desired d WHERE (d.subject, d.object, d.permission)
                                                       = (t.subject, t.object, t.permission))
    )
    INSERT INTO permd.tuples (subject, object, permission, expires_at)
    SELECT subject, object, permission, expires_at FROM desired
    ON CONFLICT (subject, object, permission) DO UPDATE SET expires_at = EXCLUDED.expires_at
    WHERE permd.tuples.expires_at IS DISTINCT FROM EXCLUDED.expires_at;

    WITH desired AS MATERIALIZED (
        SELECT subject, name, value FROM app.desired_limit_rows WHERE user_id = ANY (users)
    ), removed AS (
        DELETE FROM permd.limits l
        WHERE l.subject = ANY (subjects)
          AND NOT EXISTS (SELECT FROM desired d WHERE (d.subject, d.name) = (l.subject, l.name))
    )
    INSERT INTO permd.limits (subject, name, value)
    SELECT subject, name, value FROM desired
    ON CONFLICT (subject, name) DO UPDATE SET value = EXCLUDED.value
    WHERE permd.limits.value <> EXCLUDED.value;
END
$$;

DO $$
DECLARE
    start CONSTANT text := E'\nBEGIN\n';
    definition text := pg_get_functiondef('app.sync_global(bigint[])'::regprocedure);
BEGIN
    IF position(start IN definition) = 0
       OR position(start IN substr(definition, position(start IN definition) + 1)) > 0 THEN
        RAISE EXCEPTION 'app.sync_global() is not the one this migration expects';
    END IF;
    EXECUTE replace(definition, start, $patch$
BEGIN
    IF only_users IS NOT NULL THEN
        PERFORM app.sync_global_of(only_users);
        RETURN;
    END IF;
$patch$);
END
$$;
