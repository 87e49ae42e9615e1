//! The browser binding: one connection, driven by a [`Session`].

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    fmt,
    rc::{Rc, Weak},
};

use crosswire_shared::{PresenceEntry, RawValue, Topic};
use gloo_timers::callback::Timeout;
use serde::Serialize;
use wasm_bindgen::{closure::Closure, JsCast};
use wasm_bindgen_futures::{spawn_local, JsFuture};

use crate::{
    ack::{self, AckFuture, AckSender},
    session::{Command, Input, Session},
    socket::{Socket, SocketEvent},
    url, ClientError, Config, Event, Millis, Status, TopicStatus,
};

/// A shared connection to a crosswire server. Cheap to clone: clones are
/// handles to the same connection, and compare equal.
///
/// Yew apps get one from [`crate::CrosswireProvider`] through
/// [`crate::use_crosswire`]; other code may create one with [`Crosswire::new`].
///
/// ```ignore
/// use crosswire_client::{Config, Crosswire, Event, Topic};
///
/// let client = Crosswire::new("ws://127.0.0.1:3000/_ws", Config::default());
/// let topic = Topic::new("chat:lobby")?;
/// let _sub = client.subscribe(&topic, false); // held while interested
/// let _listener = client.listen(|event| if let Event::Message(m) = event {
///     web_sys::console::log_1(&m.data.get().into());
/// });
/// let seq = client.publish_with_ack(&topic, &"hello").await?;
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
    config: Config,
    session: RefCell<Session>,
    socket: RefCell<Option<Socket>>,
    /// Bumped whenever the socket is replaced: events of older sockets, and
    /// answers to older probes, are ignored.
    generation: Cell<u64>,
    timer: RefCell<Option<(Millis, Timeout)>>,
    listeners: RefCell<Vec<(u64, ListenerFn)>>,
    next_listener: Cell<u64>,
    acks: RefCell<HashMap<u64, AckSender>>,
    token: RefCell<Option<String>>,
    pending: RefCell<VecDeque<Input>>,
    dispatching: Cell<bool>,
    page: RefCell<Option<PageEvents>>,
}

fn now() -> Millis {
    js_sys::Date::now() as Millis
}

impl Crosswire {
    /// Creates the client and starts connecting to `url` (`ws://` or `wss://`).
    pub fn new(url: &str, config: Config) -> Self {
        let session = Session::new(config.clone(), Box::new(js_sys::Math::random));
        let inner = Rc::new(Inner {
            url: url.to_owned(),
            token: RefCell::new(config.token.clone()),
            config,
            session: RefCell::new(session),
            socket: RefCell::new(None),
            generation: Cell::new(0),
            timer: RefCell::new(None),
            listeners: RefCell::new(Vec::new()),
            next_listener: Cell::new(0),
            acks: RefCell::new(HashMap::new()),
            pending: RefCell::new(VecDeque::new()),
            dispatching: Cell::new(false),
            page: RefCell::new(None),
        });
        *inner.page.borrow_mut() = PageEvents::install(&inner);
        if let Some(hidden) = document_hidden() {
            inner.dispatch(Input::Visibility { hidden });
        }
        inner.dispatch(Input::Start);
        Self { inner }
    }

    /// The WebSocket URL (without the token).
    pub fn url(&self) -> &str {
        &self.inner.url
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
    /// goes. With `presence`, the client also tracks who is subscribed.
    pub fn subscribe(&self, topic: &Topic, presence: bool) -> Subscription {
        self.inner.dispatch(Input::Subscribe { topic: topic.clone(), presence });
        Subscription { inner: Rc::downgrade(&self.inner), topic: topic.clone(), presence }
    }

    /// Publishes `data` to every other subscriber of `topic`. While the
    /// connection is not open the publish waits in the offline queue.
    pub fn publish<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T) -> Result<(), ClientError> {
        let data = to_raw(data)?;
        self.inner.dispatch(Input::Publish { topic: topic.clone(), data, ack: None });
        Ok(())
    }

    /// Publishes `data` and resolves to the seq the server assigned it, or to
    /// the error. Queued publishes keep their future; the ack timeout counts
    /// from when the publish is actually sent.
    pub fn publish_with_ack<T: Serialize + ?Sized>(&self, topic: &Topic, data: &T) -> AckFuture {
        let data = match to_raw(data) {
            Ok(data) => data,
            Err(e) => return AckFuture::ready(Err(e)),
        };
        let id = self.inner.session.borrow_mut().next_id();
        let (tx, rx) = ack::channel();
        self.inner.acks.borrow_mut().insert(id, tx);
        self.inner.dispatch(Input::Publish { topic: topic.clone(), data, ack: Some(id) });
        rx
    }

    /// Reconnects now, with a fresh backoff; also resumes after a policy
    /// close (4xxx/1008) or [`Crosswire::close`].
    pub fn reconnect(&self) {
        self.inner.dispatch(Input::Reconnect);
    }

