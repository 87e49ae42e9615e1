//! A library user's own engine: the trait is all a broker needs to
//! implement. This one wraps the embedded engine and counts what passes
//! through it, the way an adapter to another broker would sit in between.

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use common::*;
use crosswire_server::{
    protocol::{PresenceEntry, ServerFrame, Since, Topic},
    Engine, EngineError, History, MemoryEngine, MemoryLimits, Node, Pending, PubSub, Publication, ReadLimit, Server,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Counting {
    inner: MemoryEngine,
    publishes: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
}

impl Engine for Counting {
    fn start(&self, node: Node, shutdown: CancellationToken) {
        self.inner.start(node, shutdown);
    }

    fn publish<'a>(&'a self, topic: &'a Topic, publication: Publication<'a>) -> Pending<'a, u64> {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.inner.publish(topic, publication)
    }

    fn broadcast(&self, topic: &Topic, from: &str, message: &crosswire_server::Message) {
        self.inner.broadcast(topic, from, message);
    }

    fn read<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Pending<'a, History> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        // An engine that waits on a network answers later: the server must
        // not care which.
        let read = self.inner.read(topic, since, limit, create);
        Pending::later(read)
    }

    fn hold(&self, topic: &Topic) -> Result<(), EngineError> {
        self.inner.hold(topic)
    }

    fn release(&self, topic: &Topic) {
        self.inner.release(topic);
    }

    fn presence_changed(&self, topic: &Topic, who: &PresenceEntry, joined: bool) {
        self.inner.presence_changed(topic, who, joined);
    }

    fn remote_presence<'a>(&'a self, topic: &'a Topic) -> Pending<'a, Vec<PresenceEntry>> {
        self.inner.remote_presence(topic)
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    fn topic_count(&self) -> usize {
        self.inner.topic_count()
    }
}

#[tokio::test]
async fn a_server_runs_on_an_engine_of_the_users_own() {
    let config = config();
    let limits = MemoryLimits::from_config(&config);
    let (publishes, reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let engine =
        Counting { inner: MemoryEngine::new(limits), publishes: Arc::clone(&publishes), reads: Arc::clone(&reads) };
    let server = Server::new(config.clone(), PubSub::new(&config)).with_engine(Arc::new(engine)).bind().await.unwrap();
    let mut sub = Client::connect(server.local_addr()).await;
    let epoch = match sub.subscribe("own").await {
        ServerFrame::Subscribed { epoch, .. } => epoch,
        other => panic!("expected subscribed, got {other:?}"),
    };
    let mut publisher = Client::connect(server.local_addr()).await;
    for i in 1..=3 {
        assert_eq!(publisher.publish("own", json!(i), i).await, i);
        assert_eq!(message_data(&sub.recv().await).0, i);
    }
    // Back with `since`: the replay comes through the engine's (later) read.
    let mut back = Client::connect(server.local_addr()).await;
    back.send(json!({"type": "subscribe", "topic": "own", "since": {"epoch": epoch, "seq": 1}})).await;
    match back.recv().await {
        ServerFrame::Subscribed { recovered: true, seq: 3, .. } => {}
        other => panic!("expected a recovered subscribe, got {other:?}"),
    }
    assert_eq!(message_data(&back.recv().await).0, 2);
    assert_eq!(message_data(&back.recv().await).0, 3);
    assert_eq!(publishes.load(Ordering::Relaxed), 3);
    assert_eq!(reads.load(Ordering::Relaxed), 2, "one read per protocol subscribe");
}
