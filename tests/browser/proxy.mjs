// A TCP proxy in front of a crosswire server, with an HTTP control endpoint,
// so browser tests can drop connections from inside the page.
//
//   node tests/browser/proxy.mjs --target 127.0.0.1:3000 [--listen 0] [--control 0]
//
// Prints one JSON line on stdout once both ports listen:
//   {"proxy":PORT,"control":PORT}
// Control endpoint (GET or POST, CORS open, all on 127.0.0.1):
//   /cut      destroy every proxied connection (both directions) -> {"cut":N}
//   /block    refuse new connections (accept, then destroy) until /unblock
//   /unblock  accept again
//   /freeze   stop forwarding on every open connection without closing it
//             (a dead network path: only a heartbeat can notice) -> {"frozen":N}
//   /refuse?status=401
//             answer every new HTTP request (handshakes and probes) with that
//             status (CORS open) instead of forwarding, until /accept
//   /accept   forward again
//   /upstream?target=127.0.0.1:PORT
//             forward new connections there from now on (a load balancer
//             moving to another node; open connections keep theirs)
//             -> {"upstream":"127.0.0.1:PORT"}
//   /requests the request lines seen (newest last), e.g. to check a token
//   /token?sub=U&exp_in=SECS&topics=P
//             an HS256 token signed with --jwt-secret (what an app's token
//             endpoint does), allowed to subscribe and publish to pattern P
//             (default test:*) -> {"token":JWT,"exp":SECS,"issued":N}
//   /status   {"connections":N,"blocked":bool,"refusing":N|null,"accepted":N,"cuts":N,"upstream":"HOST:PORT"}
// Everything binds 127.0.0.1 only.
import net from 'node:net';
import http from 'node:http';
import crypto from 'node:crypto';

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

function hostPort(t) {
  const i = t.lastIndexOf(':');
  return [t.slice(0, i), Number(t.slice(i + 1))];
}
// Where new connections go; /upstream changes it.
let [targetHost, targetPort] = hostPort(arg('target', '127.0.0.1:3000'));
const listenPort = Number(arg('listen', '0'));
const jwtSecret = arg('jwt-secret', '');
let issued = 0;

function token(sub, expIn, topics) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const exp = Math.floor(Date.now() / 1000) + expIn;
  const body = b({ alg: 'HS256', typ: 'JWT' }) + '.' + b({ sub, exp, subscribe: [topics], publish: [topics] });
  issued += 1;
  return { token: body + '.' + crypto.createHmac('sha256', jwtSecret).update(body).digest('base64url'), exp, issued };
}
const controlPort = Number(arg('control', '0'));

const pairs = new Set();
const requests = [];
let refusing = null;
let blocked = false;
let accepted = 0;
let cuts = 0;

const proxy = net.createServer((client) => {
  if (blocked) {
    client.destroy();
    return;
  }
  accepted += 1;
  // Note the request line (the first line of the first chunk) of every connection.
  client.once('data', (chunk) => {
    const line = chunk.toString('latin1').split('\r\n', 1)[0];
    requests.push(line);
    if (requests.length > 200) requests.shift();
  });
  if (refusing !== null) {
    const status = refusing;
    client.once('data', () => {
      client.end(`HTTP/1.1 ${status} Refused by proxy\r\naccess-control-allow-origin: *\r\n` +
        'content-length: 0\r\nconnection: close\r\n\r\n');
    });
    client.on('error', () => {});
    return;
  }
  const upstream = net.connect(targetPort, targetHost);
  const pair = { client, upstream };
  pairs.add(pair);
  const done = () => {
    pairs.delete(pair);
    client.destroy();
    upstream.destroy();
  };
  client.on('error', done).on('close', done);
  upstream.on('error', done).on('close', done);
  client.pipe(upstream);
  upstream.pipe(client);
});

function cut() {
  const n = pairs.size;
  for (const { client, upstream } of pairs) {
    // resetAndDestroy sends RST where available: the browser sees an abrupt
    // drop (close code 1006), like a network failure.
    if (typeof client.resetAndDestroy === 'function') client.resetAndDestroy(); else client.destroy();
    upstream.destroy();
  }
  pairs.clear();
  cuts += 1;
  return n;
}

function freeze() {
  for (const { client, upstream } of pairs) {
    client.unpipe(upstream);
    upstream.unpipe(client);
    // Keep reading so nothing backs up, but forward nothing.
    client.on('data', () => {});
    upstream.on('data', () => {});
  }
  return pairs.size;
}

const control = http.createServer((req, res) => {
  const headers = {
    'content-type': 'application/json',
    'access-control-allow-origin': '*',
    'access-control-allow-methods': 'GET, POST, OPTIONS',
    'access-control-allow-headers': '*',
    'cache-control': 'no-store',
  };
  if (req.method === 'OPTIONS') {
    res.writeHead(204, headers).end();
    return;
  }
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  let body;
  switch (path) {
    case '/cut': body = { cut: cut() }; break;
    case '/freeze': body = { frozen: freeze() }; break;
    case '/block': blocked = true; body = { blocked }; break;
    case '/unblock': blocked = false; body = { blocked }; break;
    case '/refuse': refusing = Number(url.searchParams.get('status') || 401); body = { refusing }; break;
    case '/accept': refusing = null; body = { refusing }; break;
    case '/upstream': {
      const [host, port] = hostPort(url.searchParams.get('target') || '');
      // Loopback only, like everything else here.
      if (host !== '127.0.0.1' || !(port > 0 && port < 65536)) {
        res.writeHead(400, headers).end(JSON.stringify({ error: 'target must be 127.0.0.1:PORT' }));
        return;
      }
      [targetHost, targetPort] = [host, port];
      body = { upstream: `${host}:${port}` };
      break;
    }
    case '/requests': body = { requests }; break;
    case '/status': body = { connections: pairs.size, blocked, refusing, accepted, cuts, issued, upstream: `${targetHost}:${targetPort}` }; break;
    case '/token':
      if (!jwtSecret) {
        res.writeHead(501, headers).end(JSON.stringify({ error: 'started without --jwt-secret' }));
        return;
      }
      body = token(url.searchParams.get('sub') || 'wasm-test', Number(url.searchParams.get('exp_in') || 3600),
        url.searchParams.get('topics') || 'test:*');
      break;
    default:
      res.writeHead(404, headers).end(JSON.stringify({ error: `unknown path ${path}` }));
      return;
  }
  res.writeHead(200, headers).end(JSON.stringify(body));
});

let ready = 0;
const announce = () => {
  ready += 1;
  if (ready === 2) {
    console.log(JSON.stringify({ proxy: proxy.address().port, control: control.address().port }));
  }
};
proxy.listen(listenPort, '127.0.0.1', announce);
control.listen(controlPort, '127.0.0.1', announce);

const stop = () => {
  cut();
  proxy.close();
  control.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
