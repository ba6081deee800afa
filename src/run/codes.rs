//! One-time codes (SPEC §14): a connector asks for a code with a
//! `code_required` interaction and reads its stdin; the owner answers with
//! `connectord interactions answer` from any host; the daemon running the
//! run takes the answer (encrypted in the row until then), deletes it, and
//! writes it to the child as one line.
//!
//! Each run has one [`serve`] task, which holds the child's stdin for the
//! run and handles its code requests one at a time. An answer is taken
//! only by the daemon whose claim still holds the run (the statement is
//! fenced on it), so a run another daemon took over never receives an
//! answer meant for the one that died. Answers are announced by `NOTIFY
//! connectord_answers` (see [`Waiting`]) and, should one be missed, found
//! by a poll every [`POLL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::credentials::keys::{AnswerBinding, Keyring};

/// The channel the answer trigger notifies, with the interaction's id.
pub const ANSWERS_CHANNEL: &str = "connectord_answers";

/// How often a waiting run looks for its answer without a notification.
const POLL: Duration = Duration::from_secs(2);

/// How long a line may take to reach the child's pipe.
const WRITE_PATIENCE: Duration = Duration::from_secs(1);

/// A code request the child printed.
#[derive(Debug)]
pub struct CodeRequest {
    pub message: String,
    pub timeout: Duration,
}

/// The interactions waiting on this daemon, by id, each with what wakes
/// its run when an answer is announced.
#[derive(Default)]
pub struct Waiting {
    map: Mutex<HashMap<i64, Arc<Notify>>>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<Notify>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, id: i64) -> Arc<Notify> {
        self.lock().entry(id).or_default().clone()
    }

    fn remove(&self, id: i64) {
        self.lock().remove(&id);
    }

    /// An answer to interaction `id` was announced.
    pub fn wake(&self, id: i64) {
        if let Some(notify) = self.lock().get(&id) {
            notify.notify_one();
        }
    }

    /// Notifications may have been lost: every waiting run looks again.
    pub fn wake_all(&self) {
        for notify in self.lock().values() {
            notify.notify_one();
        }
    }
}

/// What one run's code requests share.
pub struct Serve {
    pub pool: PgPool,
    pub keyring: Option<Arc<Keyring>>,
    pub instance_id: String,
    pub waiting: Arc<Waiting>,
    pub connection_id: String,
    pub run_id: i64,
    /// Set once a code request expired unanswered.
    pub expired: Arc<AtomicBool>,
}

/// Serves the run's code requests until `done`, holding the child's stdin
/// open the whole time; then closes what is still open of this run.
pub async fn serve(
    serve: Serve,
    mut requests: mpsc::UnboundedReceiver<CodeRequest>,
    mut stdin: pipe::Sender,
    done: CancellationToken,
) {
    let mut served = false;
    loop {
        let request = tokio::select! {
            request = requests.recv() => request,
            () = done.cancelled() => None,
        };
        let Some(request) = request else { break };
        served = true;
        if let Err(e) = serve.one(request, &mut stdin, &done).await {
            tracing::warn!(error = %e, "could not serve the connector's code request");
        }
    }
    if !served {
        return;
    }
    // A request the run no longer waits for cannot be answered.
    let closed = sqlx::query(
        "update interactions set status = 'expired', resolved_at = now(),
                answer_key_id = null, answer_nonce = null, answer_ciphertext = null
         where run_id = $1 and kind = 'code_required' and status = 'open'",
    )
    .bind(serve.run_id)
    .execute(&serve.pool)
    .await;
    if let Err(e) = closed {
        tracing::debug!(error = %e, "could not close the run's open code requests");
    }
}

impl Serve {
    /// Opens the interaction, waits for its answer or its expiry, and
    /// writes the line that says which to the child.
    async fn one(
        &self,
        request: CodeRequest,
        stdin: &mut pipe::Sender,
        done: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        let expires = tokio::time::Instant::now() + request.timeout;
        let id = self.open(&request).await?;
        let Some(id) = id else { return Ok(()) };
        tracing::info!(
            event = "interaction.opened",
            interaction = id,
            kind = "code_required",
            timeout_s = request.timeout.as_secs(),
            "the connector waits for a one-time code"
        );
        let wake = self.waiting.register(id);
        let result = self.wait(id, expires, &wake, stdin, done).await;
        self.waiting.remove(id);
        result
    }

