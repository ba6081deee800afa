-- `run_commands_claimed` indexed every claimed command by `claimed_by`. Its
-- predicate also matches the claim's test for a connection's taken slot, and
-- with statistics taken while few commands were claimed the planner walked
-- the whole index (live and dead entries) for every picked command instead
-- of probing `run_commands_one_slot` by connection: claims and outcome writes
-- slowed by milliseconds once thousands of runs had gone through, and stayed
-- slow until the next analyze. Claimed commands that hold a slot are reached
-- through `run_commands_one_slot` and by primary key; only the rare claims
-- without one (waiting to be handed back, or left by a dead daemon) need an
-- index of their own.
drop index run_commands_claimed;
create index run_commands_claimed_without_slot on run_commands (claimed_at)
    where status = 'claimed' and run_id is null;
