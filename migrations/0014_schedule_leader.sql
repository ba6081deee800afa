-- Many daemons, one database (SPEC §16): one daemon at a time fires the
-- schedules, so the database's work per tick (one command insert, one
-- schedule-row write) does not grow with the number of daemons. The
-- leader holds this one row under a lease it renews; another daemon takes
-- it over once it has expired, with a new term. Every fire statement is
-- fenced on its term and on the lease being current, so a leader that
-- stalled past its lease cannot fire beside its successor. The unique
-- (schedule_id, scheduled_for) key stays as the last line of defence.
create table schedule_leader (
    -- One row: the leadership of the whole database.
    id          boolean primary key default true check (id),
    holder      text not null,
    term        bigint not null,
    acquired_at timestamptz not null default now(),
    expires_at  timestamptz not null
);