    async fn wait(
        &self,
        id: i64,
        expires: tokio::time::Instant,
        wake: &Notify,
        stdin: &mut pipe::Sender,
        done: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        loop {
            if let Some(line) = self.take(id).await? {
                deliver(id, &line, stdin).await;
                return Ok(());
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                () = done.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(expires) => {
                    if self.expire(id).await? {
                        self.expired.store(true, Ordering::SeqCst);
                        write_line(stdin, &expired_line(id)).await;
                        tracing::warn!(
                            event = "interaction.expired",
                            interaction = id,
                            "no code came in time"
                        );
                        return Ok(());
                    }
                    // An answer arrived as the request expired: it wins.
                    if let Some(line) = self.take(id).await? {
                        deliver(id, &line, stdin).await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Opens the code request's interaction, after expiring one a run of
    /// this connection left open (only one run of it goes at a time).
    async fn open(&self, request: &CodeRequest) -> Result<Option<i64>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "update interactions set status = 'expired', resolved_at = now(),
                    answer_key_id = null, answer_nonce = null, answer_ciphertext = null
             where connection_id = $1 and kind = 'code_required' and status = 'open'",
        )
        .bind(&self.connection_id)
        .execute(&mut *tx)
        .await?;
        let id: Option<i64> = sqlx::query_scalar(
            "insert into interactions (connection_id, run_id, kind, message, expires_at)
             select $1, $2, 'code_required', $3, now() + make_interval(secs => $4)
             where exists (select 1 from connections where id = $1)
             returning id",
        )
        .bind(&self.connection_id)
        .bind(self.run_id)
        .bind(&request.message)
        .bind(request.timeout.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Takes the interaction's answer if there is one and this daemon still
    /// holds the run, deleting it as it resolves the interaction; returns
    /// the line for the child.
    async fn take(&self, id: i64) -> Result<Option<Zeroizing<Vec<u8>>>, sqlx::Error> {
        let row = sqlx::query(
            "with answer as (
                 select i.id, i.answer_key_id, i.answer_nonce, i.answer_ciphertext
                 from interactions i
                 where i.id = $1 and i.status = 'open' and i.answer_ciphertext is not null
                   and exists (select 1 from run_commands rc
                               where rc.connection_id = i.connection_id
                                 and rc.status = 'claimed' and rc.run_id = i.run_id
                                 and rc.claimed_by = $2)
                 for update of i
             )
             update interactions i
             set status = 'resolved', resolved_at = now(),
                 answer_key_id = null, answer_nonce = null, answer_ciphertext = null
             from answer where i.id = answer.id
             returning answer.answer_key_id, answer.answer_nonce, answer.answer_ciphertext",
        )
        .bind(id)
        .bind(&self.instance_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let key_id: String = row.try_get("answer_key_id")?;
        let nonce: Vec<u8> = row.try_get("answer_nonce")?;
        let ciphertext: Vec<u8> = row.try_get("answer_ciphertext")?;
        let Some(keyring) = &self.keyring else {
            tracing::error!(
                interaction = id,
                "an answer came, but the daemon has no key to decrypt it with"
            );
            return Ok(None);
        };
        let binding = AnswerBinding {
            interaction_id: id,
            connection_id: &self.connection_id,
            run_id: self.run_id,
            key_id: &key_id,
        };
        let code = match keyring.open_answer(&binding, &nonce, &ciphertext) {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(interaction = id, error = %e, "the answer does not decrypt for this interaction; it was discarded");
                return Ok(None);
            }
        };
        let Ok(code) = std::str::from_utf8(&code) else {
            tracing::error!(interaction = id, "the answer is not text; it was discarded");
            return Ok(None);
        };
        Ok(Some(answer_line(id, code)))
    }

    /// Marks the interaction expired unless it was answered; whether it was.
    async fn expire(&self, id: i64) -> Result<bool, sqlx::Error> {
        let expired = sqlx::query(
            "update interactions set status = 'expired', resolved_at = now()
             where id = $1 and status = 'open' and answer_ciphertext is null",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(expired == 1)
    }
}

#[derive(Serialize)]
struct Answer<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    interaction: i64,
    value: &'a str,
}

#[derive(Serialize)]
struct Expired {
    #[serde(rename = "type")]
    kind: &'static str,
    interaction: i64,
    expired: bool,
}

/// `{"type":"answer","interaction":ID,"expired":true}` and a newline.
fn expired_line(id: i64) -> Vec<u8> {
    let expired = Expired {
        kind: "answer",
        interaction: id,
        expired: true,
    };
    let mut line = serde_json::to_vec(&expired).unwrap_or_default();
    line.push(b'\n');
    line
}

/// `{"type":"answer","interaction":ID,"value":"..."}` and a newline, in a
/// buffer sized so that no reallocation leaves a copy of the code behind.
fn answer_line(id: i64, code: &str) -> Zeroizing<Vec<u8>> {
    // Every character escapes to at most six bytes (`\u001f`).
    let mut line = Zeroizing::new(Vec::with_capacity(64 + 6 * code.len()));
    let answer = Answer {
        kind: "answer",
        interaction: id,
        value: code,
    };
    // Writing to a vector fails only if serialisation does, which a
    // struct of a string and a number cannot.
    let _ = serde_json::to_writer(&mut *line, &answer);
    line.push(b'\n');
    line
}

/// Hands the answer line to the child.
async fn deliver(id: i64, line: &[u8], stdin: &mut pipe::Sender) {
    write_line(stdin, line).await;
    tracing::info!(
        event = "interaction.answered",
        interaction = id,
        "the owner's code was handed to the connector"
    );
}

/// Writes one whole line to the child's stdin.
async fn write_line(stdin: &mut pipe::Sender, line: &[u8]) {
    match tokio::time::timeout(WRITE_PATIENCE, stdin.write_all(line)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not write to the connector's stdin")
        }
        Err(_) => tracing::warn!("the connector's stdin is full; the line was not written"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expired_line_keeps_the_spec_s_order() {
        assert_eq!(
            expired_line(3),
            b"{\"type\":\"answer\",\"interaction\":3,\"expired\":true}\n"
        );
    }

    #[test]
    fn the_answer_line_is_one_json_object() {
        let line = answer_line(7, "12\"3\n");
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type": "answer", "interaction": 7, "value": "12\"3\n"})
        );
    }
}
