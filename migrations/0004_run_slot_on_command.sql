-- A connection's run slot moves from the `runs` row to its claimed command.
--
-- The claim used to insert the run's row as `running` in the same statement,
-- and the partial unique index on running runs arbitrated the slot. That
-- second data-modifying statement was most of what the claim cost beyond a
-- bare `SKIP LOCKED` update (about 50 µs of 170 µs, measured warm). Now the
-- claim's one update reserves the run's id from the runs sequence in
-- `run_commands.run_id`, and the unique index below, on claimed commands that
-- hold a run id, is the database's "one run per connection at a time" across
-- every daemon. The `runs` row is written just after the spawn, and a run's
-- final write ends the run and frees the slot in one statement.
--
-- `runs_one_running` stays: a second guard costs one index entry per run.
alter table run_commands add column run_id bigint;

-- Commands of runs going at upgrade time keep their slots.
update run_commands rc set run_id = r.id
from runs r
where r.command_id = rc.id and r.status = 'running' and rc.status = 'claimed';

create unique index run_commands_one_slot on run_commands (connection_id)
    where status = 'claimed' and run_id is not null;

analyze run_commands;
