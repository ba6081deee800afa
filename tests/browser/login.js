// A browser connector for tests/browser.rs: headless Chromium, driven by
// Playwright, logs in to LOGIN_URL with the stored username and password
// (CHASE_USERNAME, CHASE_PASSWORD) and reports what the page said. It keeps
// Chromium's own sandbox on: no --no-sandbox.
const { chromium } = require('playwright-core');

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Playwright passes --no-sandbox unless told otherwise.
    chromiumSandbox: true,
    args: [
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    const page = await browser.newPage();
    await page.goto(process.env.LOGIN_URL);
    await page.fill('#username', process.env.CHASE_USERNAME || '');
    await page.fill('#password', process.env.CHASE_PASSWORD || '');
    await Promise.all([page.waitForNavigation(), page.click('#submit')]);
    const said = (await page.textContent('#result')) || '';
    // Chromium's own sandbox, as it reports it.
    const status = await browser.newPage();
    await status.goto('chrome://sandbox');
    const report = (await status.textContent('body')) || '';
    const sandboxed = report.includes('You are adequately sandboxed');
    console.log(JSON.stringify({ type: 'log', level: 'info', message: `chromium sandbox: ${sandboxed ? 'on' : 'off'}` }));
    console.log(JSON.stringify({ type: 'log', level: 'info', message: `page says: ${said.trim()}` }));
    console.log(JSON.stringify({ type: 'progress', records: said.includes('Welcome') ? 1 : 0 }));
    process.exitCode = said.includes('Welcome') && sandboxed ? 0 : 3;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`login failed: ${e && e.message}`);
  process.exit(4);
});
