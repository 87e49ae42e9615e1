//! The Yew hooks: connection status, typed topics, presence.

use std::{marker::PhantomData, rc::Rc};

use crosswire_shared::{PeerId, PresenceEntry, Topic};
use serde::{de::DeserializeOwned, Serialize};
use yew::prelude::*;

use crate::{AckFuture, ClientError, Crosswire, CrosswireContext, Event, Status, TopicStatus};

/// How many messages a [`use_topic`] handle keeps (the oldest go first).
const HISTORY: usize = 1_000;
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
/// events. Subscribes to the topic (with presence) while mounted.
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

/// A message received by [`use_topic`], its payload deserialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Received<T> {
    /// The message's seq within the topic.
    pub seq: u64,
    /// Who published it.
    pub from: PeerId,
    /// The payload.
    pub data: T,
}

/// What [`use_topic`] keeps per component.
struct TopicState<T> {
    messages: Vec<Rc<Received<T>>>,
    errors: Vec<ClientError>,
    status: Option<TopicStatus>,
}

impl<T> Default for TopicState<T> {
    fn default() -> Self {
        Self { messages: Vec::new(), errors: Vec::new(), status: None }
    }
}

impl<T> Clone for TopicState<T> {
    fn clone(&self) -> Self {
        Self { messages: self.messages.clone(), errors: self.errors.clone(), status: self.status.clone() }
    }
}

enum TopicAction<T> {
    Reset,
    Message(Received<T>),
    Error(ClientError),
    Status(Option<TopicStatus>),
    Clear,
}

impl<T: 'static> Reducible for TopicState<T> {
    type Action = TopicAction<T>;

    fn reduce(self: Rc<Self>, action: Self::Action) -> Rc<Self> {
        let mut state = Rc::unwrap_or_clone(self);
        match action {
            TopicAction::Reset => state = TopicState::default(),
            TopicAction::Message(m) => {
                if state.messages.len() >= HISTORY {
                    state.messages.remove(0);
                }
                state.messages.push(Rc::new(m));
            }
            TopicAction::Error(e) => {
                if state.errors.len() >= ERRORS {
                    state.errors.remove(0);
                }
                state.errors.push(e);
            }
            TopicAction::Status(s) => state.status = s,
            TopicAction::Clear => {
                state.messages.clear();
                state.errors.clear();
            }
        }
        Rc::new(state)
    }
}

/// The handle [`use_topic`] returns: what arrived, and how to publish.
pub struct UseTopicHandle<T: 'static> {
    client: Crosswire,
    topic: Result<Topic, ClientError>,
    state: UseReducerHandle<TopicState<T>>,
    _t: PhantomData<T>,
}

impl<T> Clone for UseTopicHandle<T> {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), topic: self.topic.clone(), state: self.state.clone(), _t: PhantomData }
    }
}

impl<T> PartialEq for UseTopicHandle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.client == other.client && self.topic == other.topic && std::ptr::eq(&*self.state, &*other.state)
    }
}

impl<T> std::fmt::Debug for UseTopicHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UseTopicHandle")
            .field("topic", &self.topic)
            .field("messages", &self.state.messages.len())
            .field("status", &self.state.status)
            .finish()
    }
}

impl<T: Serialize + 'static> UseTopicHandle<T> {
    /// The topic, unless its name was invalid (then [`Self::errors`] says why).
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref().ok()
    }

    /// The messages received since the component mounted (or the topic
    /// changed), oldest first; the most recent 1 000 are kept.
    pub fn messages(&self) -> &[Rc<Received<T>>] {
        &self.state.messages
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

    /// Publishes `data` to the topic's other subscribers; queued while
    /// offline. Failures show up in [`Self::errors`].
    pub fn publish(&self, data: T) {
        let result = match &self.topic {
            Ok(topic) => self.client.publish(topic, &data),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = result {
            self.state.dispatch(TopicAction::Error(e));
        }
    }

    /// Publishes `data` and resolves to the seq the server assigned, or the error.
    pub fn publish_with_ack(&self, data: T) -> AckFuture {
        match &self.topic {
            Ok(topic) => self.client.publish_with_ack(topic, &data),
            Err(e) => AckFuture::ready(Err(e.clone())),
        }
    }

    /// Forgets the messages and errors received so far.
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

/// Subscribes to `topic` while the component is mounted and collects its
/// messages, deserialized into `T`. Components using the same topic share one
/// subscription; the last one to unmount unsubscribes. A payload that does not
/// deserialize into `T` is reported in [`UseTopicHandle::errors`].
#[hook]
pub fn use_topic<T>(topic: &str) -> UseTopicHandle<T>
where
    T: Serialize + DeserializeOwned + 'static,
{
    let client = use_crosswire();
    let state = use_reducer(TopicState::<T>::default);
    let parsed = use_memo(topic.to_owned(), |name| Topic::new(name).map_err(ClientError::from));
    let dispatcher = state.dispatcher();
    use_effect_with((client.clone(), (*parsed).clone()), move |(client, parsed)| {
        dispatcher.dispatch(TopicAction::Reset);
        let guards = match parsed {
            Ok(topic) => {
                let t = topic.clone();
                let d = dispatcher.clone();
                let listener = client.listen(move |event| match event {
                    Event::Message(m) if m.topic == t => match m.decode::<T>() {
                        Ok(data) => {
                            d.dispatch(TopicAction::Message(Received { seq: m.seq, from: m.from.clone(), data }))
                        }
                        Err(e) => d.dispatch(TopicAction::Error(e)),
                    },
                    Event::Topic { topic, status } if *topic == t => {
                        d.dispatch(TopicAction::Status(Some(status.clone())))
                    }
                    Event::Error(e) if error_topic(e) == Some(&t) => d.dispatch(TopicAction::Error(e.clone())),
                    _ => {}
                });
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
    UseTopicHandle { client, topic: (*parsed).clone(), state, _t: PhantomData }
}
