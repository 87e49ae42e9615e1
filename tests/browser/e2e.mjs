// End-to-end test of the demo: built by trunk, served by the real server,
// driven in Debian's Chromium with playwright-core.
//
//   node tests/browser/e2e.mjs --server target/debug/crosswire-server --static dist --out test-output
//
// 1. Two pages open the demo; a message published in one appears in the other.
// 2. The server is stopped (SIGINT: 1001) and restarted on the same port: both pages
//    show "reconnecting", then open again, resubscribed, and a new message flows.
// 3. Recovery: a third page reaches the server through tests/browser/proxy.mjs;
//    its connection is cut and refused while another page publishes; after it
//    reconnects the missed messages appear, none twice.
// 4. Volume: 2,000 messages on one topic all appear in the demo, in order (the
//    demo once stopped showing messages after the 1,000th).
// 5. Failover: a private redis-server and two nodes A and B on it; a page
//    reaches A through the proxy; A is killed (SIGKILL), the proxy moves to B,
//    and every message published meanwhile (through B) appears, none twice.
// Prints TAP-style "ok N - ..." / "not ok N - ..." lines; exits non-zero on failure.
// Screenshots: OUT/demo.png (the demo after the run), OUT/demo-reconnecting.png,
// OUT/demo-failover.png.
import { spawn, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import { once } from 'node:events';
import path from 'node:path';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const SERVER = arg('server', 'target/debug/crosswire-server');
const STATIC = arg('static', 'dist');
const OUT = arg('out', 'test-output');
fs.mkdirSync(OUT, { recursive: true });

const children = new Set();
let browser;
let n = 0;
let failures = 0;

async function test(name, fn) {
  n += 1;
  try {
    await fn();
    console.log(`ok ${n} - ${name}`);
  } catch (e) {
    failures += 1;
    console.log(`not ok ${n} - ${name}`);
    console.log(`  # ${String(e && e.stack || e).split('\n').join('\n  # ')}`);
    throw e;
  }
}

/** Spawns a process and resolves with the first stdout line matching `re` (bounded). */
async function startProcess(cmd, args, re, ms, logName) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  const log = fs.createWriteStream(path.join(OUT, `${logName}.log`), { flags: 'a' });
  child.stderr.pipe(log);
  return await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`${cmd} printed nothing matching ${re} within ${ms} ms`)), ms);
    child.stdout.on('data', (d) => {
      log.write(d);
      buf += d;
      const m = buf.match(re);
      if (m) {
        clearTimeout(timer);
        resolve({ child, match: m });
      }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`${cmd} exited early (${code})`)); });
  });
}

/** An HS256 JWT, as the server's --jwt-secret verifies. */
function jwt(claims, secret) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${crypto.createHmac('sha256', secret).update(body).digest('base64url')}`;
}

async function startServer(port, extra = []) {
  // Room for the volume test: one publisher sends 2,000 messages as fast as it can.
  const volume = ['--publish-rate', '100000', '--publish-burst', '100000', '--outbound-queue', '4096',
    '--history-size', '4096'];
  const { child, match } = await startProcess(
    SERVER, ['--host', '127.0.0.1', '--port', String(port), '--static', STATIC, ...volume, ...extra],
    /crosswire listening on http:\/\/127\.0\.0\.1:(\d+)/, 20_000, 'e2e-server');
  return { child, port: Number(match[1]) };
}

/** Stops a process: SIGTERM by default (for the server: a restart, peers get 1012), or `signal`. */
async function stop(child, ms = 10_000, signal = 'SIGTERM') {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), ms);
  await once(child, 'exit');
  clearTimeout(timer);
}

/** Sends one Redis command (RESP) and resolves with the first line of the answer, or null. */
function redisCommand(port, args) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let buf = '';
    socket.setTimeout(2_000, () => { socket.destroy(); resolve(null); });
    socket.on('error', () => resolve(null));
    socket.on('connect', () => socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`));
    socket.on('data', (d) => {
      buf += d;
      const i = buf.indexOf('\r\n');
      if (i >= 0) { socket.destroy(); resolve(buf.slice(0, i)); }
    });
  });
}

/** A port free a moment ago (redis-server cannot pick one itself: its port 0 turns TCP off). */
async function freePort() {
  const server = net.createServer();
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  const { port } = server.address();
  await new Promise((ok) => server.close(ok));
  return port;
}

