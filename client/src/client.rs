//! The client: one connection, driven by a [`Session`], carried out by the
//! platform's driver (the browser's WebSocket on wasm32; detached elsewhere).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    fmt,
    rc::{Rc, Weak},
};

use crosswire_shared::{PresenceEntry, RawValue, Since, Topic};
use serde::Serialize;

use crate::{
    ack::{self, AckFuture, HistoryFuture, ReplySender},
    driver::{self, Driver, PageEvent, SocketEvent},
    session::{Command, Input, Session},
    url, ClientConfig, ClientError, Event, History, Status, TopicStatus,
};

/// A shared connection to a crosswire server. Cheap to clone: clones are
/// handles to the same connection, and compare equal.
///
/// Yew apps get one from [`crate::CrosswireProvider`] through
/// [`crate::use_crosswire`]; other code may create one with [`Crosswire::new`].
/// Outside a browser (server-side rendering, native tests) a client never
/// opens a socket: its status stays [`Status::Connecting`].
///
/// ```ignore
/// use crosswire_client::{ClientConfig, Crosswire, Event, Topic};
///
/// let client = Crosswire::new("ws://127.0.0.1:3000/_ws", ClientConfig::default());
/// let topic = Topic::new("chat:lobby")?;
/// let _sub = client.subscribe(&topic, false); // held while interested
/// let _listener = client.listen(|event| if let Event::Message(m) = event {
///     web_sys::console::log_1(&m.data.get().into());
/// });
/// let seq = client.publish_with_ack(&topic, &"hello").await?;
/// let page = client.history(&topic, None, Some(50)).await?; // the latest 50, without subscribing
/// ```
#[derive(Clone)]
pub struct Crosswire {
    inner: Rc<Inner>,
}

impl PartialEq for Crosswire {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for Crosswire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crosswire").field("url", &self.inner.url).field("status", &self.status()).finish()
    }
}

type ListenerFn = Rc<dyn Fn(&Event)>;

struct Inner {
    url: String,
    config: ClientConfig,
    session: RefCell<Session>,
    driver: Driver,
    /// Bumped whenever the socket is replaced: events of older sockets, and
    /// answers to older probes, are ignored.
    generation: Cell<u64>,
    listeners: RefCell<Vec<(u64, ListenerFn)>>,
    next_listener: Cell<u64>,
    acks: RefCell<HashMap<u64, ReplySender<u64>>>,
    histories: RefCell<HashMap<u64, ReplySender<History>>>,
    pending: RefCell<VecDeque<Input>>,
    dispatching: Cell<bool>,
    started: Cell<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.driver.shut_down();
    }
}

impl Crosswire {
    /// Creates the client and starts connecting to `url` (`ws://` or `wss://`).
    pub fn new(url: &str, config: ClientConfig) -> Self {
        let client = Self::idle(url, config);
        client.start();
        client
    }

    /// Creates the client without connecting: subscriptions and publishes
    /// made before [`Crosswire::start`] wait for it. [`crate::CrosswireProvider`]
    /// starts its client in an effect, so server-side rendering, which runs no
    /// effects, never opens a socket.
    pub fn idle(url: &str, config: ClientConfig) -> Self {
        let session = Session::new(config.clone(), Box::new(driver::random));
        let inner = Rc::new(Inner {
            url: url.to_owned(),
            config,
            session: RefCell::new(session),
            driver: Driver::new(),
            generation: Cell::new(0),
            listeners: RefCell::new(Vec::new()),
            next_listener: Cell::new(0),
            acks: RefCell::new(HashMap::new()),
            histories: RefCell::new(HashMap::new()),
            pending: RefCell::new(VecDeque::new()),
            dispatching: Cell::new(false),
            started: Cell::new(false),
        });
        Self { inner }
    }

    /// Starts connecting (once; later calls do nothing).
    pub fn start(&self) {
        if self.inner.started.replace(true) {
            return;
        }
        let weak = Rc::downgrade(&self.inner);
        self.inner.driver.watch_page(Rc::new(move |event| {
            let Some(inner) = weak.upgrade() else { return };
            inner.dispatch(match event {
                PageEvent::Online => Input::Online,
                PageEvent::Offline => Input::Offline,
                PageEvent::Visibility { hidden } => Input::Visibility { hidden },
            });
        }));
        if let Some(hidden) = self.inner.driver.hidden() {
            self.inner.dispatch(Input::Visibility { hidden });
        }
        self.inner.dispatch(Input::Start);
    }

    /// Whether [`Crosswire::start`] (or [`Crosswire::reconnect`]) was called.
    pub fn is_started(&self) -> bool {
        self.inner.started.get()
    }

    /// The WebSocket URL (without the token).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The configuration the client was created with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The current connection status.
    pub fn status(&self) -> Status {
        self.inner.session.borrow().status().clone()
    }

