//! The connection's decision logic as a pure state machine.
//!
//! [`Session::handle`] takes an [`Input`] (something that happened: the socket
//! opened, a frame arrived, the app published, time passed) together with the
//! current time, and returns the [`Command`]s the binding must carry out (open
//! a socket, send a frame, fetch a token, tell the app). It never reads a
//! clock, never sleeps and never touches the browser, so native tests drive it
//! with fake time and a fake random source. The browser binding calls
//! [`Session::handle`] with [`Input::Tick`] at [`Session::next_deadline`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use crosswire_shared::{
    close_code, ClientFrame, ErrorCode, HistoryMessage, PeerId, PresenceEntry, RawValue, ServerFrame, Since, Topic,
    PROTOCOL_VERSION,
};

use crate::{
    token::jwt_exp, Backoff, ClientConfig, ClientError, Event, History, Millis, OfflineQueue, Status, TopicMessage,
    TopicStatus,
};

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
    /// The token refresher answered a [`Command::RefreshToken`].
    TokenRefreshed(Result<String, String>),
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
        /// Once acknowledged, also deliver it locally as an [`Event::Message`]
        /// with `local: true` (needs `ack`).
        echo: bool,
    },
    /// The app asks for a topic's retained messages ([`Event::History`]).
    History {
        /// A request id from [`Session::next_id`].
        id: u64,
        /// The topic.
        topic: Topic,
        /// Only messages after this position.
        since: Option<Since>,
        /// At most this many.
        limit: Option<u32>,
    },
    /// The app closes the connection for good.
    Close,
    /// The app asks to reconnect now (also after a final close).
    Reconnect,
    /// The browser went back online.
    Online,
    /// The browser reported losing the network.
    Offline,
    /// The page was hidden or shown.
    Visibility {
        /// Whether the page is hidden now.
        hidden: bool,
    },
}

/// What the binding must do, returned by [`Session::handle`] in order.
///
/// Not `#[non_exhaustive]`: a binding must carry out every command, so a new
/// one is a breaking change that fails to compile where it is not handled.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Open a new socket with this token (as the `token` query parameter).
    Connect {
        /// The token to connect with.
        token: Option<String>,
    },
    /// Run the token refresher and feed back [`Input::TokenRefreshed`].
    RefreshToken,
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
    echo: bool,
    /// When its ack future fails with a timeout, counted from the publish call.
    deadline: Millis,
}

struct Inflight {
    topic: Topic,
    deadline: Millis,
    /// The payload, kept to deliver locally once acknowledged.
    echo: Option<Rc<RawValue>>,
    /// The session asked for this ack itself, not the app: a publish to a
    /// topic it holds, whose seq it must know (the server never echoes it)
    /// to tell its own seqs from a hole. Its outcome is not the app's event.
    internal: bool,
}

struct HistoryRequest {
    topic: Topic,
    /// Where the next page starts: what the app asked for, then the `next`
    /// of the last page answered.
    since: Option<Since>,
    /// The messages the app asked for (`None`: as many as the server
    /// gives); each page asks for what is still missing.
    limit: Option<u32>,
    /// The pages answered so far, in order.
    collected: Vec<TopicMessage>,
    /// When the request fails unanswered: renewed by each page.
    deadline: Millis,
    /// Sent on the current connection; otherwise sent once welcomed (asking
    /// twice is harmless, so a request lost with a connection is asked again).
    sent: bool,
}

/// One `history` frame, as [`Session::on_history`] takes it.
struct HistoryPage {
    topic: Topic,
    id: Option<u64>,
    epoch: String,
    seq: u64,
    messages: Vec<HistoryMessage>,
    next: Option<u64>,
}

struct TopicEntry {
    refs: u32,
    presence_refs: u32,
    epoch: Option<String>,
    /// The last seq up to which every message was seen (or was our own).
    last_seq: Option<u64>,
    /// Seqs of this client's own acknowledged publishes beyond `last_seq`: the
    /// server does not echo them live, but a replay would.
    own_seqs: BTreeSet<u64>,
    /// The `since` of each `subscribe` sent and not yet answered, in order
    /// (the server answers them in order).
    pending: VecDeque<Option<Since>>,
    /// A seq jumped past a hole: a resubscribe with `since` is under way, and
    /// live messages until its `subscribed` are dropped (the replay has them).
    recovering: bool,
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
            pending: VecDeque::new(),
            recovering: false,
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

