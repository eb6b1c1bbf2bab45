// Opens an EventSource in headless Chromium and reports every message it receives.
//
// Usage: node eventsource.mjs <origin> <path-with-query> <expected-count> <timeout-ms>
// Prints `ready` once the EventSource is open, then one JSON line at the end:
// {"received": [{"id": "...", "data": "..."}...], "errors": N, "opens": N}.
// The page is served by streamgate itself (same origin), so no CORS is involved; the browser's
// own reconnect logic (with its Last-Event-ID header) does the resuming.
import { launch } from "./launch.mjs";

const [origin, path, expected, timeoutMs] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage();
  await page.goto(`${origin}/health/live`);
  await page.evaluate((path) => {
    window.received = [];
    window.errors = 0;
    window.opens = 0;
    const source = new EventSource(path);
    source.onopen = () => { window.opens += 1; };
    source.onerror = () => { window.errors += 1; };
    source.onmessage = (event) => { window.received.push({ id: event.lastEventId, data: event.data }); };
  }, path);
  // Tell the test the stream is open before it starts publishing (and restarting the server).
  const opened = Date.now() + 30000;
  while (Date.now() < opened && (await page.evaluate(() => window.opens)) < 1) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  console.log("ready");
  const deadline = Date.now() + Number(timeoutMs);
  while (Date.now() < deadline) {
    const count = await page.evaluate(() => window.received.length);
    if (count >= Number(expected)) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  // A little longer, to catch duplicates arriving after the last expected message.
  await new Promise((resolve) => setTimeout(resolve, 500));
  const report = await page.evaluate(() => ({ received: window.received, errors: window.errors, opens: window.opens }));
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