    /// Closes the connection for good (until [`Crosswire::reconnect`]).
    /// Queued publishes are dropped and their futures fail with
    /// [`ClientError::Closed`].
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
            let commands = self.session.borrow_mut().handle(input, now());
            for command in commands {
                self.execute(command);
            }
        }
        self.dispatching.set(false);
        self.arm_timer();
    }

    fn execute(self: &Rc<Self>, command: Command) {
        match command {
            Command::Connect { refresh_token } => {
                let generation = self.generation.get() + 1;
                self.generation.set(generation);
                match (&self.config.token_refresher, refresh_token) {
                    (Some(refresher), true) => {
                        let refresh = refresher.refresh();
                        let weak = Rc::downgrade(self);
                        spawn_local(async move {
                            let token = refresh.await;
                            let Some(inner) = weak.upgrade() else { return };
                            if let Some(token) = token {
                                *inner.token.borrow_mut() = Some(token);
                            }
                            if inner.generation.get() == generation {
                                inner.open_socket(generation);
                            }
                        });
                    }
                    _ => self.open_socket(generation),
                }
            }
            Command::Send(text) => {
                if let Some(socket) = &*self.socket.borrow() {
                    socket.send(&text);
                }
            }
            Command::CloseSocket { code, reason } => {
                self.generation.set(self.generation.get() + 1);
                if let Some(socket) = self.socket.borrow_mut().take() {
                    socket.close(code, &reason);
                }
            }
            Command::Probe => {
                let generation = self.generation.get();
                let token = self.token.borrow().clone();
                let target = url::probe_url(&url::with_token(&self.url, token.as_deref()));
                let weak = Rc::downgrade(self);
                spawn_local(async move {
                    let status = match target {
                        Some(target) => probe(&target).await,
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
                if let Event::Ack { id, result } = &event {
                    if let Some(tx) = self.acks.borrow_mut().remove(id) {
                        tx.send(result.clone());
                    }
                }
                let listeners: Vec<ListenerFn> = self.listeners.borrow().iter().map(|(_, f)| f.clone()).collect();
                for f in listeners {
                    f(&event);
                }
            }
        }
    }

    fn open_socket(self: &Rc<Self>, generation: u64) {
        let token = self.token.borrow().clone();
        let target = url::with_token(&self.url, token.as_deref());
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
                    inner.socket.borrow_mut().take();
                    Input::Closed { code, reason }
                }
            });
        });
        match Socket::open(&target, on_event) {
            Ok(socket) => *self.socket.borrow_mut() = Some(socket),
            Err(e) => {
                self.execute(Command::Notify(Event::Error(ClientError::Socket(e.clone()))));
                self.dispatch(Input::Closed { code: 1006, reason: e });
            }
        }
    }

    /// Keeps one timer armed for the session's next deadline.
    fn arm_timer(self: &Rc<Self>) {
        let deadline = self.session.borrow().next_deadline();
        let mut timer = self.timer.borrow_mut();
        if timer.as_ref().map(|(at, _)| *at) == deadline {
            return;
        }
        *timer = deadline.map(|at| {
            let delay = at.saturating_sub(now()).min(i32::MAX as u64) as u32;
            let weak = Rc::downgrade(self);
            let timeout = Timeout::new(delay, move || {
                if let Some(inner) = weak.upgrade() {
                    if let Ok(mut timer) = inner.timer.try_borrow_mut() {
                        if timer.as_ref().is_some_and(|(t, _)| *t == at) {
                            // Forget it rather than drop it while it runs.
                            if let Some((_, t)) = timer.take() {
                                t.forget();
                            }
                        }
                    }
                    inner.dispatch(Input::Tick);
                }
            });
            (at, timeout)
        });
    }
}

/// Fetches the `http(s)` form of the WebSocket URL and returns its status.
async fn probe(target: &str) -> Option<u16> {
    let window = web_sys::window()?;
    let response = JsFuture::from(window.fetch_with_str(target)).await.ok()?;
    let response: web_sys::Response = response.dyn_into().ok()?;
    Some(response.status())
}

fn document_hidden() -> Option<bool> {
    Some(web_sys::window()?.document()?.hidden())
}

/// `online` on the window and `visibilitychange` on the document, removed on drop.
struct PageEvents {
    online: Closure<dyn FnMut()>,
    visibility: Closure<dyn FnMut()>,
}

impl PageEvents {
    fn install(inner: &Rc<Inner>) -> Option<Self> {
        let window = web_sys::window()?;
        let document = window.document()?;
        let weak = Rc::downgrade(inner);
        let online = Closure::<dyn FnMut()>::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.dispatch(Input::Online);
            }
        });
        let weak = Rc::downgrade(inner);
        let visibility = Closure::<dyn FnMut()>::new(move || {
            if let (Some(inner), Some(hidden)) = (weak.upgrade(), document_hidden()) {
                inner.dispatch(Input::Visibility { hidden });
            }
        });
        window.add_event_listener_with_callback("online", online.as_ref().unchecked_ref()).ok()?;
        document.add_event_listener_with_callback("visibilitychange", visibility.as_ref().unchecked_ref()).ok()?;
        Some(Self { online, visibility })
    }
}

impl Drop for PageEvents {
    fn drop(&mut self) {
        if let Some(window) = web_sys::window() {
            let _ = window.remove_event_listener_with_callback("online", self.online.as_ref().unchecked_ref());
            if let Some(document) = window.document() {
                let f = self.visibility.as_ref().unchecked_ref();
                let _ = document.remove_event_listener_with_callback("visibilitychange", f);
            }
        }
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
