// The comparison server for crosswire's benchmark (docs/BENCHMARKS.md): the
// subset of protocol v1 (docs/PROTOCOL.md) that crosswire-bench uses, on Bun's
// built-in uWebSockets pub/sub.
//
//   bun bench/bun/server.ts [--port P] [--host H]
//
// Prints `bun listening on http://H:P` on stdout once ready (port 0 picks a
// free one). Implemented: welcome, subscribe/subscribed (epoch + per-topic
// seq), unsubscribe/unsubscribed, publish -> message to every other
// subscriber (ws.publish excludes the sender, as crosswire does) + ack,
// ping/pong, and error frames for bad input. Not implemented: history and
// recovery (`since`), presence, auth, rate limits. Like crosswire, it validates
// every frame and the topic name; unlike crosswire, which relays `data` as
// the raw bytes it received, it re-serializes the parsed `data` with
// JSON.stringify: plain JavaScript has no way to keep a JSON value's source
// text through JSON.parse.

import type { ServerWebSocket } from "bun";

type Peer = { id: string; topics: Set<string> };
type TopicState = { epoch: string; seq: number; subscribers: number };

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", process.env.PORT ?? "3001"));
const path = "/_ws";
const HEARTBEAT_MS = 25_000;
const MAX_MESSAGE = 64 * 1024;
const TOPIC_RE = /^[A-Za-z0-9_.:\/-]{1,255}$/;

const topics = new Map<string, TopicState>();
let nextPeer = 0;

function randomHex(): string {
  return Math.floor(Math.random() * 2 ** 52)
    .toString(16)
    .padStart(13, "0");
}

function topicState(topic: string): TopicState {
  let state = topics.get(topic);
  if (state === undefined) {
    state = { epoch: randomHex(), seq: 0, subscribers: 0 };
    topics.set(topic, state);
  }
  return state;
}

function leave(topic: string): void {
  const state = topics.get(topic);
  if (state !== undefined && --state.subscribers <= 0) topics.delete(topic);
}

function sendError(
  ws: ServerWebSocket<Peer>,
  code: string,
  message: string,
  ack?: unknown,
  topic?: unknown,
): void {
  const frame: Record<string, unknown> = { type: "error", code, message };
  if (typeof ack === "number") frame.ack = ack;
  if (typeof topic === "string" && TOPIC_RE.test(topic)) frame.topic = topic;
  ws.send(JSON.stringify(frame));
}

const server = Bun.serve<Peer, undefined>({
  hostname: host,
  port,
  fetch(req, server) {
    if (new URL(req.url).pathname !== path) {
      return new Response("not found\n", { status: 404 });
    }
    const id = (nextPeer++).toString(16).padStart(12, "0");
    if (server.upgrade(req, { data: { id, topics: new Set<string>() } })) return undefined;
    return new Response("this path speaks WebSocket only\n", { status: 426 });
  },
  websocket: {
    maxPayloadLength: MAX_MESSAGE,
    perMessageDeflate: false,
    open(ws) {
      ws.send(JSON.stringify({ type: "welcome", peer: ws.data.id, heartbeat_ms: HEARTBEAT_MS, version: 1 }));
    },
    message(ws, raw) {
      if (typeof raw !== "string") {
        return sendError(ws, "bad_request", "binary frames are not part of protocol v1: send JSON text frames");
      }
      let frame: any;
      try {
        frame = JSON.parse(raw);
      } catch (e) {
        return sendError(ws, "bad_request", `invalid JSON: ${e}`);
      }
      if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
        return sendError(ws, "bad_request", "malformed frame: not an object");
      }
      const { type, topic, ack } = frame;
      if (typeof type !== "string") return sendError(ws, "bad_request", 'frame has no "type" field');
      const needsTopic = type === "subscribe" || type === "unsubscribe" || type === "publish";
      if (needsTopic) {
        if (typeof topic !== "string") {
          return sendError(ws, "bad_request", `a ${type} frame needs a "topic" field`, ack);
        }
        if (!TOPIC_RE.test(topic)) {
          return sendError(ws, "invalid_topic", `invalid topic ${JSON.stringify(topic.slice(0, 64))}`, ack);
        }
      }
      switch (type) {
        case "subscribe": {
          const state = topicState(topic);
          if (!ws.data.topics.has(topic)) {
            ws.subscribe(topic);
            ws.data.topics.add(topic);
            state.subscribers++;
          }
          ws.send(
            `{"type":"subscribed","topic":${JSON.stringify(topic)},"epoch":"${state.epoch}","seq":${state.seq},"recovered":false}`,
          );
          return;
        }
        case "unsubscribe": {
          if (ws.data.topics.delete(topic)) {
            ws.unsubscribe(topic);
            leave(topic);
          }
          ws.send(`{"type":"unsubscribed","topic":${JSON.stringify(topic)}}`);
          return;
        }
        case "publish": {
          if (!("data" in frame)) return sendError(ws, "bad_request", 'a publish frame needs a "data" field', ack, topic);
          if (ack !== undefined && (typeof ack !== "number" || !Number.isInteger(ack) || ack < 0)) {
            return sendError(ws, "bad_request", "malformed frame: ack must be an unsigned integer");
          }
          const state = topicState(topic);
          const seq = ++state.seq;
          ws.publish(
            topic,
            `{"type":"message","topic":${JSON.stringify(topic)},"seq":${seq},"from":"${ws.data.id}","data":${JSON.stringify(frame.data)}}`,
          );
          if (ack !== undefined) ws.send(`{"type":"ack","ack":${ack},"seq":${seq}}`);
          return;
        }
        case "ping": {
          ws.send(typeof frame.id === "number" ? `{"type":"pong","id":${frame.id}}` : `{"type":"pong"}`);
          return;
        }
        default:
          return sendError(ws, "bad_request", `unknown frame type ${JSON.stringify(type.slice(0, 64))}`, ack);
      }
    },
    close(ws) {
      // uWebSockets drops the socket's subscriptions itself; forget empty topics.
      for (const topic of ws.data.topics) leave(topic);
    },
  },
});

console.log(`bun listening on http://${server.hostname}:${server.port}`);
