//! Real browser connectors inside the sandbox (SPEC §12, S2; §13, §14):
//! headless Debian Chromium, driven by Playwright, against sites this test
//! serves. tests/browser/login.js logs in with the connection's stored
//! username and password on a manual and on a scheduled run, with
//! Chromium's own sandbox on. The reference connector of
//! examples/playwright-login also answers a one-time code and keeps its
//! session between runs.
//!
//! It needs Chromium (`/usr/bin/chromium`), Node.js and the two
//! `node_modules` (`npm ci --prefix tests/browser`, `npm ci --prefix
//! examples/playwright-login`); CI installs them. Elsewhere, without them,
//! it says so and passes.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::{cli, generate_key, run_ok, Config, Connector, Daemon, Scratch, TestDb};

const USERNAME: &str = "alice.chase";
const PASSWORD: &str = "correct-horse-42";

fn browser_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
}

fn example_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/playwright-login"
    ))
}

/// Whether this machine can run the test; in CI it must.
fn have_browser() -> bool {
    let missing: Vec<&str> = [
        ("/usr/bin/chromium", Path::new("/usr/bin/chromium").exists()),
        ("node", Path::new("/usr/bin/node").exists()),
        (
            "tests/browser/node_modules",
            browser_dir().join("node_modules/playwright-core").exists(),
        ),
        (
            "examples/playwright-login/node_modules",
            example_dir().join("node_modules/playwright-core").exists(),
        ),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI installs the browser test's prerequisites; missing: {missing:?}"
    );
    eprintln!("skipping the browser test; missing: {missing:?}");
    false
}

/// One HTTP request, as much of it as the sites below look at.
struct Request {
    post: bool,
    path: String,
    cookies: String,
    body: String,
}

/// A page, or a redirect with a cookie.
enum Response {
    Page(String),
    Redirect {
        to: &'static str,
        cookie: Option<String>,
    },
}

/// Serves HTTP/1.1 on a loopback port, one request per connection, each
/// answered by `site`. Returns the base URL.
async fn serve(site: impl Fn(Request) -> Response + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let site = Arc::new(site);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let site = site.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                let (head, body) = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length = header(&text[..end], "content-length")
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if text.len() >= end + 4 + length {
                        break (
                            text[..end].to_owned(),
                            text[end + 4..end + 4 + length].to_owned(),
                        );
                    }
                };
                let mut words = head.split(' ');
                let post = words.next() == Some("POST");
                let path = words.next().unwrap_or("/").to_owned();
                let cookies = header(&head, "cookie").unwrap_or_default().to_owned();
                let response = match site(Request {
                    post,
                    path,
                    cookies,
                    body,
                }) {
                    Response::Page(page) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    ),
                    Response::Redirect { to, cookie } => format!(
                        "HTTP/1.1 302 Found\r\nLocation: {to}\r\n{}Content-Length: 0\r\nConnection: close\r\n\r\n",
                        cookie.map(|c| format!("Set-Cookie: {c}\r\n")).unwrap_or_default()
                    ),
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    base
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Serves a login form; a POST with the right username and password gets
/// "Welcome", anything else "Denied". Returns the URL and the count of
/// successful logins.
async fn login_site() -> (String, Arc<AtomicUsize>) {
    let logins = Arc::new(AtomicUsize::new(0));
    let counter = logins.clone();
    let base = serve(move |request| {
        Response::Page(if request.post {
            if request.body == format!("u={USERNAME}&p={PASSWORD}") {
                counter.fetch_add(1, Ordering::SeqCst);
                "<p id=result>Welcome back</p>".to_owned()
            } else {
                "<p id=result>Denied</p>".to_owned()
            }
        } else {
            "<form method=post action=/login><input id=username name=u>\
             <input id=password name=p type=password><button id=submit>Log in</button></form>"
                .to_owned()
        })
    })
    .await;
    (format!("{base}/login"), logins)
}

/// The one-time code the bank site sends, and the session cookie it sets
/// once the code is right: neither may show up anywhere but the browser.
const CODE: &str = "480213";
const SESSION: &str = "sess-7f9c2e1d";

/// What the bank site saw: password logins and code prompts served.
#[derive(Default)]
struct Visits {
    logins: AtomicUsize,
    code_prompts: AtomicUsize,
}

