//! The connection's decision logic as a pure state machine.
//!
//! [`Session::handle`] takes an [`Input`] (something that happened: the socket
//! opened, a frame arrived, the app published, time passed) together with the
//! current time, and returns the [`Command`]s the binding must carry out (open
//! a socket, send a frame, tell the app). It never reads a clock, never sleeps
//! and never touches the browser, so native tests drive it with fake time and
//! a fake random source. The browser binding calls [`Session::handle`] with
//! [`Input::Tick`] at [`Session::next_deadline`].

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crosswire_shared::{close_code, ClientFrame, ErrorCode, PresenceEntry, RawValue, ServerFrame, Since, Topic};

use crate::{Backoff, ClientError, Config, Event, Message, Millis, OfflineQueue, Status, TopicStatus};

/// Something that happened, fed to [`Session::handle`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Input {
    /// Start connecting (once; later calls do nothing).
    Start,
    /// The socket opened.
    Opened,
    /// The socket closed (or failed to open) with this close code and reason.
    Closed {
        /// The close code (1006 when the browser saw no close frame).
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// A text frame arrived.
    Frame(String),
    /// Time passed: check deadlines.
    Tick,
    /// The HTTP status the handshake probe got, `None` if it failed.
    Probed(Option<u16>),
    /// The app wants a topic (reference counted).
    Subscribe {
        /// The topic.
        topic: Topic,
        /// Whether this subscriber watches presence.
        presence: bool,
    },
    /// The app no longer wants a topic (one reference less).
    Unsubscribe {
        /// The topic.
        topic: Topic,
        /// Whether this subscriber watched presence.
        presence: bool,
    },
    /// The app publishes; queued while the connection is not open.
    Publish {
        /// The topic.
        topic: Topic,
        /// The payload.
        data: Box<RawValue>,
        /// An ack id from [`Session::next_id`], to get an [`Event::Ack`].
        ack: Option<u64>,
    },
    /// The app closes the connection for good.
    Close,
    /// The app asks to reconnect now (also after a policy close).
    Reconnect,
    /// The browser went back online.
    Online,
    /// The page was hidden or shown.
    Visibility {
        /// Whether the page is hidden now.
        hidden: bool,
    },
}

/// What the binding must do, returned by [`Session::handle`] in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Command {
    /// Open a new socket; first ask the token refresher for a fresh token if
    /// `refresh_token` (every connect except the very first).
    Connect {
        /// Whether to refresh the token first.
        refresh_token: bool,
    },
    /// Send a text frame on the open socket.
    Send(String),
    /// Close the current socket and forget it: its later events must not be
    /// fed back (the session already counts it as gone).
    CloseSocket {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// `fetch` the `http(s)` form of the URL and feed back [`Input::Probed`].
    Probe,
    /// Tell the app.
    Notify(Event),
}

struct Queued {
    topic: Topic,
    data: Box<RawValue>,
    ack: Option<u64>,
}

struct TopicEntry {
    refs: u32,
    presence_refs: u32,
    epoch: Option<String>,
    last_seq: Option<u64>,
    /// Seqs of this client's own acknowledged publishes beyond `last_seq`: the
    /// server does not echo them live, but a replay would.
    own_seqs: BTreeSet<u64>,
    sent_since: Option<Since>,
    awaiting_subscribed: bool,
    status: TopicStatus,
    presence: Option<Vec<PresenceEntry>>,
}

impl TopicEntry {
    fn new() -> Self {
        Self {
            refs: 0,
            presence_refs: 0,
            epoch: None,
            last_seq: None,
            own_seqs: BTreeSet::new(),
            sent_since: None,
            awaiting_subscribed: false,
            status: TopicStatus::Subscribing,
            presence: None,
        }
    }

    fn since(&self) -> Option<Since> {
        Some(Since { epoch: self.epoch.clone()?, seq: self.last_seq? })
    }

