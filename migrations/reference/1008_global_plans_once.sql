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
-- user's id (`app.global_held`, `app.desired_global_rows`, `app.desired_limit_rows`),
-- and the functions read them in two branches, all users when `only_users` is NULL and
-- those users otherwise: a plan for any value skips the branch that does not apply when
-- it runs, and reads the other by its indexes. app.sync_global() runs on such plans
-- (`plan_cache_mode = force_generic_plan`), planned once a session. A grant committed in
-- 1.1 to 1.5 ms instead of 2.1 to 3.3 on the demo's database (benches/README.md, "Global
-- writes planned once").
--
-- What the functions return is unchanged; the views give the same rows with `user_id`
-- beside them.

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
    WHERE only_users IS NULL
    UNION ALL
    SELECT subject, object, permission, expires_at FROM app.desired_global_rows
    WHERE user_id = ANY (only_users)
$$;

-- Limits of the given users (all when NULL).
CREATE OR REPLACE FUNCTION app.desired_limits(only_users bigint[])
RETURNS TABLE (subject text, name text, value bigint)
LANGUAGE sql STABLE AS $$
    SELECT subject, name, value FROM app.desired_limit_rows
    WHERE only_users IS NULL
    UNION ALL
    SELECT subject, name, value FROM app.desired_limit_rows
    WHERE user_id = ANY (only_users)
$$;

ALTER FUNCTION app.sync_global(bigint[]) SET plan_cache_mode = force_generic_plan;