/// A bank: `/account` lists three transactions to a browser holding the
/// session cookie and sends anyone else to `/login`; the right username
/// and password lead to `/code`, and the right code sets the session.
async fn bank_site() -> (String, Arc<Visits>) {
    let visits = Arc::new(Visits::default());
    let seen = visits.clone();
    let base = serve(move |request| {
        let denied = || Response::Page("<p id=result>Denied</p>".to_owned());
        match (request.post, request.path.as_str()) {
            (false, "/account") if request.cookies.contains(&format!("session={SESSION}")) => {
                Response::Page(
                    "<h1 id=account>Checking</h1><ul><li class=transaction>Rent</li>\
                     <li class=transaction>Groceries</li><li class=transaction>Salary</li></ul>"
                        .to_owned(),
                )
            }
            (false, "/account") => Response::Redirect {
                to: "/login",
                cookie: None,
            },
            (false, "/login") => Response::Page(
                "<form method=post action=/login><input id=username name=u>\
                 <input id=password name=p type=password><button id=submit>Log in</button></form>"
                    .to_owned(),
            ),
            (true, "/login") if request.body == format!("u={USERNAME}&p={PASSWORD}") => {
                seen.logins.fetch_add(1, Ordering::SeqCst);
                Response::Redirect {
                    to: "/code",
                    cookie: Some("pending=1; Path=/".to_owned()),
                }
            }
            (false, "/code") => {
                seen.code_prompts.fetch_add(1, Ordering::SeqCst);
                Response::Page(
                    "<p id=code-prompt>Code sent to ***1234</p><form method=post action=/code>\
                     <input id=code name=c><button id=verify>Verify</button></form>"
                        .to_owned(),
                )
            }
            (true, "/code")
                if request.cookies.contains("pending=1") && request.body == format!("c={CODE}") =>
            {
                Response::Redirect {
                    to: "/account",
                    cookie: Some(format!(
                        "session={SESSION}; Path=/; Max-Age=86400; HttpOnly"
                    )),
                }
            }
            _ => denied(),
        }
    })
    .await;
    (format!("{base}/account"), visits)
}

