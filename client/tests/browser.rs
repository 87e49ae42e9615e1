//! Browser tests: the client in headless Chromium against a real crosswire
//! server. `scripts/browser-tests.sh` starts the server and a TCP proxy in
//! front of it (tests/browser/proxy.mjs) and passes their addresses at compile
//! time:
//!
//! - `CROSSWIRE_TEST_WS`: the server's WebSocket URL through the proxy,
//! - `CROSSWIRE_TEST_WS_DIRECT`: the server's WebSocket URL,
//! - `CROSSWIRE_TEST_CONTROL`: the proxy's control endpoint (`/cut`, `/block`, `/unblock`, ...),
//! - `CROSSWIRE_TEST_WS_AUTH` and `CROSSWIRE_TEST_TOKEN`: a server started with
//!   `--jwt-secret` and a valid token for it (allowed only `test:*` topics);
//!   empty when the server has no token auth.
#![cfg(target_arch = "wasm32")]

use std::{
    cell::{Cell, RefCell},
    future::Future,
    rc::Rc,
};

use crosswire_client::{
    use_status, use_topic, ClientConfig, ClientError, Crosswire, CrosswireProvider, Event, Listener, Status,
    Subscription, TokenRefresher, Topic, TopicStatus,
};
use gloo_timers::future::TimeoutFuture;
use serde::{Deserialize, Serialize};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;
use yew::prelude::*;

wasm_bindgen_test_configure!(run_in_browser);

fn env(value: Option<&'static str>, name: &str) -> &'static str {
    value.unwrap_or_else(|| panic!("{name} is not set: run the browser tests with scripts/browser-tests.sh"))
}

fn proxied() -> &'static str {
    env(option_env!("CROSSWIRE_TEST_WS"), "CROSSWIRE_TEST_WS")
}

fn direct() -> &'static str {
    env(option_env!("CROSSWIRE_TEST_WS_DIRECT"), "CROSSWIRE_TEST_WS_DIRECT")
}

/// Calls the proxy's control endpoint; returns its JSON answer.
async fn control(path: &str) -> serde_json::Value {
    let url = format!("{}{path}", env(option_env!("CROSSWIRE_TEST_CONTROL"), "CROSSWIRE_TEST_CONTROL"));
    let window = web_sys::window().unwrap();
    let response = JsFuture::from(window.fetch_with_str(&url)).await.expect("the proxy's control endpoint answers");
    let response: web_sys::Response = wasm_bindgen::JsCast::dyn_into(response).unwrap();
    assert!(response.ok(), "{url}: {}", response.status());
    let text = JsFuture::from(response.text().unwrap()).await.unwrap().as_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The request lines the proxy saw that contain `needle`.
async fn requests_with(needle: &str) -> Vec<String> {
    let answer = control("/requests").await;
    answer["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .filter(|r| r.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// A topic no other test uses.
fn fresh_topic(name: &str) -> Topic {
    let n = (js_sys::Math::random() * 1e9) as u64;
    Topic::new(&format!("test:{name}:{n}")).unwrap()
}

/// Quick reconnects, so the tests do not wait on production backoff.
fn config() -> ClientConfig {
    ClientConfig {
        backoff: crosswire_client::BackoffConfig { min_ms: 100, max_ms: 500, factor: 2.0, min_uptime_ms: 5_000 },
        ..ClientConfig::default()
    }
}

/// Polls `check` every 20 ms until it holds, for at most `ms`.
async fn wait_until(what: &str, ms: u32, mut check: impl FnMut() -> bool) {
    let mut waited = 0;
    while !check() {
        assert!(waited < ms, "timed out after {ms} ms waiting for {what}");
        TimeoutFuture::new(20).await;
        waited += 20;
    }
}

/// Awaits `fut` for at most `ms`.
async fn within<T: 'static>(what: &str, ms: u32, fut: impl Future<Output = T> + 'static) -> T {
    let slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let v = fut.await;
        *s.borrow_mut() = Some(v);
    });
    wait_until(what, ms, || slot.borrow().is_some()).await;
    let v = slot.borrow_mut().take().unwrap();
    v
}

/// Records every event a client reports.
struct Recorder {
    events: Rc<RefCell<Vec<Event>>>,
    _listener: Listener,
}

impl Recorder {
    fn new(client: &Crosswire) -> Self {
        let events = Rc::new(RefCell::new(Vec::new()));
        let e = events.clone();
        Self { events, _listener: client.listen(move |ev| e.borrow_mut().push(ev.clone())) }
    }

