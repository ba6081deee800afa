-- One-time codes (SPEC §14): a `code_required` interaction waits for its
-- owner's answer until `expires_at`, then becomes `expired`. The answer is
-- stored only encrypted, bound to the interaction, its connection and its
-- run, from `interactions answer` until the daemon running the run takes
-- it, which deletes it in the statement that marks the interaction
-- resolved.
alter table interactions drop constraint interactions_status_check;
alter table interactions add constraint interactions_status_check
    check (status in ('open', 'resolved', 'expired'));
alter table interactions
    add column expires_at        timestamptz,
    add column answered_at       timestamptz,
    add column answer_key_id     text,
    add column answer_nonce      bytea,
    add column answer_ciphertext bytea;

-- The daemon running the run learns of an answer at once, whichever host
-- gave it.
create function connectord_answer_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('connectord_answers', new.id::text);
    return null;
end
$$;
create trigger interactions_answer_notify after update of answer_ciphertext on interactions
    for each row when (new.answer_ciphertext is not null and old.answer_ciphertext is null)
    execute function connectord_answer_notify();
