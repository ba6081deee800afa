-- `NOTIFY connectord_commands` only when a statement inserted a command that
-- is due now. The statement-level trigger fired for every insert statement,
-- including the outcome write's retry insert that inserts nothing (or a
-- retry due only later), so every finished run woke every daemon to claim
-- and find nothing: half of all claims in a run of single manual commands,
-- measured. A retry that comes due later is found by the claim poll, as it
-- was before (the claim at its insert found it not yet due).
create or replace function connectord_command_notify() returns trigger language plpgsql as $$
begin
    if exists (select 1 from inserted where not_before <= now()) then
        perform pg_notify('connectord_commands', '');
    end if;
    return null;
end $$;

drop trigger run_commands_notify on run_commands;
create trigger run_commands_notify after insert on run_commands
    referencing new table as inserted
    for each statement execute function connectord_command_notify();