    /// The next seq that would not be contiguous: after `last_seq` and our
    /// own acknowledged publishes right after it.
    fn next_expected(&self, last: u64) -> u64 {
        let mut next = last + 1;
        while self.own_seqs.contains(&next) {
            next += 1;
        }
        next
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
    /// Waiting for the token refresher before connecting.
    Refreshing {
        deadline: Millis,
    },
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

/// Where the refresh of the token over the open connection stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum InPlace {
    Idle,
    /// The refresher runs.
    Fetching,
    /// `refresh` sent with this id.
    Sent(u64),
    /// It failed on this connection: the 4001 at expiry will reconnect.
    Failed,
}

/// The connection state machine. See the [module docs](self).
pub struct Session {
    config: ClientConfig,
    random: Box<dyn FnMut() -> f64>,
    conn: Conn,
    backoff: Backoff,
    topics: BTreeMap<Topic, TopicEntry>,
    queue: OfflineQueue<Queued>,
    inflight: BTreeMap<u64, Inflight>,
    history: BTreeMap<u64, HistoryRequest>,
    next_id: u64,
    status: Status,
    hidden: bool,
    /// Why requests fail at once while [`Conn::Closed`].
    ended: Option<ClientError>,
    connects: u64,
    token: Option<String>,
    /// The token's expiry (ms) and when it was obtained.
    token_exp: Option<(Millis, Millis)>,
    in_place: InPlace,
    /// A ping sent because the browser reported a network change, and its deadline.
    suspect: Option<(u64, Millis)>,
    /// When the last 4001 reconnect started: a second one soon after backs off.
    expired_at: Option<Millis>,
    /// When the last 1012 reconnect started: a second one soon after backs off.
    restarted_at: Option<Millis>,
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

/// The window a reconnect after 1012 (service restart) is spread over, in
/// milliseconds: long enough to spread a node's clients over the remaining
/// nodes, short enough that a rolling deploy goes unnoticed.
const RESTART_JITTER_MS: Millis = 1_000;

/// The close code the client sends when it closes a socket itself (normal closure).
const CLIENT_CLOSE: u16 = 1000;

impl Session {
    /// A session that has not started; `random` returns numbers in `[0, 1)`
    /// for the backoff jitter (`Math.random` in the browser).
    pub fn new(config: ClientConfig, random: Box<dyn FnMut() -> f64>) -> Self {
        let mut session = Self {
            backoff: Backoff::new(config.backoff),
            queue: OfflineQueue::new(config.queue_capacity),
            token: None,
            config,
            random,
            conn: Conn::Idle,
            topics: BTreeMap::new(),
            inflight: BTreeMap::new(),
            history: BTreeMap::new(),
            next_id: 1,
            status: Status::Connecting { attempt: 0 },
            hidden: false,
            ended: None,
            connects: 0,
            token_exp: None,
            in_place: InPlace::Idle,
            suspect: None,
            expired_at: None,
            restarted_at: None,
            out: Vec::new(),
        };
        if let Some(token) = session.config.token.clone() {
            session.set_token(token, 0);
        }
        session
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

    /// The current token.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A fresh id, for [`Input::Publish`]'s `ack` and [`Input::History`].
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// When the binding must next feed [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        let conn = match self.conn {
            Conn::Connecting { deadline }
            | Conn::Open { deadline }
            | Conn::Probing { deadline }
            | Conn::Refreshing { deadline } => Some(deadline),
            Conn::Ready { heartbeat } => {
                let hb = heartbeat.map(|hb| hb.awaiting.map_or(hb.next_ping, |(_, at)| at));
                [hb, self.suspect.map(|(_, at)| at), self.refresh_at()].into_iter().flatten().min()
            }
            Conn::Waiting { retry_at, .. } if !self.paused() => Some(retry_at),
            _ => None,
        };
        let acks = self.inflight.values().map(|i| i.deadline);
        let queued = self.queue.iter().filter(|q| q.ack.is_some()).map(|q| q.deadline);
        let history = self.history.values().map(|h| h.deadline);
        conn.into_iter().chain(acks).chain(queued).chain(history).min()
    }