    fn advance(&mut self, seq: u64) {
        self.last_seq = Some(seq);
        self.own_seqs = self.own_seqs.split_off(&(seq + 1));
    }
}

#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    interval: u64,
    next_ping: Millis,
    awaiting: Option<(u64, Millis)>,
}

#[derive(Debug, Clone, Copy)]
enum Conn {
    Idle,
    /// A socket was requested and has not opened.
    Connecting {
        deadline: Millis,
    },
    /// The socket opened; `welcome` has not arrived.
    Open {
        deadline: Millis,
    },
    /// Welcomed: frames flow.
    Ready {
        heartbeat: Option<Heartbeat>,
    },
    /// The handshake failed before opening; waiting for the HTTP probe.
    Probing {
        deadline: Millis,
    },
    /// A retry is scheduled.
    Waiting {
        retry_at: Millis,
        auth: bool,
    },
    /// No automatic retry.
    Closed,
}

/// The connection state machine. See the [module docs](self).
pub struct Session {
    config: Config,
    random: Box<dyn FnMut() -> f64>,
    conn: Conn,
    backoff: Backoff,
    topics: BTreeMap<Topic, TopicEntry>,
    queue: OfflineQueue<Queued>,
    inflight: BTreeMap<u64, (Topic, Millis)>,
    next_id: u64,
    status: Status,
    hidden: bool,
    closed_by_app: bool,
    connects: u64,
    out: Vec<Command>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("status", &self.status)
            .field("conn", &self.conn)
            .field("topics", &self.topics.keys().collect::<Vec<_>>())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// The reason sent when the client closes a socket itself.
const CLIENT_CLOSE: u16 = 1000;

impl Session {
    /// A session that has not started; `random` returns numbers in `[0, 1)`
    /// for the backoff jitter (`Math.random` in the browser).
    pub fn new(config: Config, random: Box<dyn FnMut() -> f64>) -> Self {
        Self {
            backoff: Backoff::new(config.backoff),
            queue: OfflineQueue::new(config.queue_capacity),
            config,
            random,
            conn: Conn::Idle,
            topics: BTreeMap::new(),
            inflight: BTreeMap::new(),
            next_id: 1,
            status: Status::Connecting { attempt: 0 },
            hidden: false,
            closed_by_app: false,
            connects: 0,
            out: Vec::new(),
        }
    }

    /// The current connection status.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// A subscribed topic's state.
    pub fn topic_status(&self, topic: &Topic) -> Option<&TopicStatus> {
        self.topics.get(topic).map(|e| &e.status)
    }

    /// The last known subscribers of a topic watched with presence.
    pub fn presence(&self, topic: &Topic) -> Option<&[PresenceEntry]> {
        self.topics.get(topic)?.presence.as_deref()
    }

    /// Where this client is in a topic: what a resubscribe sends as `since`.
    pub fn since(&self, topic: &Topic) -> Option<Since> {
        self.topics.get(topic)?.since()
    }

