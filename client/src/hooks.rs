//! The Yew hooks: connection status, typed topics (as a capped list or as a
//! callback), presence.
//!
//! Each message of a topic is decoded once per type for the whole connection
//! ([`crate::TopicMessage::received`]), however many components use the topic.

use std::{
    cell::{Ref, RefCell},
    collections::VecDeque,
    marker::PhantomData,
    rc::Rc,
};

use crosswire_shared::{PresenceEntry, Topic};
use serde::{de::DeserializeOwned, Serialize};
use yew::prelude::*;

use crate::{AckFuture, ClientError, Crosswire, CrosswireContext, Event, Listener, Received, Status, TopicStatus};

/// How many errors a [`use_topic`] handle keeps.
const ERRORS: usize = 50;

/// The connection of the nearest [`crate::CrosswireProvider`].
///
/// # Panics
///
/// When no provider is above the component: that is a bug in the app.
#[hook]
pub fn use_crosswire() -> Crosswire {
    use_context::<CrosswireContext>().expect("crosswire hooks need a <CrosswireProvider> above the component")
}

/// The connection status; the component re-renders when it changes.
#[hook]
pub fn use_status() -> Status {
    let client = use_crosswire();
    let status = use_state_eq(|| client.status());
    let setter = status.setter();
    use_effect_with(client, move |client| {
        setter.set(client.status());
        let listener = client.listen(move |event| {
            if let Event::Status(s) = event {
                setter.set(s.clone());
            }
        });
        move || drop(listener)
    });
    (*status).clone()
}

/// The current subscribers of `topic`, kept up to date with `join`/`leave`
/// events. Subscribes to the topic (with presence) while mounted; when the
/// last presence watcher of a topic unmounts, the server stops sending its
/// join/leave events.
#[hook]
pub fn use_presence(topic: &str) -> Vec<PresenceEntry> {
    let client = use_crosswire();
    let peers = use_state_eq(Vec::new);
    let setter = peers.setter();
    use_effect_with((client, topic.to_owned()), move |(client, name)| {
        let guards = Topic::new(name).ok().map(|topic| {
            setter.set(client.presence(&topic).unwrap_or_default());
            let t = topic.clone();
            let listener = client.listen(move |event| {
                if let Event::Presence { topic, peers } = event {
                    if *topic == t {
                        setter.set(peers.clone());
                    }
                }
            });
            (listener, client.subscribe(&topic, true))
        });
        move || drop(guards)
    });
    (*peers).clone()
}

/// How a topic hook keeps and publishes messages.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicOptions {
    /// How many messages [`use_topic_with`] keeps, the oldest dropped first
    /// (default 1 000; at least 1). [`UseTopicHandle::total`] keeps counting.
    pub cap: usize,
    /// Local echo (default off): publishes through this handle are
    /// acknowledged and then delivered, with their seq, to every handle of the
    /// topic on this connection that has echo on, this one included. The
    /// server never sends a publisher its own messages, so without echo two
    /// components on one connection do not see each other's publishes.
    pub echo: bool,
}

impl Default for TopicOptions {
    fn default() -> Self {
        Self { cap: 1_000, echo: false }
    }
}

/// Publishes typed messages to one topic (what [`use_topic_callback`]
/// returns; [`UseTopicHandle`] publishes the same way).
pub struct TopicSender<T: 'static> {
    client: Crosswire,
    topic: Result<Topic, ClientError>,
    echo: bool,
    _t: PhantomData<fn(T)>,
}

impl<T> Clone for TopicSender<T> {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), topic: self.topic.clone(), echo: self.echo, _t: PhantomData }
    }
}

impl<T> PartialEq for TopicSender<T> {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client && self.topic == other.topic && self.echo == other.echo
    }
}

impl<T> std::fmt::Debug for TopicSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicSender").field("topic", &self.topic).field("echo", &self.echo).finish()
    }
}

impl<T: Serialize + 'static> TopicSender<T> {
    /// The topic, unless its name was invalid.
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref().ok()
    }

    /// Publishes `data` to the topic's other subscribers; queued while
    /// offline. With echo on, it is acknowledged and echoed locally (use
    /// [`Self::publish_with_ack`] to see whether the server accepted it).
    pub fn publish(&self, data: T) -> Result<(), ClientError> {
        let topic = self.topic.as_ref().map_err(Clone::clone)?;
        if self.echo {
            drop(self.client.publish_echo(topic, &data));
            Ok(())
        } else {
            self.client.publish(topic, &data)
        }
    }

    /// Publishes `data` and resolves to the seq the server assigned, or the
    /// error, within the ack timeout of this call.
    pub fn publish_with_ack(&self, data: T) -> AckFuture {
        match &self.topic {
            Ok(topic) if self.echo => self.client.publish_echo(topic, &data),
            Ok(topic) => self.client.publish_with_ack(topic, &data),
            Err(e) => AckFuture::ready(Err(e.clone())),
        }
    }
}