    /// When to refresh the token over the open connection, if that applies.
    fn refresh_at(&self) -> Option<Millis> {
        if !self.config.refresh_in_place || self.config.token_refresher.is_none() || self.in_place != InPlace::Idle {
            return None;
        }
        let (exp, obtained) = self.token_exp?;
        let margin = self.config.refresh_before_ms.min(exp.saturating_sub(obtained) / 2);
        Some(exp.saturating_sub(margin))
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
            Input::TokenRefreshed(result) => self.token_refreshed(result, now),
            Input::Subscribe { topic, presence } => self.subscribe(topic, presence),
            Input::Unsubscribe { topic, presence } => self.unsubscribe(topic, presence),
            Input::Publish { topic, data, ack, echo } => {
                let deadline = now + self.config.ack_timeout_ms;
                self.publish(Queued { topic, data, ack, echo: echo && ack.is_some(), deadline });
            }
            Input::History { id, topic, since, limit } => {
                let deadline = now + self.config.ack_timeout_ms;
                let collected = Vec::new();
                self.history.insert(id, HistoryRequest { topic, since, limit, collected, deadline, sent: false });
                match &self.ended {
                    Some(error) => {
                        let error = error.clone();
                        self.fail_history(error);
                    }
                    None if self.is_ready() => self.send_history(),
                    None => {}
                }
            }
            Input::Close => self.close(),
            Input::Reconnect => {
                self.close_socket(CLIENT_CLOSE, "reconnecting", ClientError::Disconnected);
                self.ended = None;
                self.backoff.reset();
                self.connect(now);
            }
            Input::Online => match self.conn {
                Conn::Waiting { auth: false, .. } => self.connect(now),
                // The connection may have died while the network was away.
                Conn::Ready { .. } => self.suspect(now),
                _ => {}
            },
            Input::Offline => {
                if self.is_ready() {
                    self.suspect(now);
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

    fn set_token(&mut self, token: String, now: Millis) {
        self.token_exp = jwt_exp(&token).map(|exp| (exp.saturating_mul(1000), now));
        self.token = Some(token);
    }

    fn connect(&mut self, now: Millis) {
        let has_refresher = self.config.token_refresher.is_some();
        // Every reconnect gets a fresh token; so does the first connect when
        // the app gave none (instead of a certain 401).
        let refresh = has_refresher && (self.connects > 0 || self.token.is_none());
        self.connects += 1;
        self.in_place = InPlace::Idle;
        if refresh {
            self.conn = Conn::Refreshing { deadline: now + self.config.connect_timeout_ms };
            self.out.push(Command::RefreshToken);
        } else {
            self.open_socket(now);
        }
        self.set_status(Status::Connecting { attempt: self.backoff.attempt() });
    }

    fn open_socket(&mut self, now: Millis) {
        self.conn = Conn::Connecting { deadline: now + self.config.connect_timeout_ms };
        self.out.push(Command::Connect { token: self.token.clone() });
    }

    fn token_refreshed(&mut self, result: Result<String, String>, now: Millis) {
        match (result, self.conn) {
            (Ok(token), Conn::Refreshing { .. }) => {
                self.set_token(token, now);
                self.open_socket(now);
            }
            (Err(e), Conn::Refreshing { .. }) => {
                self.end(Status::Unauthorized { retry_at: None, reason: Some(e.clone()) }, None, e.clone());
                self.notify(Event::Error(ClientError::TokenRefresh(e)));
            }
            (Ok(token), Conn::Ready { .. }) if self.in_place == InPlace::Fetching => {
                self.set_token(token.clone(), now);
                let id = self.next_id();
                self.in_place = InPlace::Sent(id);
                self.send(&ClientFrame::Refresh { token, id: Some(id) });
            }
            (Err(e), Conn::Ready { .. }) if self.in_place == InPlace::Fetching => {
                // The open connection lasts until the old token's expiry; the
                // 4001 then reconnects, which asks the refresher again.
                self.in_place = InPlace::Failed;
                self.notify(Event::Error(ClientError::TokenRefresh(e)));
            }
            // A late answer: a fresh token is still worth keeping.
            (Ok(token), _) => self.set_token(token, now),
            (Err(_), _) => {}
        }
    }

    /// Ends the connection for good: no retry, and everything waiting fails.
    fn end(&mut self, status: Status, code: Option<u16>, reason: String) {
        self.conn = Conn::Closed;
        let error = ClientError::Ended { code, reason };
        self.fail_waiting(error.clone());
        self.ended = Some(error);
        self.set_status(status);
    }

    /// Fails the queued publishes and pending history requests.
    fn fail_waiting(&mut self, error: ClientError) {
        for queued in self.queue.drain() {
            if let Some(id) = queued.ack {
                self.notify(Event::Ack { id, result: Err(error.clone()) });
            }
        }
        self.fail_history(error);
    }

    fn fail_history(&mut self, error: ClientError) {
        for (id, _) in std::mem::take(&mut self.history) {
            self.notify(Event::History { id, result: Err(error.clone()) });
        }
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
        for (id, inflight) in std::mem::take(&mut self.inflight) {
            if !inflight.internal {
                self.notify(Event::Ack { id, result: Err(error.clone()) });
            }
        }
        for request in self.history.values_mut() {
            request.sent = false;
        }
        self.suspect = None;
        self.in_place = InPlace::Idle;
        let topics: Vec<Topic> = self.topics.keys().cloned().collect();
        for topic in topics {
            let Some(e) = self.topics.get_mut(&topic) else { continue };
            e.pending.clear();
            e.recovering = false;
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
            Some(close_code::UNAUTHORIZED) if self.config.token_refresher.is_some() => {
                // The token expired: get a new one and come back at once
                // (jittered, so a crowd of clients whose tokens expired
                // together spreads out), unless this keeps happening.
                let min_uptime = self.backoff.config().min_uptime_ms;
                let again = self.expired_at.is_some_and(|at| now.saturating_sub(at) < min_uptime);
                self.expired_at = Some(now);
                let delay = if !again {
                    (self.backoff.config().min_ms as f64 * (self.random)().clamp(0.0, 1.0)) as u64
                } else {
                    self.backoff.next_delay((self.random)()).1
                };
                let retry_at = now + delay;
                self.conn = Conn::Waiting { retry_at, auth: false };
                self.set_status(Status::Reconnecting { attempt: self.backoff.attempt(), retry_at, code });
            }
            Some(c) if c == 1008 || (4000..5000).contains(&c) => {
                let why = if reason.is_empty() { format!("closed by the server with {c}") } else { reason.clone() };
                let status = match c {
                    close_code::UNAUTHORIZED => Status::Unauthorized { retry_at: None, reason: Some(why.clone()) },
                    close_code::FORBIDDEN => Status::Forbidden { retry_at: None },
                    _ => Status::Closed { code: Some(c), reason },
                };
                self.end(status, Some(c), why);
            }
            Some(close_code::SERVICE_RESTART) => {
                // The node is being replaced in a rolling deploy and the
                // others are up: reconnect at once, jittered so that its
                // whole crowd does not land on them in the same instant. Not
                // an escalating failure, unless restarts keep coming (a node
                // restarting in a loop is backed off from like any failure).
                let min_uptime = self.backoff.config().min_uptime_ms;
                let again = self.restarted_at.is_some_and(|at| now.saturating_sub(at) < min_uptime);
                self.restarted_at = Some(now);
                let delay = if !again {
                    (RESTART_JITTER_MS as f64 * (self.random)().clamp(0.0, 1.0)) as Millis
                } else {
                    self.backoff.next_delay((self.random)()).1
                };
                let retry_at = now + delay;
                self.conn = Conn::Waiting { retry_at, auth: false };
                self.set_status(Status::Reconnecting { attempt: self.backoff.attempt(), retry_at, code });
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
        // Refused credentials are retried slowly, but jittered over the upper
        // half of the maximum backoff so refused clients do not come back in
        // lockstep.
        let max = self.backoff.config().max_ms;
        let retry_at = now + max / 2 + ((max / 2) as f64 * (self.random)().clamp(0.0, 1.0)) as u64;
        match http_status {
            Some(401) => {
                self.conn = Conn::Waiting { retry_at, auth: true };
                let reason = Some("the server refused the token (HTTP 401)".to_owned());
                self.set_status(Status::Unauthorized { retry_at: Some(retry_at), reason });
            }
            Some(403) => {
                self.conn = Conn::Waiting { retry_at, auth: true };
                self.set_status(Status::Forbidden { retry_at: Some(retry_at) });
            }
            _ => self.schedule_retry(now, Some(1006)),
        }
    }

    /// The browser reported a network change: a ping with a short deadline
    /// tells whether the connection survived.
    fn suspect(&mut self, now: Millis) {
        if self.suspect.is_none() {
            let id = self.next_id();
            self.send(&ClientFrame::Ping { id: Some(id) });
            self.suspect = Some((id, now + self.config.offline_ping_timeout_ms));
        }
    }

    fn tick(&mut self, now: Millis) {
        match self.conn {
            Conn::Connecting { deadline } | Conn::Open { deadline } if now >= deadline => {
                self.out.push(Command::CloseSocket { code: CLIENT_CLOSE, reason: "connect timeout".into() });
                self.lost(now, None, String::new(), false);
            }
            Conn::Refreshing { deadline } if now >= deadline => self.schedule_retry(now, None),
            Conn::Ready { heartbeat } => {
                let dead = heartbeat.and_then(|hb| hb.awaiting).is_some_and(|(_, at)| now >= at)
                    || self.suspect.is_some_and(|(_, at)| now >= at);
                if dead {
                    let code = close_code::HEARTBEAT_TIMEOUT;
                    self.out.push(Command::CloseSocket { code, reason: "no pong from the server".into() });
                    self.lost(now, Some(code), String::new(), false);
                } else {
                    if let Some(mut hb) = heartbeat {
                        if hb.awaiting.is_none() && now >= hb.next_ping {
                            let id = self.next_id();
                            self.send(&ClientFrame::Ping { id: Some(id) });
                            hb.awaiting = Some((id, now + self.config.pong_timeout_ms));
                            hb.next_ping = now + hb.interval;
                            self.conn = Conn::Ready { heartbeat: Some(hb) };
                        }
                    }
                    if self.refresh_at().is_some_and(|at| now >= at) {
                        self.in_place = InPlace::Fetching;
                        self.out.push(Command::RefreshToken);
                    }
                }
            }
            Conn::Probing { deadline } if now >= deadline => self.after_probe(None, now),
            Conn::Waiting { retry_at, .. } if now >= retry_at && !self.paused() => self.connect(now),
            _ => {}
        }
        let timeout = ClientError::AckTimeout(self.config.ack_timeout_ms);
        let expired: Vec<u64> = self.inflight.iter().filter(|(_, i)| now >= i.deadline).map(|(id, _)| *id).collect();
        for id in expired {
            if self.inflight.remove(&id).is_some_and(|i| !i.internal) {
                self.notify(Event::Ack { id, result: Err(timeout.clone()) });
            }
        }
        for queued in self.queue.take_if(|q| q.ack.is_some() && now >= q.deadline) {
            if let Some(id) = queued.ack {
                self.notify(Event::Ack { id, result: Err(timeout.clone()) });
            }
        }
        let expired: Vec<u64> = self.history.iter().filter(|(_, h)| now >= h.deadline).map(|(id, _)| *id).collect();
        for id in expired {
            self.history.remove(&id);
            let result = Err(ClientError::RequestTimeout(self.config.ack_timeout_ms));
            self.notify(Event::History { id, result });
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
            self.send_subscribe(&topic, false);
        }
    }

    /// Sends `subscribe` for `topic`. After a reconnect, or with `recover`
    /// (a hole in the seqs), it says where we left off; a live topic that
    /// only changes its presence interest re-subscribes without `since`.
    fn send_subscribe(&mut self, topic: &Topic, recover: bool) {
        let Some(entry) = self.topics.get_mut(topic) else { return };
        let since = if entry.status.is_live() && !recover { None } else { entry.since() };
        entry.pending.push_back(since.clone());
        let presence = entry.presence_refs > 0;
        self.send(&ClientFrame::Subscribe { topic: topic.clone(), since, presence });
    }

    fn unsubscribe(&mut self, topic: Topic, presence: bool) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        entry.refs = entry.refs.saturating_sub(1);
        let presence_gone = presence && entry.presence_refs > 0 && {
            entry.presence_refs -= 1;
            entry.presence_refs == 0
        };
        if entry.refs == 0 {
            self.topics.remove(&topic);
            if self.is_ready() {
                self.send(&ClientFrame::Unsubscribe { topic });
            }
        } else if presence_gone {
            // Nobody watches presence any more: subscribing again without it
            // stops the server's join/leave events for this topic.
            entry.presence = None;
            if self.is_ready() {
                self.send_subscribe(&topic, false);
            }
        }
    }

    fn publish(&mut self, queued: Queued) {
        if let Some(error) = &self.ended {
            let error = error.clone();
            if let Some(id) = queued.ack {
                self.notify(Event::Ack { id, result: Err(error.clone()) });
            }
            return self.notify(Event::Error(error));
        }
        if !self.is_ready() {
            if let Some(dropped) = self.queue.push(queued) {
                let error = ClientError::QueueOverflow { topic: dropped.topic };
                if let Some(id) = dropped.ack {
                    self.notify(Event::Ack { id, result: Err(error.clone()) });
                }
                self.notify(Event::Error(error));
            }
            return;
        }
        let Queued { topic, data, ack, echo, deadline } = queued;
        let echo = echo.then(|| Rc::<RawValue>::from(data.clone()));
        // Without an ack the seq of our own publish would be unknown, and the
        // next message would look like a hole and cost a resubscribe.
        let internal = ack.is_none() && self.topics.contains_key(&topic);
        let ack = ack.or_else(|| internal.then(|| self.next_id()));
        self.send(&ClientFrame::Publish { topic: topic.clone(), data, ack });
        if let Some(id) = ack {
            self.inflight.insert(id, Inflight { topic, deadline, echo, internal });
        }
    }

    fn send_history(&mut self) {
        let unsent: Vec<u64> = self.history.iter().filter(|(_, h)| !h.sent).map(|(id, _)| *id).collect();
        for id in unsent {
            let Some(h) = self.history.get_mut(&id) else { continue };
            h.sent = true;
            let got = u32::try_from(h.collected.len()).unwrap_or(u32::MAX);
            let limit = h.limit.map(|limit| limit.saturating_sub(got));
            let frame = ClientFrame::History { topic: h.topic.clone(), since: h.since.clone(), limit, id: Some(id) };
            self.send(&frame);
        }
    }

    fn close(&mut self) {
        self.close_socket(CLIENT_CLOSE, "closed by the app", ClientError::Closed);
        self.fail_waiting(ClientError::Closed);
        self.conn = Conn::Closed;
        self.ended = Some(ClientError::Closed);
        self.set_status(Status::Closed { code: Some(CLIENT_CLOSE), reason: "closed by the app".into() });
    }

    fn own_peer(&self) -> String {
        match &self.status {
            Status::Open { peer } => peer.clone(),
            _ => String::new(),
        }
    }

    /// Hands a frame from the server to its handler. Every frame is named (no
    /// wildcard), so a new one in `crosswire-shared` fails to compile here.
    fn frame(&mut self, text: &str, now: Millis) {
        let frame = match ServerFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => return self.notify(Event::Error(ClientError::Protocol(e.to_string()))),
        };
        match frame {
            ServerFrame::Welcome { peer, heartbeat_ms, version, exp } => {
                self.on_welcome(peer, heartbeat_ms, version, exp, now)
            }
            ServerFrame::Subscribed { topic, epoch, seq, recovered } => {
                self.on_subscribed(topic, epoch, seq, recovered)
            }
            // Unsubscribing forgets the topic at once; the answer has nothing to add.
            ServerFrame::Unsubscribed { .. } => {}
            ServerFrame::Message { topic, seq, from, data } => self.on_message(topic, seq, from, data),
            ServerFrame::Ack { ack, seq } => self.on_ack(ack, seq),
            ServerFrame::Pong { id } => self.on_pong(id),
            ServerFrame::Refreshed { id, exp } => self.on_refreshed(id, exp, now),
            ServerFrame::History { topic, id, epoch, seq, messages, next } => {
                self.on_history(HistoryPage { topic, id, epoch, seq, messages, next }, now)
            }
            ServerFrame::Error { code, message, ack, topic, id } => self.on_error(code, message, topic, ack, id),
            ServerFrame::Presence { topic, peers, .. } => self.on_presence(topic, peers),
            ServerFrame::Join { topic, who } => self.on_join(topic, who),
            ServerFrame::Leave { topic, who } => self.on_leave(topic, who),
        }
    }

    fn on_welcome(&mut self, peer: PeerId, heartbeat_ms: u64, version: u32, exp: Option<u64>, now: Millis) {
        if !matches!(self.conn, Conn::Open { .. }) {
            return;
        }
        if version != PROTOCOL_VERSION {
            // Retrying cannot help: this server speaks another protocol.
            let reason = format!("the server speaks protocol version {version}; this client speaks {PROTOCOL_VERSION}");
            self.out.push(Command::CloseSocket { code: CLIENT_CLOSE, reason: "unsupported protocol".into() });
            self.connection_gone(ClientError::Disconnected);
            return self.end(Status::Closed { code: None, reason: reason.clone() }, None, reason);
        }
        let interval = self.config.heartbeat_ms.unwrap_or(heartbeat_ms);
        let heartbeat = (interval > 0).then_some(Heartbeat { interval, next_ping: now + interval, awaiting: None });
        self.conn = Conn::Ready { heartbeat };
        self.backoff.opened(now);
        // The server's hint covers tokens the client cannot read (not a JWT).
        if let (Some(exp), None) = (exp, self.token_exp) {
            self.token_exp = Some((exp.saturating_mul(1000), now));
        }
        self.set_status(Status::Open { peer });
        let topics: Vec<Topic> = self.topics.keys().cloned().collect();
        for topic in &topics {
            self.send_subscribe(topic, false);
        }
        for queued in self.queue.drain() {
            self.publish(queued);
        }
        self.send_history();
        // A token that expired while away is replaced at once.
        if self.refresh_at().is_some_and(|at| now >= at) {
            self.in_place = InPlace::Fetching;
            self.out.push(Command::RefreshToken);
        }
    }

    fn on_ack(&mut self, ack: u64, seq: u64) {
        let Some(inflight) = self.inflight.remove(&ack) else { return };
        if let Some(entry) = self.topics.get_mut(&inflight.topic) {
            if entry.last_seq.is_some_and(|last| seq > last) {
                entry.own_seqs.insert(seq);
            }
        }
        if !inflight.internal {
            self.notify(Event::Ack { id: ack, result: Ok(seq) });
        }
        if let Some(data) = inflight.echo {
            let mut message = TopicMessage::new(inflight.topic, seq, self.own_peer(), data);
            message.local = true;
            self.notify(Event::Message(message));
        }
    }

    fn on_pong(&mut self, id: Option<u64>) {
        if self.suspect.is_some_and(|(want, _)| id == Some(want)) {
            self.suspect = None;
        }
        if let Conn::Ready { heartbeat: Some(mut hb) } = self.conn {
            if hb.awaiting.is_some_and(|(want, _)| id.is_none_or(|id| id == want)) {
                hb.awaiting = None;
                self.conn = Conn::Ready { heartbeat: Some(hb) };
            }
        }
    }

    fn on_refreshed(&mut self, id: Option<u64>, exp: Option<u64>, now: Millis) {
        if matches!(self.in_place, InPlace::Sent(want) if id == Some(want)) {
            self.in_place = InPlace::Idle;
            // The server's word on the expiry wins over the token's;
            // none means this connection does not expire.
            self.token_exp = exp.map(|exp| (exp.saturating_mul(1000), now));
        }
    }

    /// A page of a `history` answer: the next page is asked for while the
    /// server says more is retained (`next`) and the app wants more, and
    /// the app gets all of them as one [`History`].
    fn on_history(&mut self, page: HistoryPage, now: Millis) {
        let HistoryPage { topic, id, epoch, seq, messages, next } = page;
        let Some(id) = id else { return };
        let Some(request) = self.history.get_mut(&id) else { return };
        request
            .collected
            .extend(messages.into_iter().map(|m| TopicMessage::new(topic.clone(), m.seq, m.from, Rc::from(m.data))));
        let got = u32::try_from(request.collected.len()).unwrap_or(u32::MAX);
        let wants_more = request.limit.is_none_or(|limit| got < limit);
        if let (Some(next), true) = (next, wants_more) {
            request.since = Some(Since { epoch, seq: next });
            request.deadline = now + self.config.ack_timeout_ms;
            request.sent = false;
            if self.is_ready() {
                self.send_history();
            }
            return;
        }
        let messages = self.history.remove(&id).map(|r| r.collected).unwrap_or_default();
        self.notify(Event::History { id, result: Ok(History { topic, epoch, seq, messages }) });
    }

    /// An `error` frame: the answer to a publish (`ack`), a `history` or
    /// `refresh` request (`id`), or else about a topic or nothing in particular.
    fn on_error(&mut self, code: ErrorCode, message: String, topic: Option<Topic>, ack: Option<u64>, id: Option<u64>) {
        let error = ClientError::Server { code, message, topic: topic.clone() };
        if let Some(id) = ack {
            match self.inflight.remove(&id) {
                Some(inflight) if inflight.internal => return self.notify(Event::Error(error)),
                Some(_) => return self.notify(Event::Ack { id, result: Err(error) }),
                None => {}
            }
        }
        if let Some(id) = id {
            if self.history.remove(&id).is_some() {
                return self.notify(Event::History { id, result: Err(error) });
            }
            if self.in_place == InPlace::Sent(id) {
                self.in_place = InPlace::Failed;
                return self.notify(Event::Error(ClientError::TokenRefresh(error.to_string())));
            }
        }
        let about_subscribe = !matches!(code, ErrorCode::RateLimited | ErrorCode::TooLarge);
        if let Some(topic) = &topic {
            if let Some(entry) = self.topics.get_mut(topic) {
                // A refused subscribe, or a subscription a refreshed
                // token no longer allows.
                let revoked = code == ErrorCode::Forbidden && entry.status.is_live();
                if (!entry.pending.is_empty() && about_subscribe) || revoked {
                    entry.pending.pop_front();
                    entry.recovering = false;
                    self.set_topic_status(topic, TopicStatus::Refused(error.clone()));
                }
            }
        }
        self.notify(Event::Error(error));
    }

    fn on_presence(&mut self, topic: Topic, peers: Vec<PresenceEntry>) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        if entry.presence_refs == 0 {
            return; // an answer to interest since released
        }
        entry.presence = Some(peers.clone());
        self.notify(Event::Presence { topic, peers });
    }

    fn on_join(&mut self, topic: Topic, who: PresenceEntry) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        let Some(peers) = &mut entry.presence else { return };
        if !peers.iter().any(|p| p.peer == who.peer) {
            peers.push(who);
            let peers = peers.clone();
            self.notify(Event::Presence { topic, peers });
        }
    }

    fn on_leave(&mut self, topic: Topic, who: PresenceEntry) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        let Some(peers) = &mut entry.presence else { return };
        let before = peers.len();
        peers.retain(|p| p.peer != who.peer);
        if peers.len() != before {
            let peers = peers.clone();
            self.notify(Event::Presence { topic, peers });
        }
    }

