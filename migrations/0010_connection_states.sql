-- Each connection's state (SPEC §13): the blob its connector wrote at the
-- end of its last run that wrote one, a browser session or a sync cursor.
-- It is secret material: only the ciphertext is stored, sealed under the
-- primary key with associated data naming the connection, its connector,
-- the credential it was written under and the key.
create table connection_states (
    connection_id  text primary key references connections (id) on delete cascade,
    -- The run that wrote it (no foreign key: runs are pruned by retention,
    -- the state is not).
    run_id         bigint,
    -- The credential the run logged in with; null for a connector that
    -- takes none. A launch hands the state only to a run resolving this
    -- same credential.
    credential_id  bigint,
    key_id         text not null,
    nonce          bytea not null,
    ciphertext     bytea not null,
    size_bytes     bigint not null check (size_bytes >= 0),
    updated_at     timestamptz not null default now()
);

-- A session must not outlive its login: whatever changes the connection's
-- credentials (a new one stored, one revoked or deleted, whether by the CLI
-- or by hand) discards the state in the same transaction. So does pointing
-- the connection at another connector, whose site the session is not for.
create function connectord_discard_state() returns trigger language plpgsql as $$
begin
    if tg_table_name = 'connections' then
        delete from connection_states where connection_id = new.id;
    elsif tg_op = 'DELETE' then
        delete from connection_states where connection_id = old.connection_id;
    else
        delete from connection_states where connection_id = new.connection_id;
    end if;
    return null;
end
$$;

create trigger credentials_discard_state_on_insert after insert on credentials
    for each row execute function connectord_discard_state();
create trigger credentials_discard_state_on_status after update of status on credentials
    for each row when (old.status is distinct from new.status)
    execute function connectord_discard_state();
create trigger credentials_discard_state_on_delete after delete on credentials
    for each row execute function connectord_discard_state();
create trigger connections_discard_state_on_connector after update of connector on connections
    for each row when (old.connector is distinct from new.connector)
    execute function connectord_discard_state();