/// What [`use_topic`] keeps per component. The message list is shared
/// between successive states and appended to in place, so a message costs
/// O(1) however long the list is.
struct TopicState<T> {
    messages: Rc<RefCell<VecDeque<Rc<Received<T>>>>>,
    total: u64,
    errors: Rc<Vec<ClientError>>,
    status: Option<TopicStatus>,
}

impl<T> Default for TopicState<T> {
    fn default() -> Self {
        Self { messages: Rc::default(), total: 0, errors: Rc::default(), status: None }
    }
}

enum TopicAction<T> {
    Reset,
    Message(Rc<Received<T>>, usize),
    Error(ClientError),
    Status(Option<TopicStatus>),
    Clear,
}

impl<T: 'static> Reducible for TopicState<T> {
    type Action = TopicAction<T>;

    fn reduce(self: Rc<Self>, action: Self::Action) -> Rc<Self> {
        let mut next = TopicState {
            messages: self.messages.clone(),
            total: self.total,
            errors: self.errors.clone(),
            status: self.status.clone(),
        };
        match action {
            TopicAction::Reset => next = TopicState::default(),
            TopicAction::Message(m, cap) => {
                let mut list = next.messages.borrow_mut();
                list.push_back(m);
                while list.len() > cap {
                    list.pop_front();
                }
                drop(list);
                next.total += 1;
            }
            TopicAction::Error(e) => {
                let errors = Rc::make_mut(&mut next.errors);
                if errors.len() >= ERRORS {
                    errors.remove(0);
                }
                errors.push(e);
            }
            TopicAction::Status(s) => next.status = s,
            TopicAction::Clear => {
                next.messages = Rc::default();
                next.errors = Rc::default();
            }
        }
        Rc::new(next)
    }
}

/// The handle [`use_topic`] returns: what arrived, and how to publish.
pub struct UseTopicHandle<T: 'static> {
    sender: TopicSender<T>,
    state: UseReducerHandle<TopicState<T>>,
}

impl<T> Clone for UseTopicHandle<T> {
    fn clone(&self) -> Self {
        Self { sender: self.sender.clone(), state: self.state.clone() }
    }
}

impl<T> PartialEq for UseTopicHandle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.sender == other.sender && std::ptr::eq(&*self.state, &*other.state)
    }
}

impl<T> std::fmt::Debug for UseTopicHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UseTopicHandle")
            .field("topic", &self.sender.topic)
            .field("total", &self.state.total)
            .field("status", &self.state.status)
            .finish()
    }
}

impl<T: Serialize + 'static> UseTopicHandle<T> {
    /// The topic, unless its name was invalid (then [`Self::errors`] says why).
    pub fn topic(&self) -> Option<&Topic> {
        self.sender.topic()
    }

    /// The messages received since the component mounted (or the topic
    /// changed), oldest first; the most recent [`TopicOptions::cap`] are kept.
    /// To tell new messages apart from a list that stopped growing at its cap,
    /// watch [`Self::total`].
    pub fn messages(&self) -> Ref<'_, VecDeque<Rc<Received<T>>>> {
        self.state.messages.borrow()
    }

    /// How many messages arrived since the component mounted (or the topic
    /// changed): it only grows, also once the list is at its cap.
    pub fn total(&self) -> u64 {
        self.state.total
    }

    /// Errors about this topic: payloads that did not deserialize into `T`,
    /// refused subscribes or publishes, dropped queued publishes, gaps that
    /// could not be recovered. The most recent 50 are kept.
    pub fn errors(&self) -> &[ClientError] {
        &self.state.errors
    }

    /// The subscription's state; `None` before the first subscribe.
    pub fn status(&self) -> Option<&TopicStatus> {
        self.state.status.as_ref()
    }

    /// Publishes `data` to the topic's other subscribers (and, with echo on,
    /// locally); queued while offline. Failures show up in [`Self::errors`].
    pub fn publish(&self, data: T) {
        if let Err(e) = self.sender.publish(data) {
            self.state.dispatch(TopicAction::Error(e));
        }
    }

    /// Publishes `data` and resolves to the seq the server assigned, or the error.
    pub fn publish_with_ack(&self, data: T) -> AckFuture {
        self.sender.publish_with_ack(data)
    }

    /// How this handle publishes, to hand to other components.
    pub fn sender(&self) -> TopicSender<T> {
        self.sender.clone()
    }

    /// Forgets the messages and errors received so far ([`Self::total`] keeps counting).
    pub fn clear(&self) {
        self.state.dispatch(TopicAction::Clear);
    }
}