const redisDirs = new Set();
/** A private redis-server on a free loopback port, without persistence, in a directory of its own. */
async function startRedis() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'crosswire-e2e-redis-'));
  redisDirs.add(dir);
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
      '--logfile', 'redis.log', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    children.add(child);
    let exited = false;
    child.on('error', () => { exited = true; });
    child.on('exit', () => { exited = true; children.delete(child); });
    const deadline = Date.now() + 10_000;
    while (!exited && Date.now() < deadline) {
      if (await redisCommand(port, ['PING']) === '+PONG') return { child, port, url: `redis://127.0.0.1:${port}` };
      await new Promise((ok) => setTimeout(ok, 50));
    }
    child.kill('SIGKILL');
  }
  throw new Error('redis-server did not start (is it installed? run scripts/setup.sh)');
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  for (const c of children) c.kill('SIGKILL');
  for (const d of redisDirs) fs.rmSync(d, { recursive: true, force: true });
}
process.on('SIGTERM', async () => { await cleanup(); process.exit(143); });

const state = (page) => page.getAttribute('#status', 'data-state');
const waitState = (page, states, ms) => page.waitForFunction(
  (s) => s.includes(document.querySelector('#status')?.dataset.state),
  states, { timeout: ms });
const waitLive = (page, ms) => page.waitForFunction(
  () => ['live', 'gap'].includes(document.querySelector('#topic-status')?.dataset.state),
  null, { timeout: ms });
const texts = (page) => page.$$eval('#messages li .text', (els) => els.map((e) => e.textContent));
const waitText = (page, text, ms) => page.waitForFunction(
  (t) => [...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === t),
  text, { timeout: ms });

async function publish(page, text) {
  await page.fill('#message-input', text);
  await page.click('#publish');
  // The page lists its own message and gets its seq from the ack.
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li.mine')].some((e) => e.querySelector('.text').textContent === t && e.dataset.seq !== ''),
    text, { timeout: 10_000 });
}