    fn messages(&self, topic: &Topic) -> Vec<(u64, String, String)> {
        self.events
            .borrow()
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) if &m.topic == topic => Some((m.seq, m.from.clone(), m.data.get().to_owned())),
                _ => None,
            })
            .collect()
    }

    fn saw(&self, f: impl Fn(&Event) -> bool) -> bool {
        self.events.borrow().iter().any(f)
    }
}

fn peer(client: &Crosswire) -> String {
    match client.status() {
        Status::Open { peer } => peer,
        s => panic!("not open: {s:?}"),
    }
}

async fn open(client: &Crosswire) {
    for _ in 0..250 {
        if client.status().is_open() {
            return;
        }
        TimeoutFuture::new(20).await;
    }
    panic!("{} did not open within 5 s: {:?}", client.url(), client.status());
}

async fn live(client: &Crosswire, topic: &Topic) {
    open(client).await;
    for _ in 0..250 {
        if client.topic_status(topic).is_some_and(|s| s.is_live()) {
            return;
        }
        TimeoutFuture::new(20).await;
    }
    panic!("{topic} on {} not live within 5 s: {:?} {:?}", client.url(), client.topic_status(topic), client.status());
}

/// Two clients live on `topic`: `a` through the proxy the tests can cut, `b`
/// straight to the server, and a recorder of what `a` sees.
struct LivePair {
    a: Crosswire,
    b: Crosswire,
    ra: Recorder,
    _sa: Subscription,
    _sb: Subscription,
}

async fn live_pair(topic: &Topic) -> LivePair {
    let a = Crosswire::new(proxied(), config());
    let b = Crosswire::new(direct(), config());
    let ra = Recorder::new(&a);
    let _sa = a.subscribe(topic, false);
    let _sb = b.subscribe(topic, false);
    live(&a, topic).await;
    live(&b, topic).await;
    LivePair { a, b, ra, _sa, _sb }
}

#[wasm_bindgen_test]
async fn connects_and_closes() {
    let client = Crosswire::new(direct(), config());
    assert!(matches!(client.status(), Status::Connecting { attempt: 0 }));
    open(&client).await;
    assert!(!peer(&client).is_empty());
    client.close();
    assert!(matches!(client.status(), Status::Closed { code: Some(1000), .. }));
}