fn error_topic(e: &ClientError) -> Option<&Topic> {
    match e {
        ClientError::Server { topic, .. } => topic.as_ref(),
        ClientError::QueueOverflow { topic } | ClientError::Payload { topic, .. } | ClientError::Gap { topic, .. } => {
            Some(topic)
        }
        _ => None,
    }
}

/// Listens to one topic's messages (decoded as `T`, shared across listeners),
/// errors and status.
fn listen_topic<T: DeserializeOwned + 'static>(
    client: &Crosswire,
    topic: &Topic,
    echo: bool,
    on_item: impl Fn(Result<Rc<Received<T>>, ClientError>) + 'static,
    on_status: impl Fn(TopicStatus) + 'static,
) -> Listener {
    let t = topic.clone();
    client.listen(move |event| match event {
        Event::Message(m) if m.topic == t && (echo || !m.local) => on_item(m.received::<T>()),
        Event::Topic { topic, status } if *topic == t => on_status(status.clone()),
        Event::Error(e) if error_topic(e) == Some(&t) => on_item(Err(e.clone())),
        _ => {}
    })
}

/// [`use_topic_with`] with the default [`TopicOptions`] (1 000 messages kept,
/// no local echo).
#[hook]
pub fn use_topic<T>(topic: &str) -> UseTopicHandle<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    use_topic_with(topic, TopicOptions::default())
}

/// Subscribes to `topic` while the component is mounted and keeps its latest
/// messages, deserialized into `T`. Components using the same topic share one
/// subscription; the last one to unmount unsubscribes. A payload that does not
/// deserialize into `T` is reported in [`UseTopicHandle::errors`].
///
/// Under server-side rendering it renders the initial state: no messages,
/// status `None`.
#[hook]
pub fn use_topic_with<T>(topic: &str, options: TopicOptions) -> UseTopicHandle<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    let client = use_crosswire();
    let state = use_reducer(TopicState::<T>::default);
    let parsed = use_memo(topic.to_owned(), |name| Topic::new(name).map_err(ClientError::from));
    let dispatcher = state.dispatcher();
    let TopicOptions { cap, echo } = options;
    let cap = cap.max(1);
    use_effect_with((client.clone(), (*parsed).clone(), echo, cap), move |(client, parsed, echo, cap)| {
        dispatcher.dispatch(TopicAction::Reset);
        let guards = match parsed {
            Ok(topic) => {
                let (d, s, cap) = (dispatcher.clone(), dispatcher.clone(), *cap);
                let listener = listen_topic::<T>(
                    client,
                    topic,
                    *echo,
                    move |item| match item {
                        Ok(m) => d.dispatch(TopicAction::Message(m, cap)),
                        Err(e) => d.dispatch(TopicAction::Error(e)),
                    },
                    move |status| s.dispatch(TopicAction::Status(Some(status))),
                );
                let subscription = client.subscribe(topic, false);
                dispatcher.dispatch(TopicAction::Status(client.topic_status(topic)));
                Some((listener, subscription))
            }
            Err(e) => {
                dispatcher.dispatch(TopicAction::Error(e.clone()));
                None
            }
        };
        move || drop(guards)
    });
    let sender = TopicSender { client, topic: (*parsed).clone(), echo, _t: PhantomData };
    UseTopicHandle { sender, state }
}

/// Subscribes to `topic` while mounted and calls `on_message` with each
/// message, deserialized into `T`, or with an error about the topic (a
/// payload that is not a `T`, a refused subscribe, a gap): for apps that keep
/// their own state. Nothing is stored and the component does not re-render
/// on messages. The latest `on_message` is always the one called. Returns
/// how to publish to the topic ([`TopicOptions::cap`] is not used).
#[hook]
pub fn use_topic_callback<T>(
    topic: &str,
    options: TopicOptions,
    on_message: Callback<Result<Rc<Received<T>>, ClientError>>,
) -> TopicSender<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    let client = use_crosswire();
    let parsed = use_memo(topic.to_owned(), |name| Topic::new(name).map_err(ClientError::from));
    let latest = use_mut_ref(|| on_message.clone());
    *latest.borrow_mut() = on_message;
    let echo = options.echo;
    use_effect_with((client.clone(), (*parsed).clone(), echo), move |(client, parsed, echo)| {
        let guards = match parsed {
            Ok(topic) => {
                let cb = latest.clone();
                let listener =
                    listen_topic::<T>(client, topic, *echo, move |item| cb.borrow().clone().emit(item), |_| {});
                Some((listener, client.subscribe(topic, false)))
            }
            Err(e) => {
                latest.borrow().emit(Err(e.clone()));
                None
            }
        };
        move || drop(guards)
    });
    TopicSender { client, topic: (*parsed).clone(), echo, _t: PhantomData }
}
