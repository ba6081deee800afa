-- A finished run's trigger asks "does this connection have pending
-- commands?", to wake the queues for them. After an analyze of an idle
-- queue, whose sample has every command done, PostgreSQL costed two answers
-- at one row each: a probe of `run_commands_pending_connection`, and a walk
-- of `run_commands_pending` (the claim's index, in `not_before` order)
-- filtering by connection. It took the walk. With 10,000 commands queued
-- that was 0.2-0.3 ms and 100-200 buffers per finished run instead of 3 us
-- and 5, and a fifth of the throughput of any daemon on the database.
--
-- The claim's index now also names `not_before is not null`. The column is
-- never null, so the index holds the same entries, but PostgreSQL uses a
-- partial index only for a query whose conditions imply its predicate: the
-- claim's `not_before <= now()` does, the trigger's lookup does not. The
-- lookup is left with the probe by connection, whatever the statistics say.
drop index run_commands_pending;
create index run_commands_pending on run_commands (not_before, id)
    where status = 'pending' and not_before is not null;
