// Reads an SSE stream with the `eventsource` npm package (a third-party client, as Node services
// use it) and reports every event it dispatches.
//
// Usage: node sse-client.mjs <url> <expected-count> <timeout-ms>
// Prints `ready` once the stream is open, then one JSON line when `expected-count` events have
// come or the time is up: {"events": [{"type": "...", "id": "...", "data": "..."}...], "errors": N}.
import { EventSource } from "eventsource";

const [url, expected, timeoutMs] = process.argv.slice(2);
const events = [];
let errors = 0;
const source = new EventSource(url);
const finish = () => {
  source.close();
  console.log(JSON.stringify({ events, errors }));
  process.exit(0);
};
const record = (event) => {
  events.push({ type: event.type, id: event.lastEventId, data: event.data });
  if (events.length >= Number(expected)) finish();
};
source.onopen = () => console.log("ready");
source.onerror = () => { errors += 1; };
source.onmessage = record;
// Named events too (`gap`, `end`): a phantom of any type would show.
for (const type of ["gap", "end"]) source.addEventListener(type, record);
setTimeout(finish, Number(timeoutMs));
