-- The value checks of the two tables every run writes, as domains over the
-- same base types. PostgreSQL reads a table's CHECK constraints back from
-- their stored form on every statement that writes the table (the claim
-- spent about 20 µs of its 130 µs doing so, measured), while a domain's
-- checks are read once per session and cached. The rules are the same and
-- clients still see text and integer columns; only the wording of a
-- violation changes (it names the domain).
create domain connectord_trigger as text
    check (value in ('scheduled', 'retry', 'manual'));
create domain connectord_command_status as text
    check (value in ('pending', 'claimed', 'done'));
create domain connectord_attempt as integer
    check (value >= 1);
create domain connectord_run_status as text
    check (value in ('running', 'succeeded', 'failed', 'refused', 'skipped'));
create domain connectord_credential_source as text
    check (value in ('store', 'process_env', 'none'));

alter table run_commands
    drop constraint run_commands_trigger_check,
    drop constraint run_commands_status_check,
    drop constraint run_commands_attempt_check,
    alter column trigger type connectord_trigger,
    alter column status type connectord_command_status,
    alter column attempt type connectord_attempt;

-- The trigger names runs.status, so it is re-created around the change,
-- exactly as migration 0002 left it.
drop trigger runs_notify on runs;
alter table runs
    drop constraint runs_trigger_check,
    drop constraint runs_status_check,
    drop constraint runs_credential_source_check,
    alter column trigger type connectord_trigger,
    alter column status type connectord_run_status,
    alter column credential_source type connectord_credential_source;
create trigger runs_notify after insert or update of status on runs
    for each row when (new.status <> 'running')
    execute function connectord_run_notify();

-- Changing a column's type drops its statistics; without them the planner
-- mis-estimates the claim until autovacuum next analyzes the tables.
analyze run_commands;
analyze runs;
