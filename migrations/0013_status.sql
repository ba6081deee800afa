-- `connectord status` (SPEC §15): the daemons that share this database,
-- each upserting its row as it renews leases, and indexes that keep the
-- status's questions to small reads however many runs and schedules there
-- are.
create table daemons (
    instance_id  text primary key,
    hostname     text,
    pid          integer,
    version      text,
    started_at   timestamptz not null default now(),
    last_seen_at timestamptz not null default now(),
    -- Set by a clean shutdown; null while it runs (or after it died).
    stopped_at   timestamptz
);

-- The latest refusals of each kind.
create index runs_refused on runs (failure_kind, id desc) where status = 'refused';
-- Schedules in error are few among many.
create index schedules_in_error on schedules (id) where last_error is not null;