#[wasm_bindgen_test]
async fn subscribe_publish_receive() {
    let topic = fresh_topic("pubsub");
    let a = Crosswire::new(direct(), config());
    let b = Crosswire::new(direct(), config());
    let (ra, rb) = (Recorder::new(&a), Recorder::new(&b));
    let _sa = a.subscribe(&topic, false);
    let _sb = b.subscribe(&topic, false);
    live(&a, &topic).await;
    live(&b, &topic).await;

    let seq = within("the ack", 5_000, a.publish_with_ack(&topic, &serde_json::json!({ "text": "hello" }))).await;
    let seq = seq.expect("the server acknowledges the publish");
    wait_until("b to receive", 5_000, || !rb.messages(&topic).is_empty()).await;
    assert_eq!(rb.messages(&topic), vec![(seq, peer(&a), r#"{"text":"hello"}"#.to_owned())]);

    // Fire-and-forget the other way; the sender never gets its own message.
    b.publish(&topic, "back").unwrap();
    wait_until("a to receive", 5_000, || !ra.messages(&topic).is_empty()).await;
    assert_eq!(ra.messages(&topic), vec![(seq + 1, peer(&b), r#""back""#.to_owned())]);
    assert_eq!(rb.messages(&topic).len(), 1);
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn reconnects_and_resubscribes_after_the_server_drops_the_connection() {
    let topic = fresh_topic("reconnect");
    let LivePair { a, b, ra, _sa, _sb } = live_pair(&topic).await;
    let first_peer = peer(&a);

    control("/cut").await;
    wait_until("a to notice the drop", 5_000, || ra.saw(|e| matches!(e, Event::Status(Status::Reconnecting { .. }))))
        .await;
    open(&a).await;
    live(&a, &topic).await;
    assert_ne!(peer(&a), first_peer, "a new connection");
    assert!(ra.saw(|e| matches!(e, Event::Topic { status: TopicStatus::Subscribing, .. })));

    b.publish(&topic, "after").unwrap();
    wait_until("a to receive after reconnecting", 5_000, || !ra.messages(&topic).is_empty()).await;
    assert_eq!(ra.messages(&topic)[0].2, r#""after""#);
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn a_silent_connection_is_detected_by_the_heartbeat() {
    // The proxy stops forwarding but keeps the TCP connection: the browser
    // sees nothing wrong, only the missing pong tells.
    let topic = fresh_topic("heartbeat");
    let a = Crosswire::new(proxied(), ClientConfig { heartbeat_ms: Some(200), pong_timeout_ms: 300, ..config() });
    let ra = Recorder::new(&a);
    let _sa = a.subscribe(&topic, false);
    live(&a, &topic).await;
    let first_peer = peer(&a);
    control("/freeze").await;
    wait_until("the heartbeat timeout", 5_000, || {
        ra.saw(|e| matches!(e, Event::Status(Status::Reconnecting { code: Some(3008), .. })))
    })
    .await;
    open(&a).await;
    live(&a, &topic).await;
    assert_ne!(peer(&a), first_peer);
    a.close();
}

#[wasm_bindgen_test]
async fn publishes_made_offline_are_flushed_with_their_acks() {
    let topic = fresh_topic("offline");
    let a = Crosswire::new(proxied(), config());
    let b = Crosswire::new(direct(), config());
    let rb = Recorder::new(&b);
    let _sb = b.subscribe(&topic, false);
    open(&a).await;
    live(&b, &topic).await;

    control("/block").await;
    control("/cut").await;
    wait_until("a to go offline", 5_000, || !a.status().is_open()).await;
    let acks: Vec<_> = (1..=3).map(|i| a.publish_with_ack(&topic, &i)).collect();
    TimeoutFuture::new(300).await; // a retry or two, refused by the proxy
    assert!(rb.messages(&topic).is_empty());
    control("/unblock").await;
    let mut seqs = Vec::new();
    for ack in acks {
        seqs.push(within("a flushed ack", 10_000, ack).await.expect("acknowledged after the flush"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "flushed in order: {seqs:?}");
    wait_until("b to receive the flushed publishes", 5_000, || rb.messages(&topic).len() == 3).await;
    let data: Vec<_> = rb.messages(&topic).into_iter().map(|m| m.2).collect();
    assert_eq!(data, ["1", "2", "3"]);
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn a_full_offline_queue_reports_the_dropped_publish() {
    let topic = fresh_topic("overflow");
    control("/block").await;
    let a = Crosswire::new(proxied(), ClientConfig { queue_capacity: 2, ..config() });
    let ra = Recorder::new(&a);
    let first = a.publish_with_ack(&topic, &1);
    let _second = a.publish_with_ack(&topic, &2);
    let _third = a.publish_with_ack(&topic, &3);
    let dropped = within("the dropped publish's future", 1_000, first).await;
    control("/unblock").await;
    assert_eq!(dropped, Err(ClientError::QueueOverflow { topic: topic.clone() }));
    assert!(ra.saw(|e| matches!(e, Event::Error(ClientError::QueueOverflow { .. }))));
    a.close();
}

#[wasm_bindgen_test]
async fn a_failed_handshake_backs_off_instead_of_looping() {
    // A path the server does not upgrade: the handshake fails before opening,
    // the client probes over HTTP, then schedules a retry.
    let url = format!("{}-nope", direct());
    let a = Crosswire::new(&url, config());
    wait_until("a scheduled retry", 5_000, || matches!(a.status(), Status::Reconnecting { attempt: 1, .. })).await;
    a.close();
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
struct Chat {
    text: String,
}

#[derive(Properties, PartialEq)]
struct RoomProps {
    topic: AttrValue,
}

#[component]
fn Room(props: &RoomProps) -> Html {
    let status = use_status();
    let chat = use_topic::<Chat>(&props.topic);
    html! {
        <div>
            <p class="status">{ status.name() }</p>
            <p class="topic">{ chat.status().map(|s| if s.is_live() { "live" } else { "not live" }).unwrap_or("none") }</p>
            <ul class="messages">{ for chat.messages().iter().map(|m| html! { <li>{ &m.data.text }</li> }) }</ul>
            <ul class="errors">{ for chat.errors().iter().map(|e| html! { <li>{ e.to_string() }</li> }) }</ul>
        </div>
    }
}

#[derive(Properties, PartialEq)]
struct AppProps {
    url: AttrValue,
    topic: AttrValue,
}

#[component]
fn App(props: &AppProps) -> Html {
    html! {
        <CrosswireProvider url={props.url.clone()} config={config()}>
            <Room topic={props.topic.clone()} />
            <Room topic={props.topic.clone()} />
        </CrosswireProvider>
    }
}

#[wasm_bindgen_test]
async fn the_yew_hooks_render_status_messages_and_payload_errors() {
    let topic = fresh_topic("yew");
    let document = web_sys::window().unwrap().document().unwrap();
    let root = document.create_element("div").unwrap();
    document.body().unwrap().append_child(&root).unwrap();
    let app = yew::Renderer::<App>::with_root_and_props(
        root.clone(),
        AppProps { url: direct().into(), topic: topic.as_str().to_owned().into() },
    )
    .render();
    let text = |sel: &str| -> Vec<String> {
        let list = root.query_selector_all(sel).unwrap();
        (0..list.length()).map(|i| list.get(i).unwrap().text_content().unwrap_or_default()).collect()
    };
    wait_until("both rooms to go live", 5_000, || text(".topic") == ["live", "live"]).await;
    assert_eq!(text(".status"), ["open", "open"]);

    let other = Crosswire::new(direct(), config());
    open(&other).await;
    other.publish(&topic, &Chat { text: "typed".into() }).unwrap();
    other.publish(&topic, &42).unwrap();
    wait_until("the message in both rooms", 5_000, || text(".messages li").len() == 2).await;
    assert_eq!(text(".messages li"), ["typed", "typed"]);
    wait_until("the payload error in both rooms", 5_000, || text(".errors li").len() == 2).await;
    assert!(text(".errors li")[0].contains("does not match the expected type"), "{:?}", text(".errors li"));

    // Unmounting closes the shared connection.
    app.destroy();
    other.close();
}

#[wasm_bindgen_test]
async fn a_refused_token_is_reported_refreshed_and_retried_only_at_max_backoff() {
    // The proxy answers every handshake (and the client's HTTP probe) with 401,
    // as the server does for an invalid token.
    control("/refuse?status=401").await;
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let refresher = TokenRefresher::new(move || {
        let c = c.clone();
        async move {
            c.set(c.get() + 1);
            Ok::<_, String>(format!("fresh{}", c.get()))
        }
    });
    let a = Crosswire::new(proxied(), config().with_token("stale").with_token_refresher(refresher));
    wait_until("unauthorized", 5_000, || matches!(a.status(), Status::Unauthorized { retry_at: Some(_), .. })).await;
    let Status::Unauthorized { retry_at: Some(at), .. } = a.status() else { unreachable!() };
    let now = js_sys::Date::now() as u64;
    assert!(
        at > now && at <= now + 500,
        "retries at the max backoff (500 ms here), not sooner: {}",
        at.saturating_sub(now)
    );
    assert!(!requests_with("GET /_ws?token=stale").await.is_empty(), "the first handshake carried the token");

    // Still refused a while later: retries happen at the max backoff, never in a fast loop.
    TimeoutFuture::new(1_200).await;
    let tries = requests_with("token=").await.len();
    assert!(tries <= 12, "{tries} requests in ~1.2 s");
    assert!(calls.get() >= 1, "the refresher ran before retrying");

    control("/accept").await;
    open(&a).await;
    let last = requests_with("GET /_ws?token=fresh").await;
    assert!(!last.is_empty(), "reconnected with a refreshed token: {:?}", requests_with("token=").await);
    a.close();
}

#[derive(Properties, PartialEq)]
struct RoomsProps {
    url: AttrValue,
    topic: AttrValue,
    rooms: usize,
}

#[component]
fn Rooms(props: &RoomsProps) -> Html {
    html! {
        <CrosswireProvider url={props.url.clone()} config={config()}>
            { for (0..props.rooms).map(|_| html! { <Room topic={props.topic.clone()} /> }) }
        </CrosswireProvider>
    }
}

#[wasm_bindgen_test]
async fn components_share_a_subscription_and_the_last_unmount_unsubscribes() {
    let topic = fresh_topic("shared");
    // An observer watching who is subscribed.
    let observer = Crosswire::new(direct(), config());
    let _watch = observer.subscribe(&topic, true);
    live(&observer, &topic).await;
    let present = || observer.presence(&topic).map_or(0, |p| p.len());
    wait_until("the observer in its own presence list", 5_000, || present() == 1).await;

    let document = web_sys::window().unwrap().document().unwrap();
    let root = document.create_element("div").unwrap();
    document.body().unwrap().append_child(&root).unwrap();
    let props = |rooms| RoomsProps { url: direct().into(), topic: topic.as_str().to_owned().into(), rooms };
    let mut app = yew::Renderer::<Rooms>::with_root_and_props(root.clone(), props(2)).render();
    wait_until("the app's connection to join", 5_000, || present() == 2).await;

    // One of the two components unmounts: the shared subscription stays.
    app.update(props(1));
    TimeoutFuture::new(300).await;
    assert_eq!(present(), 2);
    // The last one unmounts: the app unsubscribes (its connection stays open).
    app.update(props(0));
    wait_until("the app to leave the topic", 5_000, || present() == 1).await;
    app.destroy();
    observer.close();
}

#[wasm_bindgen_test]
async fn missed_messages_are_recovered_after_a_drop_and_none_arrive_twice() {
    let topic = fresh_topic("recovery");
    let LivePair { a, b, ra, _sa, _sb } = live_pair(&topic).await;
    b.publish(&topic, &0).unwrap();
    wait_until("the first message", 5_000, || ra.messages(&topic).len() == 1).await;

    control("/block").await;
    control("/cut").await;
    wait_until("a to go offline", 5_000, || !a.status().is_open()).await;
    for i in 1..=3 {
        within("b's ack", 5_000, b.publish_with_ack(&topic, &i)).await.unwrap();
    }
    control("/unblock").await;
    live(&a, &topic).await;
    wait_until("the missed messages", 5_000, || ra.messages(&topic).len() == 4).await;
    TimeoutFuture::new(200).await; // room for duplicates, if any
    let data: Vec<String> = ra.messages(&topic).into_iter().map(|m| m.2).collect();
    assert_eq!(data, ["0", "1", "2", "3"]);
    assert!(
        matches!(a.topic_status(&topic), Some(TopicStatus::Live { recovered: true, .. })),
        "{:?}",
        a.topic_status(&topic)
    );
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn the_server_refuses_a_bad_token_then_accepts_the_refreshed_one_and_enforces_its_permissions() {
    let (Some(url), Some(token)) = (option_env!("CROSSWIRE_TEST_WS_AUTH"), option_env!("CROSSWIRE_TEST_TOKEN")) else {
        panic!("CROSSWIRE_TEST_WS_AUTH is not set: run the browser tests with scripts/browser-tests.sh");
    };
    if url.is_empty() {
        return; // this server build has no token auth
    }
    let good = token.to_owned();
    let refresher = TokenRefresher::new(move || {
        let token = good.clone();
        async move { Ok::<_, String>(token) }
    });
    let a = Crosswire::new(url, config().with_token("not-a-jwt").with_token_refresher(refresher));
    let ra = Recorder::new(&a);
    // The handshake fails; the HTTP probe reads the server's 401.
    wait_until("Unauthorized", 5_000, || {
        ra.saw(|e| matches!(e, Event::Status(Status::Unauthorized { retry_at: Some(_), .. })))
    })
    .await;
    // At the (test's) max backoff the refresher supplies a valid token.
    open(&a).await;

    let allowed = fresh_topic("auth");
    let _ok = a.subscribe(&allowed, false);
    live(&a, &allowed).await;
    let secret = Topic::new("secret:plans").unwrap();
    let _denied = a.subscribe(&secret, false);
    wait_until("the refused subscription", 5_000, || matches!(a.topic_status(&secret), Some(TopicStatus::Refused(_))))
        .await;
    let refused = within("the refused publish", 5_000, a.publish_with_ack(&secret, "leak")).await;
    assert!(
        matches!(&refused, Err(ClientError::Server { code: crosswire_client::ErrorCode::Forbidden, .. })),
        "{refused:?}"
    );
    assert!(within("an allowed publish", 5_000, a.publish_with_ack(&allowed, "fine")).await.is_ok());
    a.close();
}

// ---- Tokens that expire, with a refresher (issue 9) ----

/// The auth server's URL and a long-lived token for it, unless this server
/// build has no token auth.
fn auth_server() -> Option<(&'static str, &'static str)> {
    let (Some(url), Some(token)) = (option_env!("CROSSWIRE_TEST_WS_AUTH"), option_env!("CROSSWIRE_TEST_TOKEN")) else {
        panic!("CROSSWIRE_TEST_WS_AUTH is not set: run the browser tests with scripts/browser-tests.sh");
    };
    (!url.is_empty()).then_some((url, token))
}

/// A refresher that gets tokens valid for `exp_in` seconds from the proxy's
/// `/token` endpoint (what an app's token endpoint does), counting its calls.
fn counting_refresher(exp_in: u32) -> (TokenRefresher, Rc<Cell<u32>>) {
    let calls = Rc::new(Cell::new(0u32));
    let c = calls.clone();
    let refresher = TokenRefresher::new(move || {
        c.set(c.get() + 1);
        async move {
            let answer = control(&format!("/token?exp_in={exp_in}")).await;
            answer["token"].as_str().map(str::to_owned).ok_or_else(|| format!("no token in {answer}"))
        }
    });
    (refresher, calls)
}

/// `b` publishes 1..=n on `topic`, one every `every_ms`; returns when done.
async fn publish_slowly(b: &Crosswire, topic: &Topic, n: u32, every_ms: u32) {
    for i in 1..=n {
        b.publish(topic, &i).unwrap();
        TimeoutFuture::new(every_ms).await;
    }
}

fn numbers(r: &Recorder, topic: &Topic) -> Vec<u32> {
    r.messages(topic).into_iter().map(|m| m.2.parse().unwrap()).collect()
}

#[wasm_bindgen_test]
async fn an_expiring_token_is_replaced_by_reconnecting_at_once_and_no_message_is_lost() {
    let Some((url, long)) = auth_server() else { return };
    let (refresher, calls) = counting_refresher(2);
    // No token given: the first connect asks the refresher too. Refresh in
    // place is off, so each expiry is a 4001 close and a reconnect.
    let a = Crosswire::new(url, ClientConfig { refresh_in_place: false, ..config() }.with_token_refresher(refresher));
    let b = Crosswire::new(url, config().with_token(long));
    let ra = Recorder::new(&a);
    let topic = fresh_topic("expiry");
    let (_sa, _sb) = (a.subscribe(&topic, false), b.subscribe(&topic, false));
    live(&a, &topic).await;
    live(&b, &topic).await;
    assert_eq!(calls.get(), 1, "the first connect used the refresher");
    publish_slowly(&b, &topic, 40, 100).await; // 4 s: past at least one expiry
    wait_until("every message", 10_000, || ra.messages(&topic).len() >= 40).await;
    TimeoutFuture::new(200).await; // room for duplicates, if any
    assert_eq!(numbers(&ra, &topic), (1..=40).collect::<Vec<_>>(), "in order, none lost, none twice");
    assert!(ra.saw(|e| matches!(e, Event::Status(Status::Reconnecting { code: Some(4001), .. }))), "4001 seen");
    assert!(calls.get() >= 2, "a new token for each reconnect: {} calls", calls.get());
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn a_token_is_refreshed_over_the_open_connection_before_it_expires() {
    let Some((url, long)) = auth_server() else { return };
    let (refresher, calls) = counting_refresher(3);
    let a = Crosswire::new(url, config().with_token_refresher(refresher));
    let b = Crosswire::new(url, config().with_token(long));
    let ra = Recorder::new(&a);
    let topic = fresh_topic("in-place");
    let (_sa, _sb) = (a.subscribe(&topic, false), b.subscribe(&topic, false));
    live(&a, &topic).await;
    live(&b, &topic).await;
    let first_peer = peer(&a);
    publish_slowly(&b, &topic, 50, 100).await; // 5 s: tokens last 2–3 s
    wait_until("every message", 10_000, || ra.messages(&topic).len() >= 50).await;
    assert_eq!(numbers(&ra, &topic), (1..=50).collect::<Vec<_>>());
    assert!(calls.get() >= 3, "refreshed in place at least twice: {} calls", calls.get());
    assert!(!ra.saw(|e| matches!(e, Event::Status(Status::Reconnecting { .. }))), "never reconnected");
    assert_eq!(peer(&a), first_peer, "the same connection throughout");
    a.close();
    b.close();
}

#[wasm_bindgen_test]
async fn without_a_refresher_an_expired_token_is_final_and_publishes_fail_at_once() {
    let Some((url, _)) = auth_server() else { return };
    let token = control("/token?exp_in=2").await["token"].as_str().unwrap().to_owned();
    let a = Crosswire::new(url, config().with_token(token));
    // Recorded, not polled: on a busy machine the connection can open and be
    // closed for the expiry between two looks at its status.
    let ra = Recorder::new(&a);
    wait_until("the 4001", 8_000, || matches!(a.status(), Status::Unauthorized { retry_at: None, .. })).await;
    assert!(ra.saw(|e| matches!(e, Event::Status(Status::Open { .. }))), "it was open before the token expired");
    let started = js_sys::Date::now();
    let result = within("the failed publish", 1_000, a.publish_with_ack(&fresh_topic("late"), &1)).await;
    assert!(matches!(result, Err(ClientError::Ended { code: Some(4001), .. })), "{result:?}");
    assert!(js_sys::Date::now() - started < 500.0, "at once, not after a timeout");
    a.close();
}

// ---- Acks always end; the offline event ----

#[wasm_bindgen_test]
async fn an_ack_times_out_while_offline() {
    control("/block").await;
    let a = Crosswire::new(proxied(), ClientConfig { ack_timeout_ms: 500, ..config() });
    let started = js_sys::Date::now();
    let result = within("the ack", 3_000, a.publish_with_ack(&fresh_topic("offline-ack"), &1)).await;
    control("/unblock").await;
    assert_eq!(result, Err(ClientError::AckTimeout(500)));
    let took = js_sys::Date::now() - started;
    assert!((450.0..2_000.0).contains(&took), "resolved after {took} ms");
    a.close();
}

#[wasm_bindgen_test]
async fn the_browsers_offline_event_checks_the_connection_at_once() {
    // The path goes dead silently; the heartbeat (25 s from the server) would
    // take long, the offline event makes the client ask at once.
    let topic = fresh_topic("offline-event");
    let a = Crosswire::new(proxied(), ClientConfig { offline_ping_timeout_ms: 300, ..config() });
    let ra = Recorder::new(&a);
    let _sa = a.subscribe(&topic, false);
    live(&a, &topic).await;
    let first_peer = peer(&a);
    control("/freeze").await;
    let window = web_sys::window().unwrap();
    window.dispatch_event(&web_sys::Event::new("offline").unwrap()).unwrap();
    wait_until("the dead connection to be noticed", 3_000, || {
        ra.saw(|e| matches!(e, Event::Status(Status::Reconnecting { code: Some(3008), .. })))
    })
    .await;
    live(&a, &topic).await;
    assert_ne!(peer(&a), first_peer);
    a.close();
}

// ---- History, local echo, SSR + hydration ----

#[wasm_bindgen_test]
async fn history_returns_retained_messages_without_subscribing() {
    let topic = fresh_topic("history");
    let b = Crosswire::new(direct(), config());
    open(&b).await;
    // A topic retains history once someone holds its epoch.
    let _sb = b.subscribe(&topic, false);
    live(&b, &topic).await;
    let mut seqs = Vec::new();
    for i in 1..=5 {
        seqs.push(within("b's ack", 5_000, b.publish_with_ack(&topic, &i)).await.unwrap());
    }
    let a = Crosswire::new(direct(), config());
    let ra = Recorder::new(&a);
    let latest = within("history", 5_000, a.history(&topic, None, Some(3))).await.unwrap();
    let got: Vec<(u64, String)> = latest.messages.iter().map(|m| (m.seq, m.data.get().to_owned())).collect();
    assert_eq!(got, vec![(seqs[2], "3".into()), (seqs[3], "4".into()), (seqs[4], "5".into())]);
    let since = crosswire_client::Since { epoch: latest.epoch.clone(), seq: seqs[0] };
    let page = within("history since", 5_000, a.history(&topic, Some(since), Some(2))).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![seqs[1], seqs[2]]);
    let gone = crosswire_client::Since { epoch: "another-epoch".into(), seq: 1 };
    let refused = within("refused history", 5_000, a.history(&topic, Some(gone), None)).await;
    assert!(
        matches!(&refused, Err(ClientError::Server { code: crosswire_client::ErrorCode::HistoryUnavailable, .. })),
        "{refused:?}"
    );
    assert!(ra.messages(&topic).is_empty(), "reading is not subscribing");
    a.close();
    b.close();
}

#[derive(Properties, PartialEq)]
struct EchoRoomProps {
    name: AttrValue,
    topic: AttrValue,
    echo: bool,
}

#[component]
fn EchoRoom(props: &EchoRoomProps) -> Html {
    let options = crosswire_client::TopicOptions { echo: props.echo, ..Default::default() };
    let chat = crosswire_client::use_topic_with::<Chat>(&props.topic, options);
    let say = {
        let (chat, name) = (chat.clone(), props.name.to_string());
        Callback::from(move |_| chat.publish(Chat { text: name.clone() }))
    };
    html! {
        <div class={props.name.clone()}>
            <button onclick={say}>{ "say" }</button>
            <ul>{ for chat.messages().iter().map(|m| html! { <li data-seq={m.seq.to_string()}>{ &m.data.text }</li> }) }</ul>
        </div>
    }
}

#[derive(Properties, PartialEq)]
struct EchoAppProps {
    topic: AttrValue,
}

#[component]
fn EchoApp(props: &EchoAppProps) -> Html {
    html! {
        <CrosswireProvider url={direct()} config={config()}>
            <EchoRoom name="one" topic={props.topic.clone()} echo=true />
            <EchoRoom name="two" topic={props.topic.clone()} echo=true />
            <EchoRoom name="quiet" topic={props.topic.clone()} echo=false />
        </CrosswireProvider>
    }
}

#[wasm_bindgen_test]
async fn with_local_echo_two_components_on_one_connection_see_each_others_messages() {
    let topic = fresh_topic("echo");
    let document = web_sys::window().unwrap().document().unwrap();
    let root = document.create_element("div").unwrap();
    document.body().unwrap().append_child(&root).unwrap();
    let app = yew::Renderer::<EchoApp>::with_root_and_props(
        root.clone(),
        EchoAppProps { topic: topic.as_str().to_owned().into() },
    )
    .render();
    let items = |sel: &str| -> Vec<(String, String)> {
        let list = root.query_selector_all(sel).unwrap();
        (0..list.length())
            .map(|i| {
                let el: web_sys::Element = wasm_bindgen::JsCast::dyn_into(list.get(i).unwrap()).unwrap();
                (el.text_content().unwrap_or_default(), el.get_attribute("data-seq").unwrap_or_default())
            })
            .collect()
    };
    let other = Crosswire::new(direct(), config());
    let _so = other.subscribe(&topic, false);
    live(&other, &topic).await;
    wait_until("the app's subscription", 5_000, || root.query_selector(".one button").unwrap().is_some()).await;
    TimeoutFuture::new(300).await; // the app's subscribe reaches the server
    let click = |sel: &str| {
        let button: web_sys::HtmlElement =
            wasm_bindgen::JsCast::dyn_into(root.query_selector(sel).unwrap().unwrap()).unwrap();
        button.click();
    };
    click(".one button");
    wait_until("one's message in both echo rooms", 5_000, || items(".two li").len() == 1).await;
    click(".two button");
    wait_until("two's message in both echo rooms", 5_000, || items(".one li").len() == 2).await;
    let (one, two) = (items(".one li"), items(".two li"));
    assert_eq!(one, two);
    assert_eq!(one.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["one", "two"]);
    assert!(one.iter().all(|(_, seq)| seq.parse::<u64>().is_ok_and(|s| s > 0)), "with their seqs: {one:?}");
    assert!(items(".quiet li").is_empty(), "a handle without echo sees only other connections' messages");
    app.destroy();
    other.close();
}

#[derive(Properties, PartialEq)]
struct HydrateProps {
    url: AttrValue,
}

#[component]
fn StatusLine() -> Html {
    let status = use_status();
    html! { <p class="ssr-status">{ status.name() }</p> }
}

#[component]
fn HydrateApp(props: &HydrateProps) -> Html {
    html! {
        <CrosswireProvider url={props.url.clone()} config={config()}>
            <StatusLine />
        </CrosswireProvider>
    }
}

#[wasm_bindgen_test]
async fn a_server_rendered_page_hydrates_and_only_then_connects() {
    let props = || HydrateProps { url: direct().into() };
    let html = yew::LocalServerRenderer::<HydrateApp>::with_props(props()).render().await;
    assert!(html.contains(">connecting</p>"), "{html}");
    let document = web_sys::window().unwrap().document().unwrap();
    let root = document.create_element("div").unwrap();
    root.set_inner_html(&html);
    document.body().unwrap().append_child(&root).unwrap();
    let app = yew::Renderer::<HydrateApp>::with_root_and_props(root.clone(), props()).hydrate();
    let text = || root.query_selector(".ssr-status").unwrap().and_then(|e| e.text_content()).unwrap_or_default();
    wait_until("the hydrated app to connect", 5_000, || text() == "open").await;
    app.destroy();
}