    /// How many publishes wait in the offline queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A fresh id, for [`Input::Publish`]'s `ack`.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// When the binding must next feed [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        let conn = match self.conn {
            Conn::Connecting { deadline } | Conn::Open { deadline } | Conn::Probing { deadline } => Some(deadline),
            Conn::Ready { heartbeat: Some(hb) } => Some(hb.awaiting.map_or(hb.next_ping, |(_, at)| at)),
            Conn::Waiting { retry_at, .. } if !self.paused() => Some(retry_at),
            _ => None,
        };
        let acks = self.inflight.values().map(|(_, at)| *at).min();
        match (conn, acks) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes one input at time `now` and returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Millis) -> Vec<Command> {
        match input {
            Input::Start => {
                if matches!(self.conn, Conn::Idle) {
                    self.connect(now);
                }
            }
            Input::Opened => {
                if let Conn::Connecting { deadline } = self.conn {
                    self.conn = Conn::Open { deadline };
                }
            }
            Input::Closed { code, reason } => match self.conn {
                Conn::Connecting { .. } => self.lost(now, Some(code), reason, true),
                Conn::Open { .. } | Conn::Ready { .. } => self.lost(now, Some(code), reason, false),
                _ => {}
            },
            Input::Frame(text) => {
                if matches!(self.conn, Conn::Open { .. } | Conn::Ready { .. }) {
                    self.frame(&text, now);
                }
            }
            Input::Tick => self.tick(now),
            Input::Probed(code) => {
                if matches!(self.conn, Conn::Probing { .. }) {
                    self.after_probe(code, now);
                }
            }
            Input::Subscribe { topic, presence } => self.subscribe(topic, presence),
            Input::Unsubscribe { topic, presence } => self.unsubscribe(topic, presence),
            Input::Publish { topic, data, ack } => self.publish(topic, data, ack, now),
            Input::Close => self.close(),
            Input::Reconnect => {
                self.close_socket(CLIENT_CLOSE, "reconnecting", ClientError::Disconnected);
                self.closed_by_app = false;
                self.backoff.reset();
                self.connect(now);
            }
            Input::Online => {
                if matches!(self.conn, Conn::Waiting { auth: false, .. }) {
                    self.connect(now);
                }
            }
            Input::Visibility { hidden } => {
                self.hidden = hidden;
                if !hidden && self.config.pause_when_hidden && matches!(self.conn, Conn::Waiting { auth: false, .. }) {
                    self.connect(now);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    fn paused(&self) -> bool {
        self.hidden && self.config.pause_when_hidden
    }

    fn is_ready(&self) -> bool {
        matches!(self.conn, Conn::Ready { .. })
    }

    fn notify(&mut self, event: Event) {
        self.out.push(Command::Notify(event));
    }

    fn send(&mut self, frame: &ClientFrame) {
        self.out.push(Command::Send(frame.encode()));
    }

    fn set_status(&mut self, status: Status) {
        if self.status != status {
            self.status = status.clone();
            self.notify(Event::Status(status));
        }
    }

    fn set_topic_status(&mut self, topic: &Topic, status: TopicStatus) {
        let Some(entry) = self.topics.get_mut(topic) else { return };
        if entry.status != status {
            entry.status = status.clone();
            self.notify(Event::Topic { topic: topic.clone(), status });
        }
    }

    fn connect(&mut self, now: Millis) {
        let refresh_token = self.connects > 0;
        self.connects += 1;
        self.conn = Conn::Connecting { deadline: now + self.config.connect_timeout_ms };
        self.out.push(Command::Connect { refresh_token });
        self.set_status(Status::Connecting { attempt: self.backoff.attempt() });
    }

    /// Closes the socket if there is one and fails what depended on it.
    fn close_socket(&mut self, code: u16, reason: &str, error: ClientError) {
        if matches!(self.conn, Conn::Connecting { .. } | Conn::Open { .. } | Conn::Ready { .. }) {
            self.out.push(Command::CloseSocket { code, reason: reason.to_owned() });
            self.connection_gone(error);
        }
    }

    /// Forgets the per-connection state: in-flight acks fail with `error`,
    /// topics wait for the next resubscribe.
    fn connection_gone(&mut self, error: ClientError) {
        for (id, _) in std::mem::take(&mut self.inflight) {
            self.notify(Event::Ack { id, result: Err(error.clone()) });
        }
        let topics: Vec<Topic> = self.topics.keys().cloned().collect();
        for topic in topics {
            let Some(e) = self.topics.get_mut(&topic) else { continue };
            e.awaiting_subscribed = false;
            e.sent_since = None;
            // Who is there is unknown until the next snapshot.
            if e.presence.take().is_some_and(|peers| !peers.is_empty()) {
                self.notify(Event::Presence { topic: topic.clone(), peers: Vec::new() });
            }
            self.set_topic_status(&topic, TopicStatus::Subscribing);
        }
    }

    /// The connection ended without the app asking. `before_open`: it never
    /// opened, so the HTTP status of the refused handshake is worth a probe.
    fn lost(&mut self, now: Millis, code: Option<u16>, reason: String, before_open: bool) {
        self.connection_gone(ClientError::Disconnected);
        self.backoff.closed(now);
        match code {
            Some(c) if c == 1008 || (4000..5000).contains(&c) => {
                self.conn = Conn::Closed;
                self.set_status(match c {
                    close_code::UNAUTHORIZED => Status::Unauthorized { retry_at: None },
                    close_code::FORBIDDEN => Status::Forbidden { retry_at: None },
                    _ => Status::Closed { code: Some(c), reason },
                });
            }
            _ if before_open => {
                self.conn = Conn::Probing { deadline: now + self.config.connect_timeout_ms };
                self.out.push(Command::Probe);
            }
            _ => self.schedule_retry(now, code),
        }
    }

    fn schedule_retry(&mut self, now: Millis, code: Option<u16>) {
        let (attempt, delay) = self.backoff.next_delay((self.random)());
        let retry_at = now + delay;
        self.conn = Conn::Waiting { retry_at, auth: false };
        self.set_status(Status::Reconnecting { attempt, retry_at, code });
    }

    fn after_probe(&mut self, http_status: Option<u16>, now: Millis) {
        let retry_at = now + self.backoff.config().max_ms;
        match http_status {
            Some(401) => {
                self.conn = Conn::Waiting { retry_at, auth: true };
                self.set_status(Status::Unauthorized { retry_at: Some(retry_at) });
            }
            Some(403) => {
                self.conn = Conn::Waiting { retry_at, auth: true };
                self.set_status(Status::Forbidden { retry_at: Some(retry_at) });
            }
            _ => self.schedule_retry(now, Some(1006)),
        }
    }

    fn tick(&mut self, now: Millis) {
        match self.conn {
            Conn::Connecting { deadline } | Conn::Open { deadline } if now >= deadline => {
                self.out.push(Command::CloseSocket { code: CLIENT_CLOSE, reason: "connect timeout".into() });
                self.lost(now, None, String::new(), false);
            }
            Conn::Ready { heartbeat: Some(mut hb) } => {
                if hb.awaiting.is_some_and(|(_, at)| now >= at) {
                    let code = close_code::HEARTBEAT_TIMEOUT;
                    self.out.push(Command::CloseSocket { code, reason: "no pong from the server".into() });
                    self.lost(now, Some(code), String::new(), false);
                } else if hb.awaiting.is_none() && now >= hb.next_ping {
                    let id = self.next_id();
                    self.send(&ClientFrame::Ping { id: Some(id) });
                    hb.awaiting = Some((id, now + self.config.pong_timeout_ms));
                    hb.next_ping = now + hb.interval;
                    self.conn = Conn::Ready { heartbeat: Some(hb) };
                }
            }
            Conn::Probing { deadline } if now >= deadline => self.after_probe(None, now),
            Conn::Waiting { retry_at, .. } if now >= retry_at && !self.paused() => self.connect(now),
            _ => {}
        }
        let expired: Vec<u64> = self.inflight.iter().filter(|(_, (_, at))| now >= *at).map(|(id, _)| *id).collect();
        for id in expired {
            self.inflight.remove(&id);
            let result = Err(ClientError::AckTimeout(self.config.ack_timeout_ms));
            self.notify(Event::Ack { id, result });
        }
    }

    fn subscribe(&mut self, topic: Topic, presence: bool) {
        let entry = self.topics.entry(topic.clone()).or_insert_with(TopicEntry::new);
        entry.refs += 1;
        let first = entry.refs == 1;
        let presence_new = presence && {
            entry.presence_refs += 1;
            entry.presence_refs == 1
        };
        if first {
            self.notify(Event::Topic { topic: topic.clone(), status: TopicStatus::Subscribing });
        }
        if self.is_ready() && (first || presence_new) {
            self.send_subscribe(&topic);
        }
    }

    fn send_subscribe(&mut self, topic: &Topic) {
        let Some(entry) = self.topics.get_mut(topic) else { return };
        // After a reconnect, say where we left off; a live topic that only
        // gains presence re-subscribes without `since`.
        let since = if entry.status.is_live() { None } else { entry.since() };
        entry.sent_since = since.clone();
        entry.awaiting_subscribed = true;
        let presence = entry.presence_refs > 0;
        self.send(&ClientFrame::Subscribe { topic: topic.clone(), since, presence });
    }

    fn unsubscribe(&mut self, topic: Topic, presence: bool) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        entry.refs = entry.refs.saturating_sub(1);
        if presence {
            entry.presence_refs = entry.presence_refs.saturating_sub(1);
        }
        if entry.refs == 0 {
            self.topics.remove(&topic);
            if self.is_ready() {
                self.send(&ClientFrame::Unsubscribe { topic });
            }
        }
    }

    fn publish(&mut self, topic: Topic, data: Box<RawValue>, ack: Option<u64>, now: Millis) {
        if self.is_ready() {
            self.send(&ClientFrame::Publish { topic: topic.clone(), data, ack });
            if let Some(id) = ack {
                self.inflight.insert(id, (topic, now + self.config.ack_timeout_ms));
            }
        } else if self.closed_by_app {
            if let Some(id) = ack {
                self.notify(Event::Ack { id, result: Err(ClientError::Closed) });
            }
            self.notify(Event::Error(ClientError::Closed));
        } else if let Some(dropped) = self.queue.push(Queued { topic, data, ack }) {
            let error = ClientError::QueueOverflow { topic: dropped.topic };
            if let Some(id) = dropped.ack {
                self.notify(Event::Ack { id, result: Err(error.clone()) });
            }
            self.notify(Event::Error(error));
        }
    }

    fn close(&mut self) {
        self.close_socket(CLIENT_CLOSE, "closed by the app", ClientError::Closed);
        for queued in self.queue.drain() {
            if let Some(id) = queued.ack {
                self.notify(Event::Ack { id, result: Err(ClientError::Closed) });
            }
        }
        self.conn = Conn::Closed;
        self.closed_by_app = true;
        self.set_status(Status::Closed { code: Some(CLIENT_CLOSE), reason: "closed by the app".into() });
    }

    fn frame(&mut self, text: &str, now: Millis) {
        let frame = match ServerFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => return self.notify(Event::Error(ClientError::Protocol(e.to_string()))),
        };
        match frame {
            ServerFrame::Welcome { peer, heartbeat_ms, .. } => {
                if !matches!(self.conn, Conn::Open { .. }) {
                    return;
                }
                let interval = self.config.heartbeat_ms.unwrap_or(heartbeat_ms);
                let heartbeat =
                    (interval > 0).then_some(Heartbeat { interval, next_ping: now + interval, awaiting: None });
                self.conn = Conn::Ready { heartbeat };
                self.backoff.opened(now);
                self.set_status(Status::Open { peer });
                let topics: Vec<Topic> = self.topics.keys().cloned().collect();
                for topic in &topics {
                    self.send_subscribe(topic);
                }
                for queued in self.queue.drain() {
                    self.publish(queued.topic, queued.data, queued.ack, now);
                }
            }
            ServerFrame::Subscribed { topic, epoch, seq, recovered } => self.subscribed(topic, epoch, seq, recovered),
            ServerFrame::Message { topic, seq, from, data } => {
                let Some(entry) = self.topics.get_mut(&topic) else { return };
                if entry.last_seq.is_some_and(|last| seq <= last) {
                    return; // a duplicate
                }
                let own = entry.own_seqs.contains(&seq);
                entry.advance(seq);
                if !own {
                    self.notify(Event::Message(Message { topic, seq, from, data: Rc::from(data) }));
                }
            }
            ServerFrame::Ack { ack, seq } => {
                let Some((topic, _)) = self.inflight.remove(&ack) else { return };
                if let Some(entry) = self.topics.get_mut(&topic) {
                    if entry.last_seq.is_some_and(|last| seq > last) {
                        entry.own_seqs.insert(seq);
                    }
                }
                self.notify(Event::Ack { id: ack, result: Ok(seq) });
            }
            ServerFrame::Pong { id } => {
                if let Conn::Ready { heartbeat: Some(mut hb) } = self.conn {
                    if hb.awaiting.is_some_and(|(want, _)| id.is_none_or(|id| id == want)) {
                        hb.awaiting = None;
                        self.conn = Conn::Ready { heartbeat: Some(hb) };
                    }
                }
            }
            ServerFrame::Error { code, message, ack, topic } => {
                let error = ClientError::Server { code, message, topic: topic.clone() };
                if let Some(id) = ack {
                    if self.inflight.remove(&id).is_some() {
                        return self.notify(Event::Ack { id, result: Err(error) });
                    }
                }
                let about_subscribe = !matches!(code, ErrorCode::RateLimited | ErrorCode::TooLarge);
                if let Some(topic) = &topic {
                    if let Some(entry) = self.topics.get_mut(topic) {
                        if entry.awaiting_subscribed && about_subscribe {
                            entry.awaiting_subscribed = false;
                            entry.sent_since = None;
                            self.set_topic_status(topic, TopicStatus::Refused(error.clone()));
                        }
                    }
                }
                self.notify(Event::Error(error));
            }
            ServerFrame::Presence { topic, peers, .. } => {
                let Some(entry) = self.topics.get_mut(&topic) else { return };
                entry.presence = Some(peers.clone());
                self.notify(Event::Presence { topic, peers });
            }
            ServerFrame::Join { topic, who } => {
                let Some(entry) = self.topics.get_mut(&topic) else { return };
                let Some(peers) = &mut entry.presence else { return };
                if !peers.iter().any(|p| p.peer == who.peer) {
                    peers.push(who);
                    let peers = peers.clone();
                    self.notify(Event::Presence { topic, peers });
                }
            }
            ServerFrame::Leave { topic, who } => {
                let Some(entry) = self.topics.get_mut(&topic) else { return };
                let Some(peers) = &mut entry.presence else { return };
                let before = peers.len();
                peers.retain(|p| p.peer != who.peer);
                if peers.len() != before {
                    let peers = peers.clone();
                    self.notify(Event::Presence { topic, peers });
                }
            }
            _ => {}
        }
    }

    fn subscribed(&mut self, topic: Topic, epoch: String, seq: u64, recovered: bool) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        entry.awaiting_subscribed = false;
        let same_epoch = entry.epoch.as_deref() == Some(epoch.as_str());
        if !same_epoch {
            entry.own_seqs.clear(); // a new epoch resets tracking
        }
        let mut gap = None;
        match entry.sent_since.take() {
            Some(since) if recovered && since.epoch == epoch => entry.advance(since.seq),
            Some(since) => {
                // Nothing is lost if everything after `since` was our own.
                let own = entry.own_seqs.range(since.seq + 1..=seq).count() as u64;
                if since.epoch != epoch || seq.saturating_sub(since.seq) > own {
                    gap = Some(since);
                }
                entry.advance(seq);
            }
            None if same_epoch => entry.advance(seq.max(entry.last_seq.unwrap_or(0))),
            None => entry.advance(seq),
        }
        entry.epoch = Some(epoch.clone());
        let presence = entry.presence_refs > 0;
        let status = match gap {
            Some(missed_after) => {
                let error = ClientError::Gap {
                    topic: topic.clone(),
                    epoch: missed_after.epoch.clone(),
                    after_seq: missed_after.seq,
                };
                self.notify(Event::Error(error));
                TopicStatus::Gap { epoch, missed_after }
            }
            None => TopicStatus::Live { epoch, recovered },
        };
        self.set_topic_status(&topic, status);
        if presence {
            let id = self.next_id();
            self.send(&ClientFrame::Presence { topic, id: Some(id) });
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
