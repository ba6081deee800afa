-- A deleted credential keeps its row for audit but not its secret:
-- `credentials delete` now empties nonce and ciphertext, and rows deleted
-- before it did are emptied here.
update credentials set nonce = ''::bytea, ciphertext = ''::bytea
where status = 'deleted' and (octet_length(nonce) > 0 or octet_length(ciphertext) > 0);
