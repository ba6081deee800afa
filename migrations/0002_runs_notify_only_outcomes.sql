-- The claim inserts every run slot as 'running', which the trigger function
-- ignores; a WHEN clause skips queuing the trigger event and the PL/pgSQL
-- call for those rows altogether. Same notifications as before.
drop trigger runs_notify on runs;
create trigger runs_notify after insert or update of status on runs
    for each row when (new.status <> 'running')
    execute function connectord_run_notify();