    /// The state of a topic this client holds a subscription to.
    pub fn topic_status(&self, topic: &Topic) -> Option<TopicStatus> {
        self.inner.session.borrow().topic_status(topic).cloned()
    }

    /// The last known subscribers of a topic watched with presence.
    pub fn presence(&self, topic: &Topic) -> Option<Vec<PresenceEntry>> {
        self.inner.session.borrow().presence(topic).map(<[_]>::to_vec)
    }

    /// Calls `f` with every [`Event`] until the returned [`Listener`] is dropped.
    pub fn listen(&self, f: impl Fn(&Event) + 'static) -> Listener {
        let id = self.inner.next_listener.get();
        self.inner.next_listener.set(id + 1);
        self.inner.listeners.borrow_mut().push((id, Rc::new(f)));
        Listener { inner: Rc::downgrade(&self.inner), id }
    }

    /// Subscribes to `topic` until the returned [`Subscription`] is dropped.
    /// Subscriptions are reference counted: the server hears one `subscribe`
    /// however many holders there are, and `unsubscribe` when the last one
    /// goes. With `presence`, the client also tracks who is subscribed; when
    /// the last presence holder goes, the server stops sending join/leave events.
    pub fn subscribe(&self, topic: &Topic, presence: bool) -> Subscription {
        self.inner.dispatch(Input::Subscribe { topic: topic.clone(), presence });
        Subscription { inner: Rc::downgrade(&self.inner), topic: topic.clone(), presence }
    }

    /// Publishes `data` to every other subscriber of `topic`. While the
    /// connection is not open the publish waits in the offline queue.
    pub fn publish<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T) -> Result<(), ClientError> {
        let data = to_raw(data)?;
        self.inner.dispatch(Input::Publish { topic: topic.clone(), data, ack: None, echo: false });
        Ok(())
    }

    /// Publishes `data` and resolves to the seq the server assigned it, or to
    /// the error, always within [`ClientConfig::ack_timeout_ms`] of this call
    /// (offline time included).
    pub fn publish_with_ack<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T) -> AckFuture {
        self.publish_acked(topic, data, false)
    }

    /// Like [`Crosswire::publish_with_ack`], and once acknowledged the message
    /// is also delivered on this connection as an [`Event::Message`] with
    /// `local: true` and its seq: the server never sends a publisher its own
    /// messages, so this is how other components on the same connection see it.
    pub fn publish_echo<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T) -> AckFuture {
        self.publish_acked(topic, data, true)
    }

    fn publish_acked<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T, echo: bool) -> AckFuture {
        let data = match to_raw(data) {
            Ok(data) => data,
            Err(e) => return AckFuture::ready(Err(e)),
        };
        let id = self.inner.session.borrow_mut().next_id();
        let (tx, rx) = ack::channel();
        self.inner.acks.borrow_mut().insert(id, tx);
        self.inner.dispatch(Input::Publish { topic: topic.clone(), data, ack: Some(id), echo });
        rx
    }

    /// A topic's retained messages, without subscribing: those after `since`
    /// (the oldest `limit` of them), or the latest `limit` without `since`.
    /// Needs the subscribe permission; fails with `history_unavailable` when
    /// the server's history no longer reaches back to `since`. Asked (again)
    /// once connected. The server answers a large window in pages (each
    /// within its `--max-history-answer-bytes`, saying where the rest
    /// follows); this asks for page after page and resolves with all of
    /// them once it has `limit` messages or the server has no more, or fails
    /// if a page does not come within [`ClientConfig::ack_timeout_ms`] or
    /// the history no longer reaches back to where the next page starts.
    /// Without `limit`, that is every message the server retains after
    /// where the first page started.
    pub fn history(&self, topic: &Topic, since: Option<Since>, limit: Option<u32>) -> HistoryFuture {
        let id = self.inner.session.borrow_mut().next_id();
        let (tx, rx) = ack::channel();
        self.inner.histories.borrow_mut().insert(id, tx);
        self.inner.dispatch(Input::History { id, topic: topic.clone(), since, limit });
        rx
    }

    /// Reconnects now, with a fresh backoff; also resumes after a final close
    /// (a policy close, a failed token refresh) or [`Crosswire::close`].
    pub fn reconnect(&self) {
        if self.inner.started.get() {
            self.inner.dispatch(Input::Reconnect);
        } else {
            self.start();
        }
    }

    /// Closes the connection for good (until [`Crosswire::reconnect`]).
    /// Queued publishes and pending requests fail with [`ClientError::Closed`].
    pub fn close(&self) {
        self.inner.dispatch(Input::Close);
    }
}

fn to_raw<T: Serialize + ?Sized>(data: &T) -> Result<Box<RawValue>, ClientError> {
    serde_json::value::to_raw_value(data).map_err(|e| ClientError::Serialize(e.to_string()))
}