    fn on_message(&mut self, topic: Topic, seq: u64, from: PeerId, data: Box<RawValue>) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        if entry.recovering {
            return; // the replay the resubscribe asked for brings it, in order
        }
        if let Some(last) = entry.last_seq {
            if seq <= last {
                return; // a duplicate
            }
            if seq > entry.next_expected(last) {
                // A hole that our own publishes do not explain: keep the
                // position before it and let the server replay from there.
                if entry.epoch.is_some() {
                    entry.recovering = true;
                    self.send_subscribe(&topic, true);
                }
                return;
            }
        }
        let own = entry.own_seqs.contains(&seq);
        entry.advance(seq);
        if !own {
            self.notify(Event::Message(TopicMessage::new(topic, seq, from, Rc::from(data))));
        }
    }

    fn on_subscribed(&mut self, topic: Topic, epoch: String, seq: u64, recovered: bool) {
        let Some(entry) = self.topics.get_mut(&topic) else { return };
        let sent = entry.pending.pop_front().flatten();
        if entry.recovering {
            if sent.is_none() {
                // The answer to an earlier subscribe; the recovery's comes next.
                return;
            }
            entry.recovering = false;
        }
        let same_epoch = entry.epoch.as_deref() == Some(epoch.as_str());
        if !same_epoch {
            entry.own_seqs.clear(); // a new epoch resets tracking
        }
        let mut gap = None;
        match sent {
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
            None => {
                // Unasked, in another epoch: the server lost the topic's
                // history (a broker restarted without persistence) and says
                // where it stands now. What we had not seen is gone.
                if let Some(old) = entry.epoch.clone() {
                    gap = Some(Since { epoch: old, seq: entry.last_seq.unwrap_or(0) });
                }
                entry.advance(seq)
            }
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
