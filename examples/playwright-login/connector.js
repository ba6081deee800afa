// A reference browser connector for connectord: the pattern to copy.
//
// - It logs in with the username and password connectord injects (the
//   connector's `credential.env` names them; here SITE_USERNAME and
//   SITE_PASSWORD).
// - It keeps the browser session between runs in CONNECTORD_STATE_FILE,
//   through Playwright's storageState, so a scheduled run does not log in
//   afresh (and get asked for a code) every time. connectord stores the file
//   encrypted and discards it when the credential is replaced or revoked.
// - When the site asks for a one-time code it prints a `code_required`
//   interaction and reads the owner's answer from stdin.
// - It reports what it did as protocol lines on stdout: log, progress.
//
// Exit status: 0 done, 3 the site refused the login, 4 no code in time,
// 1 anything else. Secrets are never printed: not the password, not the
// code, not the cookies.
'use strict';

const fs = require('fs');
const readline = require('readline');
const { chromium } = require('playwright-core');

// What this connector knows about the site. A real connector names its
// bank's own pages and selectors here.
const SITE = {
  // The page behind the login; the site redirects to its login form when
  // the session is missing or stale.
  account: process.env.SITE_URL,
  loginForm: '#username',
  username: '#username',
  password: '#password',
  submit: '#submit',
  codeInput: '#code',
  codePrompt: '#code-prompt',
  codeSubmit: '#verify',
  signedIn: '#account',
  rows: '.transaction',
  refusal: '#result',
};

class Refused extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function say(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function log(level, message) {
  say({ type: 'log', level, message });
}

// The session connectord handed over, or none. The file exists only when
// the connection has a stored state. One that does not parse (written by an
// older version of this connector, say) is not a session: log in instead.
function storedSession(path) {
  if (!path || !fs.existsSync(path)) {
    return undefined;
  }
  try {
    const state = JSON.parse(fs.readFileSync(path, 'utf8'));
    return Array.isArray(state.cookies) ? state : undefined;
  } catch (e) {
    log('warn', 'the stored session does not parse; logging in afresh');
    return undefined;
  }
}

// Answers arrive on stdin, one JSON line per code_required; connectord
// writes nothing else there.
let answers;
async function askForCode(message) {
  answers ??= readline.createInterface({ input: process.stdin, terminal: false })[
    Symbol.asyncIterator
  ]();
  say({ type: 'interaction', kind: 'code_required', message, timeout: '5m' });
  const { value, done } = await answers.next();
  if (done) {
    throw new Error('stdin closed before an answer came');
  }
  const answer = JSON.parse(value);
  if (answer.expired) {
    throw new Refused('no one-time code came in time', 4);
  }
  return answer.value;
}

async function submit(page, button) {
  await Promise.all([page.waitForNavigation(), page.click(button)]);
}

async function logIn(page) {
  await page.fill(SITE.username, process.env.SITE_USERNAME || '');
  await page.fill(SITE.password, process.env.SITE_PASSWORD || '');
  await submit(page, SITE.submit);
  if ((await page.locator(SITE.codeInput).count()) > 0) {
    // The site's own words ("Code sent to ***1234") tell the owner where
    // to look; they carry no secret.
    const prompt = (await page.textContent(SITE.codePrompt)) || 'The site asks for a one-time code';
    await page.fill(SITE.codeInput, await askForCode(prompt.trim()));
    await submit(page, SITE.codeSubmit);
  }
  if ((await page.locator(SITE.signedIn).count()) === 0) {
    const said = (await page.locator(SITE.refusal).count()) > 0
      ? (await page.textContent(SITE.refusal)).trim()
      : 'no account page after login';
    throw new Refused(`login refused: ${said}`, 3);
  }
}

async function main() {
  const statePath = process.env.CONNECTORD_STATE_FILE;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Playwright passes --no-sandbox unless told otherwise; Chromium's own
    // sandbox works inside connectord's.
    chromiumSandbox: true,
    args: ['--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
  });
  try {
    const context = await browser.newContext({ storageState: storedSession(statePath) });
    const page = await context.newPage();
    await page.goto(SITE.account);
    if ((await page.locator(SITE.loginForm).count()) > 0) {
      log('info', 'no live session; logging in');
      await logIn(page);
    } else {
      log('info', 'session restored; no login needed');
    }
    // Keep the session as soon as it is known good: connectord stores the
    // file whatever the run's outcome, so a later failure does not cost
    // the next run a login.
    if (statePath) {
      await context.storageState({ path: statePath });
    }
    const records = await page.locator(SITE.rows).count();
    say({ type: 'progress', records });
    log('info', `read ${records} transactions`);
    return 0;
  } finally {
    await browser.close();
  }
}

main().then(
  (status) => process.exit(status),
  (e) => {
    if (e instanceof Refused) {
      log('error', e.message);
      process.exit(e.status);
    }
    console.error(`connector failed: ${e && e.message}`);
    process.exit(1);
  },
);
