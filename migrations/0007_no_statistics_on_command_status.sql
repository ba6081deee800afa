-- `run_commands.status` is a queue state: every command passes pending ->
-- claimed -> done within seconds. An analyze samples one moment of it, and
-- plans made from that moment are used for whatever the queue holds next.
-- Taken while the queue is idle, the sample says nothing is pending, and
-- then every way to find pending commands looks equally free: a finished
-- run's trigger asked "does this connection have pending commands?" by
-- walking every pending command through `run_commands_pending` instead of
-- probing `run_commands_pending_connection`. With 10,000 queued that was
-- 0.2-0.3 ms and 100-200 buffers per finished run instead of 3 us and 5,
-- about a fifth of the throughput.
--
-- Without statistics on the column the planner takes its default share for
-- one value (0.5 %), which keeps the probe of one connection the cheaper
-- plan at any queue length. Every query on this table names the status it
-- wants through a partial index, so none needs the sampled distribution.
alter table run_commands alter column status set statistics 0;

-- An analyze keeps the statistics it no longer collects; a change of the
-- column's type removes them. The type stays the same, so the table is not
-- rewritten; the indexes on the column are rebuilt.
alter table run_commands alter column status type connectord_command_status;
