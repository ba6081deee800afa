-- Cancelling a run (SPEC §15): `runs cancel` sets `cancel_requested_at` on
-- a running row, from any host. The daemon running it learns at once
-- through the notification, and at its next lease renewal should that be
-- lost; a run whose daemon is gone is settled `cancelled` by the lease
-- rescue instead of `lost`.
alter table runs add column cancel_requested_at timestamptz;

create function connectord_cancel_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('connectord_cancels', new.id::text);
    return null;
end
$$;
-- Only an update naming the column fires it: the run's own writes (start,
-- lease renewals, outcome) never do.
create trigger runs_cancel_notify after update of cancel_requested_at on runs
    for each row when (new.cancel_requested_at is not null and old.cancel_requested_at is null)
    execute function connectord_cancel_notify();