impl Inner {
    /// Feeds one input to the session and carries out its commands. Inputs
    /// arriving while commands run (a listener that publishes, a socket that
    /// fails at once) are queued, so commands always run in order.
    fn dispatch(self: &Rc<Self>, input: Input) {
        self.pending.borrow_mut().push_back(input);
        if self.dispatching.replace(true) {
            return;
        }
        loop {
            let Some(input) = self.pending.borrow_mut().pop_front() else { break };
            let commands = self.session.borrow_mut().handle(input, driver::now());
            for command in commands {
                self.execute(command);
            }
        }
        self.dispatching.set(false);
        self.arm_timer();
    }

    fn execute(self: &Rc<Self>, command: Command) {
        match command {
            Command::Connect { token } => {
                let generation = self.generation.get() + 1;
                self.generation.set(generation);
                self.open_socket(generation, &url::with_token(&self.url, token.as_deref()));
            }
            Command::RefreshToken => {
                let weak = Rc::downgrade(self);
                let refresh = self.config.token_refresher.as_ref().map(|r| r.refresh());
                driver::spawn(async move {
                    let result = match refresh {
                        Some(refresh) => refresh.await,
                        None => Err("no token refresher is configured".to_owned()),
                    };
                    if let Some(inner) = weak.upgrade() {
                        inner.dispatch(Input::TokenRefreshed(result));
                    }
                });
            }
            Command::Send(text) => self.driver.send(&text),
            Command::CloseSocket { code, reason } => {
                self.generation.set(self.generation.get() + 1);
                self.driver.close(code, &reason);
            }
            Command::Probe => {
                let generation = self.generation.get();
                let token = self.session.borrow().token().map(str::to_owned);
                let target = url::probe_url(&url::with_token(&self.url, token.as_deref()));
                let weak = Rc::downgrade(self);
                driver::spawn(async move {
                    let status = match target {
                        Some(target) => driver::probe(target).await,
                        None => None,
                    };
                    if let Some(inner) = weak.upgrade() {
                        if inner.generation.get() == generation {
                            inner.dispatch(Input::Probed(status));
                        }
                    }
                });
            }
            Command::Notify(event) => {
                match &event {
                    Event::Ack { id, result } => {
                        if let Some(tx) = self.acks.borrow_mut().remove(id) {
                            tx.send(result.clone());
                        }
                    }
                    Event::History { id, result } => {
                        if let Some(tx) = self.histories.borrow_mut().remove(id) {
                            tx.send(result.clone());
                        }
                    }
                    _ => {}
                }
                let listeners: Vec<ListenerFn> = self.listeners.borrow().iter().map(|(_, f)| f.clone()).collect();
                for f in listeners {
                    f(&event);
                }
            }
        }
    }

    fn open_socket(self: &Rc<Self>, generation: u64, target: &str) {
        let weak = Rc::downgrade(self);
        let on_event = Rc::new(move |event: SocketEvent| {
            let Some(inner) = weak.upgrade() else { return };
            if inner.generation.get() != generation {
                return;
            }
            inner.dispatch(match event {
                SocketEvent::Open => Input::Opened,
                SocketEvent::Text(text) => Input::Frame(text),
                SocketEvent::Closed { code, reason } => {
                    inner.driver.forget_socket();
                    Input::Closed { code, reason }
                }
            });
        });
        if let Err(e) = self.driver.open(target, on_event) {
            self.execute(Command::Notify(Event::Error(ClientError::Socket(e.clone()))));
            self.dispatch(Input::Closed { code: 1006, reason: e });
        }
    }

    /// Keeps one timer armed for the session's next deadline.
    fn arm_timer(self: &Rc<Self>) {
        let deadline = self.session.borrow().next_deadline();
        if self.driver.armed_at() == deadline {
            return;
        }
        let weak = Rc::downgrade(self);
        let at = deadline.unwrap_or_default();
        self.driver.arm(deadline, move || {
            if let Some(inner) = weak.upgrade() {
                inner.driver.fired(at);
                inner.dispatch(Input::Tick);
            }
        });
    }
}

/// Keeps a listener registered; dropping it unregisters.
#[must_use = "the listener is removed when this is dropped"]
pub struct Listener {
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.listeners.borrow_mut().retain(|(id, _)| *id != self.id);
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").field("id", &self.id).finish()
    }
}

/// Holds one reference to a topic subscription; dropping it releases it (the
/// last release unsubscribes).
#[must_use = "the subscription is released when this is dropped"]
pub struct Subscription {
    inner: Weak<Inner>,
    topic: Topic,
    presence: bool,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.dispatch(Input::Unsubscribe { topic: self.topic.clone(), presence: self.presence });
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").field("topic", &self.topic).field("presence", &self.presence).finish()
    }
}
