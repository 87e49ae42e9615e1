// The `seed` example's handler (server/examples/seed.rs, from the reference
// article) on Bun's built-in uWebSockets pub/sub, for the chat-room scenario
// of scripts/bench.sh: raw text relayed to every other member of room
// "test" (ws.publish excludes the sender, as crossws' peer.publish does).
//
//   bun bench/bun/seed.ts [--port P] [--host H]
//
// Prints `bun listening on http://H:P` on stdout once ready (port 0 picks a free one).

import type { ServerWebSocket } from "bun";

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", process.env.PORT ?? "3002"));
let nextPeer = 0;

const server = Bun.serve<{ id: string }, undefined>({
  hostname: host,
  port,
  fetch(req, server) {
    if (new URL(req.url).pathname !== "/_ws") return new Response("not found\n", { status: 404 });
    const id = (nextPeer++).toString(16).padStart(12, "0");
    if (server.upgrade(req, { data: { id } })) return undefined;
    return new Response("this path speaks WebSocket only\n", { status: 426 });
  },
  websocket: {
    perMessageDeflate: false,
    open(ws: ServerWebSocket<{ id: string }>) {
      ws.publish("test", `User ${ws.data.id} has connected!`);
      ws.send("You have connected successfully!");
      ws.subscribe("test");
    },
    message(ws: ServerWebSocket<{ id: string }>, message: string | Buffer) {
      ws.publish("test", typeof message === "string" ? message : message.toString());
      ws.send("Hello to you!");
    },
    close(ws: ServerWebSocket<{ id: string }>) {
      server.publish("test", `User ${ws.data.id} has disconnected!`);
    },
  },
});

console.log(`bun listening on http://${server.hostname}:${server.port}`);
