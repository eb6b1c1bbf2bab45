// Opens N EventSources from one page of headless Chromium to one HTTPS origin and reports what
// each received: over HTTP/1.1 a browser opens at most 6 connections per origin, so the 7th
// stream would hang; over HTTP/2 they are streams of one connection.
//
// Usage: node eventsources.mjs <https-origin> <token> <n> <timeout-ms>
// Streams are `/api/streams/page-<i>/events`. Prints `ready` once every EventSource is open,
// then one JSON line: {"protocol": "h2", "received": ["<data of source 0's first message>", …],
// "opens": N, "errors": N}.
import { launch } from "./launch.mjs";

const [origin, token, n, timeoutMs] = process.argv.slice(2);
const count = Number(n);
const browser = await launch();
try {
  // The test certificate is self-signed.
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto(`${origin}/health/live`);
  await page.evaluate(({ token, count }) => {
    window.received = new Array(count).fill(null);
    window.opens = 0;
    window.errors = 0;
    for (let i = 0; i < count; i++) {
      const source = new EventSource(`/api/streams/page-${i}/events?token=${encodeURIComponent(token)}`);
      source.onopen = () => { window.opens += 1; };
      source.onerror = () => { window.errors += 1; };
      source.onmessage = (event) => { if (window.received[i] === null) window.received[i] = event.data; };
    }
  }, { token, count });
  const deadline = Date.now() + Number(timeoutMs);
  while (Date.now() < deadline && (await page.evaluate(() => window.opens)) < count) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  console.log("ready");
  while (Date.now() < deadline) {
    const done = await page.evaluate(() => window.received.every((data) => data !== null));
    if (done) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const report = await page.evaluate(() => ({
    protocol: performance.getEntriesByType("navigation")[0].nextHopProtocol,
    received: window.received.filter((data) => data !== null),
    opens: window.opens,
    errors: window.errors,
  }));
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