async function main() {
  let server = await startServer(0);
  const port = server.port;
  const url = `http://127.0.0.1:${port}/`;
  console.log(`# server on ${url}`);

  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
    timeout: 30_000,
  });
  const pages = [];
  for (let i = 0; i < 2; i++) {
    const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => console.log(`# page ${i} error: ${e}`));
    pages.push(page);
  }
  const [a, b] = pages;
  const tag = Date.now().toString(36);

  await test('both pages load the demo and connect', async () => {
    for (const p of pages) {
      await p.goto(url, { timeout: 20_000 });
      await p.waitForSelector('h1:text("Websocket messages")', { timeout: 20_000 });
      await waitState(p, ['open'], 20_000);
      await waitLive(p, 10_000);
      const topic = await p.textContent('#current-topic');
      if (topic !== 'test') throw new Error(`default topic is ${topic}`);
    }
  });

  await test('a message published in one page appears in the other', async () => {
    await publish(a, `hello from a ${tag}`);
    await waitText(b, `hello from a ${tag}`, 10_000);
    await publish(b, `hello from b ${tag}`);
    await waitText(a, `hello from b ${tag}`, 10_000);
  });

  await test('joining another topic moves the subscription', async () => {
    const room = `room-${tag}`;
    const join = async (p, topic) => {
      await p.fill('#topic-input', topic);
      await p.click('#join');
      await p.waitForFunction((t) => document.querySelector('#current-topic')?.textContent === t, topic, { timeout: 5_000 });
      await waitLive(p, 10_000);
    };
    await join(a, room);
    await publish(a, `only in ${room}`);
    await join(b, room);
    await publish(a, `both in ${room}`);
    await waitText(b, `both in ${room}`, 10_000);
    if ((await texts(b)).includes(`only in ${room}`)) throw new Error('b got a message sent before it joined');
    await join(a, 'test');
    await join(b, 'test');
  });

  await test('presence lists both pages', async () => {
    for (const p of pages) {
      await p.waitForFunction(() => document.querySelectorAll('#presence li').length === 2, null, { timeout: 10_000 });
    }
  });

  await test('2,000 messages on one topic all appear in the demo, in order', async () => {
    const topic = `bulk-${tag}`;
    await a.fill('#topic-input', topic);
    await a.click('#join');
    await a.waitForFunction((t) => document.querySelector('#current-topic')?.textContent === t, topic, { timeout: 5_000 });
    await waitLive(a, 10_000);
    const N = 2000;
    // Page b publishes straight over a WebSocket of its own, speaking the protocol.
    await b.evaluate(async ({ wsUrl, topic, N }) => {
      const ws = new WebSocket(wsUrl);
      await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
      for (let i = 1; i <= N; i++) ws.send(JSON.stringify({ type: 'publish', topic, data: { text: `bulk ${i}` } }));
      ws.send(JSON.stringify({ type: 'ping', id: 1 }));
      await new Promise((ok) => { ws.onmessage = (e) => { if (JSON.parse(e.data).type === 'pong') ok(); }; });
      ws.close();
    }, { wsUrl: `ws://127.0.0.1:${port}/_ws`, topic, N });
    await a.waitForFunction((n) => document.querySelectorAll('#messages li').length >= n, N, { timeout: 60_000 });
    const seen = await texts(a);
    const want = Array.from({ length: N }, (_, i) => `bulk ${i + 1}`);
    if (JSON.stringify(seen) !== JSON.stringify(want)) {
      const bad = seen.findIndex((t, i) => t !== want[i]);
      throw new Error(`${seen.length} lines; first difference at ${bad}: ${seen[bad]} (wanted ${want[bad]})`);
    }
    await a.fill('#topic-input', 'test');
    await a.click('#join');
    await waitLive(a, 10_000);
  });

  await test('server stopped: both pages show reconnecting', async () => {
    // SIGINT is the server's stop (1001); SIGTERM, a restart, closes with
    // 1012, which the client answers by reconnecting at once instead.
    await stop(server.child, 10_000, 'SIGINT');
    for (const p of pages) await waitState(p, ['reconnecting', 'connecting'], 10_000);
    for (const p of pages) await waitState(p, ['reconnecting'], 10_000);
    const label = await a.textContent('#status-label');
    if (!/Reconnecting in \d+\.\d s/.test(label)) throw new Error(`status label: ${label}`);
    // A graceful shutdown closes with 1001 ("going away"), which the client retries.
    const detail = await a.textContent('#status-detail');
    if (!detail.includes('close code 1001')) throw new Error(`status detail: ${detail}`);
    await a.screenshot({ path: path.join(OUT, 'demo-reconnecting.png') });
  });

  await test('server restarted on the same port: both pages open again, resubscribed, and a new message flows', async () => {
    server = await startServer(port);
    // Backoff is capped at 20 s; allow for one full retry after the restart.
    for (const p of pages) await waitState(p, ['open'], 30_000);
    for (const p of pages) await waitLive(p, 10_000);
    await publish(b, `after restart ${tag}`);
    await waitText(a, `after restart ${tag}`, 10_000);
    await publish(a, `a is back ${tag}`);
    await waitText(b, `a is back ${tag}`, 10_000);
  });

  await test('cut connection: messages published meanwhile are recovered after reconnecting, none twice', async () => {
    const { child: proxy, match } = await startProcess(
      'node', [path.join(here, 'proxy.mjs'), '--target', `127.0.0.1:${port}`],
      /\{"proxy":(\d+),"control":(\d+)\}/, 10_000, 'e2e-proxy');
    const control = async (p) => {
      const res = await fetch(`http://127.0.0.1:${match[2]}${p}`);
      if (!res.ok) throw new Error(`proxy ${p}: ${res.status}`);
    };
    const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
    const c = await context.newPage();
    await c.goto(`http://127.0.0.1:${match[1]}/`, { timeout: 20_000 });
    await waitState(c, ['open'], 20_000);
    await waitLive(c, 10_000);
    await publish(b, `before cut ${tag}`);
    await waitText(c, `before cut ${tag}`, 10_000);
    await control('/block');
    await control('/cut');
    await waitState(c, ['reconnecting', 'connecting'], 10_000);
    const missed = [1, 2, 3].map((i) => `missed ${i} ${tag}`);
    for (const m of missed) await publish(b, m);
    await control('/unblock');
    await waitState(c, ['open'], 30_000);
    for (const m of missed) await waitText(c, m, 10_000);
    await a.waitForTimeout(300); // room for duplicates to show up, if any
    const seen = await texts(c);
    for (const m of [...missed, `before cut ${tag}`]) {
      const count = seen.filter((t) => t === m).length;
      if (count !== 1) throw new Error(`"${m}" shown ${count} times: ${JSON.stringify(seen)}`);
    }
    const topicState = await c.getAttribute('#topic-status', 'data-state');
    if (topicState !== 'live') throw new Error(`topic status ${topicState}: ${await c.textContent('#topic-status')}`);
    await context.close();
    await stop(proxy);
  });

  await test('node killed: the page moves to another node of the cluster and shows every message published meanwhile', async () => {
    const redis = await startRedis();
    const cluster = ['--redis', redis.url, '--presence-ttl-ms', '1500'];
    const nodeA = await startServer(0, cluster);
    const nodeB = await startServer(0, cluster);
    const { child: proxy, match } = await startProcess(
      'node', [path.join(here, 'proxy.mjs'), '--target', `127.0.0.1:${nodeA.port}`],
      /\{"proxy":(\d+),"control":(\d+)\}/, 10_000, 'e2e-failover-proxy');
    const control = async (p) => {
      const res = await fetch(`http://127.0.0.1:${match[2]}${p}`);
      if (!res.ok) throw new Error(`proxy ${p}: ${res.status}`);
    };
    const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
    const d = await context.newPage();
    await d.goto(`http://127.0.0.1:${match[1]}/`, { timeout: 20_000 });
    await waitState(d, ['open'], 20_000);
    await waitLive(d, 10_000);
    // Publishes straight to node B over a WebSocket of the page's own, so the
    // page's messages cross from B to A through Redis.
    const publishViaB = (texts) => d.evaluate(async ({ wsUrl, texts }) => {
      const ws = new WebSocket(wsUrl);
      await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
      const acked = new Promise((ok, fail) => {
        let left = texts.length;
        ws.onmessage = (e) => {
          const f = JSON.parse(e.data);
          if (f.type === 'error') fail(new Error(`publish refused: ${e.data}`));
          if (f.type === 'ack' && --left === 0) ok();
        };
      });
      texts.forEach((text, i) => ws.send(JSON.stringify({ type: 'publish', topic: 'test', data: { text }, ack: i + 1 })));
      await acked;
      ws.close();
    }, { wsUrl: `ws://127.0.0.1:${nodeB.port}/_ws`, texts });
    await publishViaB([`before failover ${tag}`]);
    await waitText(d, `before failover ${tag}`, 10_000);
    // Held off until the proxy points at B: the page must miss what follows.
    await control('/block');
    nodeA.child.kill('SIGKILL');
    await waitState(d, ['reconnecting', 'connecting'], 10_000);
    const missed = [1, 2, 3].map((i) => `during failover ${i} ${tag}`);
    await publishViaB(missed);
    await control(`/upstream?target=127.0.0.1:${nodeB.port}`);
    await control('/unblock');
    await waitState(d, ['open'], 30_000);
    for (const m of missed) await waitText(d, m, 10_000);
    await publishViaB([`after failover ${tag}`]);
    await waitText(d, `after failover ${tag}`, 10_000);
    const seen = await texts(d);
    for (const m of [`before failover ${tag}`, ...missed, `after failover ${tag}`]) {
      const count = seen.filter((t) => t === m).length;
      if (count !== 1) throw new Error(`"${m}" shown ${count} times: ${JSON.stringify(seen)}`);
    }
    const topicState = await d.getAttribute('#topic-status', 'data-state');
    if (topicState !== 'live') throw new Error(`topic status ${topicState}: ${await d.textContent('#topic-status')}`);
    await d.screenshot({ path: path.join(OUT, 'demo-failover.png') });
    await context.close();
    await stop(proxy);
    await stop(nodeB.child);
    await stop(redis.child);
  });

  await a.screenshot({ path: path.join(OUT, 'demo.png') });
  console.log(`# screenshot: ${path.join(OUT, 'demo.png')}`);
  await stop(server.child);

  // Token auth, when this server build has it (--jwt-secret).
  const help = execFileSync(SERVER, ['--help']).toString();
  if (!help.includes('--jwt-secret')) {
    console.log('# skipped: token auth (the server has no --jwt-secret)');
    return;
  }
  await test('token auth: a refused token shows Unauthorized with a slow retry; a valid one connects', async () => {
    const secret = 'crosswire-e2e-test-secret'; // the server wants at least 16 bytes
    const auth = await startServer(0, ['--jwt-secret', secret]);
    const exp = Math.floor(Date.now() / 1000) + 600;
    // Topic claims: a token without them may use no topic (the demo joins `test`).
    const good = jwt({ sub: 'alice', exp, subscribe: ['test'], publish: ['test'] }, secret);
    const bad = jwt({ sub: 'mallory', exp }, 'not-the-secret');
    const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
    const p = await context.newPage();
    await p.goto(`http://127.0.0.1:${auth.port}/?token=${bad}`, { timeout: 20_000 });
    await waitState(p, ['unauthorized'], 20_000);
    const detail = await p.textContent('#status-detail');
    const m = detail.match(/retrying in (\d+)\.\d s/);
    // Jittered over the upper half of the maximum backoff (10–20 s), never a fast loop.
    if (!m || Number(m[1]) < 9) throw new Error(`expected a slow, jittered retry (10–20 s): "${detail}"`);
    await p.screenshot({ path: path.join(OUT, 'demo-unauthorized.png') });
    await p.goto(`http://127.0.0.1:${auth.port}/?token=${good}`, { timeout: 20_000 });
    await waitState(p, ['open'], 20_000);
    await waitLive(p, 10_000);
    await p.waitForFunction(() => [...document.querySelectorAll('#presence li')].some((e) => e.textContent.includes('alice')),
      null, { timeout: 10_000 });
    await context.close();
    await stop(auth.child);
  });
}

const overall = setTimeout(() => { console.log('not ok - the e2e test ran over 360 s'); cleanup().then(() => process.exit(1)); }, 360_000);
main()
  .catch((e) => { if (!String(e).startsWith("Error: not ok")) console.log(`# stopped: ${e && e.message}`); })
  .finally(async () => {
    clearTimeout(overall);
    await cleanup();
    console.log(`# e2e: ${n - failures} passed, ${failures} failed`);
    process.exit(failures === 0 && n > 0 ? 0 : 1);
  });