/// A Chase connection with a stored username/password logs in through
/// Chromium in the sandbox on a manual and on a scheduled run.
#[tokio::test(flavor = "multi_thread")]
async fn chromium_logs_in_from_inside_the_sandbox() {
    if !have_browser() {
        return;
    }
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let (url, logins) = login_site().await;
    let keys = dir.path.join("keys");
    let script = browser_dir().join("login.js");
    let config = Config::new(&dir.path, "browser").connector(
        Connector::new("chase", "node")
            .args(&[script.to_str().expect("UTF-8")])
            .timeout("2m")
            .env("LOGIN_URL", url.as_str())
            .read_only(browser_dir())
            .no_retry()
            .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
    );
    let config_path = config.write(&dir.path.join("connectord.toml"));
    let keys_arg = keys.to_str().expect("utf-8");
    let (code, out, err) = cli(
        &db,
        None,
        &["keys", "generate", "--id", "k1", "--dir", keys_arg],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
    db.exec("insert into connections (id, connector) values ('alice-chase', 'chase')")
        .await;
    let (code, out, err) = cli(
        &db,
        Some(&config_path),
        &[
            "credentials",
            "set",
            "alice-chase",
            "--kind",
            "username_password",
            "--username",
            USERNAME,
        ],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;

    db.exec("insert into run_commands (connection_id, trigger) values ('alice-chase', 'manual')")
        .await;
    db.wait_until("select count(*) = 1 from runs where trigger = 'manual' and status <> 'running'")
        .await;
    let (status, records, detail): (String, Option<i64>, Option<String>) =
        sqlx::query_as("select status, records, failure_detail from runs where trigger = 'manual'")
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(
        (status.as_str(), records),
        ("succeeded", Some(1)),
        "{detail:?}\n{}",
        daemon.logs()
    );

    // A schedule firing every second: its first run logs in the same way.
    db.exec("insert into schedules (connection_id, cron) values ('alice-chase', '* * * * * *')")
        .await;
    db.wait_until(
        "select count(*) >= 1 from runs where trigger = 'scheduled' and status = 'succeeded'",
    )
    .await;
    db.exec("delete from schedules").await;

    assert!(logins.load(Ordering::SeqCst) >= 2);
    let logs = daemon.logs();
    assert!(logs.contains("page says: Welcome back"), "{logs}");
    assert!(
        logs.contains("chromium sandbox: on"),
        "Chromium's own sandbox was off inside ours:\n{logs}"
    );
    assert!(!logs.contains(PASSWORD), "the password reached the log");
}

/// The reference connector (examples/playwright-login) in the sandbox:
/// its first run logs in, asks for the site's code and gets the owner's
/// answer; the next run reuses the session it stored and neither logs in
/// nor asks; replacing the credential discards the session, so the run
/// after that logs in again.
#[tokio::test(flavor = "multi_thread")]
async fn the_reference_connector_keeps_its_session_and_asks_for_a_code() {
    if !have_browser() {
        return;
    }
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let (url, visits) = bank_site().await;
    generate_key(&db, &dir.path, "k1");
    let example = example_dir();
    let connector = example.join("connector.js");
    let config = Config::new(&dir.path, "reference").connector(
        Connector::new("bank", "node")
            .args(&[connector.to_str().expect("UTF-8")])
            .timeout("2m")
            .env("SITE_URL", url.as_str())
            .read_only(example)
            .no_retry()
            .username_password("SITE_USERNAME", "SITE_PASSWORD"),
    );
    let path = config.write(&dir.path.join("connectord.toml"));
    db.exec("insert into connections (id, connector) values ('alice-bank', 'bank')")
        .await;
    let set_credential = || {
        run_ok(
            &db,
            &path,
            &[
                "credentials",
                "set",
                "alice-bank",
                "--kind",
                "username_password",
                "--username",
                USERNAME,
            ],
            &format!("{PASSWORD}\n"),
        )
    };
    set_credential();
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;

    // Runs one manual run to its end, answering the code request if
    // `answer` says one comes; returns the run's status and records.
    let run = |answer: bool| {
        let (db, path, daemon) = (&db, &path, &daemon);
        async move {
            let before: i64 = db.scalar("select count(*) from runs").await;
            db.exec(
                "insert into run_commands (connection_id, trigger) values ('alice-bank', 'manual')",
            )
            .await;
            if answer {
                db.wait_until(
                    "select exists (select 1 from interactions where kind = 'code_required' and status = 'open')",
                )
                .await;
                let (id, message): (i64, String) = sqlx::query_as(
                    "select id, message from interactions where kind = 'code_required' and status = 'open'",
                )
                .fetch_one(&db.pool)
                .await
                .expect("the code request");
                assert_eq!(message, "Code sent to ***1234");
                run_ok(
                    db,
                    path,
                    &["interactions", "answer", &id.to_string()],
                    &format!("{CODE}\n"),
                );
            }
            db.wait_until(&format!(
                "select count(*) = {} from runs where status <> 'running'",
                before + 1
            ))
            .await;
            let (status, records, detail): (String, Option<i64>, Option<String>) = sqlx::query_as(
                "select status, records, failure_detail from runs order by id desc limit 1",
            )
            .fetch_one(&db.pool)
            .await
            .expect("run");
            assert_eq!(
                (status.as_str(), records),
                ("succeeded", Some(3)),
                "{detail:?}\n{}",
                daemon.logs()
            );
        }
    };
    let state_size = || {
        let out = run_ok(&db, &path, &["state", "show", "alice-bank", "--json"], "");
        let state: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        state["size_bytes"].as_i64()
    };

    // First run: password, then the code the owner answers.
    run(true).await;
    assert_eq!(visits.logins.load(Ordering::SeqCst), 1);
    assert_eq!(visits.code_prompts.load(Ordering::SeqCst), 1);
    assert!(
        state_size().is_some_and(|n| n > 0),
        "the session was not stored"
    );

    // Second run: the stored session; no login, no code.
    run(false).await;
    assert_eq!(visits.logins.load(Ordering::SeqCst), 1);
    assert_eq!(visits.code_prompts.load(Ordering::SeqCst), 1);
    let asked: i64 = db.scalar("select count(*) from interactions").await;
    assert_eq!(asked, 1);
    assert!(daemon.logs().contains("session restored"));

    // A new credential: the session goes with the old one.
    set_credential();
    assert_eq!(state_size(), None);
    run(true).await;
    assert_eq!(visits.logins.load(Ordering::SeqCst), 2);
    assert_eq!(visits.code_prompts.load(Ordering::SeqCst), 2);

    let logs = daemon.logs();
    for secret in [PASSWORD, CODE, SESSION] {
        assert!(!logs.contains(secret), "{secret} reached the log:\n{logs}");
        let found: i64 = db
            .scalar(&format!(
                "select count(*) from (
                     select to_jsonb(t)::text as row from runs t
                     union all select to_jsonb(t)::text from interactions t
                     union all select to_jsonb(t)::text from connection_states t
                     union all select to_jsonb(t)::text from credentials t) rows
                 where row like '%{secret}%' or row like '%' || encode('{secret}', 'hex') || '%'"
            ))
            .await;
        assert_eq!(found, 0, "{secret} is in a column");
    }
}
