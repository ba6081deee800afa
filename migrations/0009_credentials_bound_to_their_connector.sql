-- A ciphertext is bound, through its associated data, to the connector it
-- was stored for, so pointing a connection at another site's connector
-- cannot hand that site the password. `sealed_for` names that connector,
-- for messages only: what decides is the associated data, built from the
-- connection's connector at every launch. Rows stored before the binding
-- have none; the daemon re-encrypts them at start (it alone holds the
-- keys), and until then they are refused rather than opened unbound.
alter table credentials add column sealed_for text;
