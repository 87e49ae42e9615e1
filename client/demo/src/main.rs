//! The crosswire demo app: what the reference React client did (a
//! "Websocket messages" heading and the list of received messages), plus the
//! connection status with the reconnect countdown, a topic to join, an input
//! to publish, presence, and errors shown in the page.
//!
//! Built by trunk from the top-level `index.html`; it connects to `/_ws` on
//! the page's own origin, so it works behind `trunk serve` (which proxies
//! `/_ws` to the server) and when the server serves `dist/` itself. A
//! `?token=…` in the page URL is passed on to the server.

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("the crosswire demo runs in the browser: build it with `trunk build` (see the README)");
}

#[cfg(target_arch = "wasm32")]
fn main() {
    yew::Renderer::<app::App>::new().render();
}

#[cfg(target_arch = "wasm32")]
mod app {
    use std::{cell::RefCell, collections::VecDeque, rc::Rc};

    use crosswire_client::{
        url::same_origin_ws, use_crosswire, use_presence, use_status, use_topic_callback, ClientConfig, ClientError,
        CrosswireProvider, Event as CrosswireEvent, PresenceEntry, Received, Status, TopicOptions, TopicSender,
        TopicStatus,
    };
    use gloo_timers::callback::Interval;
    use serde_json::{json, Value};
    use wasm_bindgen_futures::spawn_local;
    use web_sys::HtmlInputElement;
    use yew::prelude::*;

    /// The server's WebSocket path (the same one `Trunk.toml` proxies).
    const WS_PATH: &str = "/_ws";
    /// How many lines the page keeps (the oldest go first).
    const LOG_CAP: usize = 5_000;
    /// How many errors the page keeps: all of them in any real session; the
    /// bound only stops a server that floods errors from growing the page forever.
    const ERROR_CAP: usize = 1_000;

    fn page_config() -> (String, ClientConfig) {
        let location = web_sys::window().map(|w| w.location());
        let get = |f: fn(&web_sys::Location) -> Result<String, wasm_bindgen::JsValue>| {
            location.as_ref().and_then(|l| f(l).ok()).unwrap_or_default()
        };
        let url = same_origin_ws(&get(|l| l.protocol()), &get(|l| l.host()), WS_PATH);
        let token = get(|l| l.search())
            .trim_start_matches('?')
            .split('&')
            .find_map(|kv| kv.strip_prefix("token=").map(str::to_owned));
        let config = ClientConfig::default();
        (
            url,
            match token {
                Some(token) => config.with_token(token),
                None => config,
            },
        )
    }

    #[component]
    pub(crate) fn App() -> Html {
        let setup = use_memo((), |_| page_config());
        let (url, config) = (*setup).clone();
        html! {
            <CrosswireProvider url={url} config={config}>
                <Demo />
            </CrosswireProvider>
        }
    }

    /// One line of the message list: received, or sent by this page.
    #[derive(Clone, PartialEq)]
    struct Line {
        /// Sent lines carry a local id until the ack gives them a seq.
        local_id: Option<u64>,
        seq: Option<u64>,
        from: String,
        text: String,
        mine: bool,
        failed: Option<String>,
    }

    enum LogAction {
        Clear,
        Received(Line),
        Sent(Line),
        Acked(u64, u64),
        Failed(u64, String),
    }

    /// The page's message log. The lines live in one buffer shared by
    /// successive states and changed in place, so a message costs O(1) (not a
    /// copy of the whole log); `version` tells Yew that something changed.
    #[derive(Default)]
    struct Log {
        lines: Rc<RefCell<VecDeque<Line>>>,
        version: u64,
        next_id: u64,
    }

    impl Reducible for Log {
        type Action = LogAction;
        fn reduce(self: Rc<Self>, action: LogAction) -> Rc<Self> {
            let mut next_id = self.next_id;
            let mut lines = self.lines.clone();
            match action {
                LogAction::Clear => lines = Rc::default(),
                LogAction::Received(line) | LogAction::Sent(line) => {
                    if line.local_id.is_some() {
                        next_id += 1;
                    }
                    let mut list = lines.borrow_mut();
                    list.push_back(line);
                    while list.len() > LOG_CAP {
                        list.pop_front();
                    }
                }
                // Sent lines are recent: look from the end.
                LogAction::Acked(id, seq) => {
                    if let Some(l) = lines.borrow_mut().iter_mut().rev().find(|l| l.local_id == Some(id)) {
                        l.seq = Some(seq);
                    }
                }
                LogAction::Failed(id, e) => {
                    if let Some(l) = lines.borrow_mut().iter_mut().rev().find(|l| l.local_id == Some(id)) {
                        l.failed = Some(e);
                    }
                }
            }
            Rc::new(Log { lines, version: self.version + 1, next_id })
        }
    }

    /// Errors shown in the page, newest last; a reducer, so listeners never
    /// hold a stale copy of the list.
    #[derive(Default)]
    struct Errors(VecDeque<String>);

    impl Reducible for Errors {
        type Action = String;
        fn reduce(self: Rc<Self>, error: String) -> Rc<Self> {
            let mut list = self.0.clone();
            list.push_back(error);
            while list.len() > ERROR_CAP {
                list.pop_front();
            }
            Rc::new(Errors(list))
        }
    }

    fn text_of(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Object(o) => match o.get("text") {
                Some(Value::String(s)) => s.clone(),
                _ => v.to_string(),
            },
            _ => v.to_string(),
        }
    }

    fn now() -> u64 {
        js_sys::Date::now() as u64
    }

    fn input_value(e: &Event) -> String {
        e.target_unchecked_into::<HtmlInputElement>().value()
    }

    #[component]
    fn StatusBar() -> Html {
        let client = use_crosswire();
        let status = use_status();
        let now_ms = use_state(now);
        {
            let now_ms = now_ms.setter();
            use_effect_with(status.retry_at(), move |retry_at| {
                let interval = retry_at.map(|_| Interval::new(200, move || now_ms.set(now())));
                move || drop(interval)
            });
        }
        // Read the clock at render time; the interval only triggers renders.
        let current = now().max(*now_ms);
        let countdown = status.retry_at().map(|at| {
            let ms = at.saturating_sub(current);
            format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
        });
        let (label, detail) = match &status {
            Status::Connecting { attempt: 0 } => ("Connecting…".to_owned(), String::new()),
            Status::Connecting { attempt } => ("Connecting…".to_owned(), format!("attempt {attempt}")),
            Status::Open { peer } => ("Open".to_owned(), format!("you are {peer}")),
            Status::Reconnecting { attempt, code, .. } => (
                format!("Reconnecting in {}", countdown.clone().unwrap_or_default()),
                format!("attempt {attempt}{}", code.map(|c| format!(", last close code {c}")).unwrap_or_default()),
            ),
            Status::Unauthorized { reason, .. } => (
                "Unauthorized".to_owned(),
                countdown.clone().map(|c| format!("the server refused the token; retrying in {c}")).unwrap_or_else(
                    || match reason {
                        Some(why) => format!("the token is no longer valid: {why}"),
                        None => "the server refused the token".into(),
                    },
                ),
            ),
            Status::Forbidden { .. } => (
                "Forbidden".to_owned(),
                countdown
                    .clone()
                    .map(|c| format!("the server refused this origin; retrying in {c}"))
                    .unwrap_or_else(|| "the server refused this origin".into()),
            ),
            Status::Closed { code, reason } => {
                ("Closed".to_owned(), format!("{}{reason}", code.map(|c| format!("code {c} ")).unwrap_or_default()))
            }
        };
        let reconnect = {
            let client = client.clone();
            Callback::from(move |_| client.reconnect())
        };
        let can_retry = !status.is_open() && !matches!(status, Status::Connecting { .. });
        html! {
            <div id="status" class={classes!("status", status.name())} data-state={status.name()} data-testid="status">
                <span class="dot"></span>
                <strong id="status-label">{ label }</strong>
                <span id="status-detail" class="detail">{ detail }</span>
                if can_retry {
                    <button id="reconnect" onclick={reconnect}>{ "Retry now" }</button>
                }
            </div>
        }
    }

    #[component]
    fn Demo() -> Html {
        let status = use_status();
        let topic = use_state(|| "test".to_owned());
        let topic_draft = use_state(|| "test".to_owned());
        let draft = use_state(String::new);
        let presence = use_presence(&topic);
        let log = use_reducer(Log::default);
        let errors = use_reducer(Errors::default);
        // Every message goes straight into the log: the page keeps its own
        // (capped) list, so it needs no copy in a use_topic list.
        let chat = use_topic_callback::<Value>(&topic, TopicOptions::default(), log_received(&log, &errors));
        let topic_status = use_topic_status(&topic, errors.dispatcher());
        {
            let log = log.dispatcher();
            use_effect_with((*topic).clone(), move |_| log.dispatch(LogAction::Clear));
        }
        let me = match &status {
            Status::Open { peer } => Some(peer.clone()),
            _ => None,
        };
        let join = join_topic(topic.clone(), topic_draft.clone());
        let publish = publish_draft(chat, draft.clone(), log.clone(), me.clone().unwrap_or_else(|| "you".to_owned()));
        let on_topic_input = {
            let topic_draft = topic_draft.clone();
            Callback::from(move |e: InputEvent| topic_draft.set(input_value(&e)))
        };
        let on_draft_input = {
            let draft = draft.clone();
            Callback::from(move |e: InputEvent| draft.set(input_value(&e)))
        };
        let (topic_state, topic_label) = topic_label(topic_status.as_ref());

        html! {
            <main>
                <h1>{ "Websocket messages" }</h1>
                <StatusBar />
                <section class="controls">
                    <form id="join-form" onsubmit={join}>
                        <label for="topic-input">{ "Topic" }</label>
                        <input id="topic-input" data-testid="topic-input" value={(*topic_draft).clone()} oninput={on_topic_input} placeholder="test" />
                        <button id="join" data-testid="join" type="submit">{ "Join" }</button>
                    </form>
                    <form id="publish-form" onsubmit={publish}>
                        <label for="message-input">{ "Message" }</label>
                        <input id="message-input" data-testid="message-input" value={(*draft).clone()} oninput={on_draft_input} placeholder="Say something" autocomplete="off" />
                        <button id="publish" data-testid="publish" type="submit">{ "Publish" }</button>
                    </form>
                </section>
                <p class="topic-line">
                    { "Topic " }<code id="current-topic">{ (*topic).clone() }</code>{ ": " }
                    <span id="topic-status" data-state={topic_state}>{ topic_label }</span>
                </p>
                <div class="columns">
                    { message_list(&log.lines.borrow()) }
                    { sidebar(&presence, me.as_deref(), &errors.0) }
                </div>
            </main>
        }
    }

    /// Puts each message of the topic (or the error about it) into the page.
    fn log_received(
        log: &UseReducerHandle<Log>,
        errors: &UseReducerHandle<Errors>,
    ) -> Callback<Result<Rc<Received<Value>>, ClientError>> {
        let (log, errors) = (log.dispatcher(), errors.dispatcher());
        Callback::from(move |item: Result<Rc<Received<Value>>, ClientError>| match item {
            Ok(m) => log.dispatch(LogAction::Received(Line {
                local_id: None,
                seq: Some(m.seq),
                from: m.from.clone(),
                text: text_of(&m.data),
                mine: false,
                failed: None,
            })),
            Err(e) => errors.dispatch(e.to_string()),
        })
    }

    /// The topic's state. Errors not about a topic (unreadable frames, a
    /// socket the browser refused to create, a failed token refresh) go to
    /// `errors` too: the page shows them, rather than only logging them.
    #[hook]
    fn use_topic_status(topic: &str, errors: UseReducerDispatcher<Errors>) -> Option<TopicStatus> {
        let client = use_crosswire();
        let topic_status = use_state_eq(|| None::<TopicStatus>);
        let setter = topic_status.setter();
        use_effect_with((client, topic.to_owned()), move |(client, name)| {
            setter.set(crosswire_client::Topic::new(name).ok().and_then(|t| client.topic_status(&t)));
            let name = name.clone();
            let listener = client.listen(move |event| match event {
                CrosswireEvent::Error(
                    e @ (ClientError::Protocol(_)
                    | ClientError::Socket(_)
                    | ClientError::TokenRefresh(_)
                    | ClientError::Ended { .. }),
                ) => errors.dispatch(e.to_string()),
                CrosswireEvent::Topic { topic, status } if topic.as_str() == name => setter.set(Some(status.clone())),
                _ => {}
            });
            move || drop(listener)
        });
        (*topic_status).clone()
    }

    /// Joins the topic typed in the topic field.
    fn join_topic(topic: UseStateHandle<String>, topic_draft: UseStateHandle<String>) -> Callback<SubmitEvent> {
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let name = topic_draft.trim().to_owned();
            if !name.is_empty() {
                topic.set(name);
            }
        })
    }

    /// Publishes the message field with an ack: its line shows at once, and
    /// gets its seq (or why it was not delivered) when the server answers.
    fn publish_draft(
        chat: TopicSender<Value>,
        draft: UseStateHandle<String>,
        log: UseReducerHandle<Log>,
        me: String,
    ) -> Callback<SubmitEvent> {
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let text = draft.trim().to_owned();
            if text.is_empty() {
                return;
            }
            let id = log.next_id;
            log.dispatch(LogAction::Sent(Line {
                local_id: Some(id),
                seq: None,
                from: me.clone(),
                text: text.clone(),
                mine: true,
                failed: None,
            }));
            let ack = chat.publish_with_ack(json!({ "text": text }));
            let log = log.dispatcher();
            spawn_local(async move {
                match ack.await {
                    Ok(seq) => log.dispatch(LogAction::Acked(id, seq)),
                    Err(e) => log.dispatch(LogAction::Failed(id, e.to_string())),
                }
            });
            draft.set(String::new());
        })
    }

    /// The topic line's `data-state` and text.
    fn topic_label(status: Option<&TopicStatus>) -> (&'static str, String) {
        match status {
            None | Some(TopicStatus::Subscribing) => ("subscribing", "subscribing…".to_owned()),
            Some(TopicStatus::Live { recovered: true, .. }) => ("live", "live (missed messages recovered)".to_owned()),
            Some(TopicStatus::Live { .. }) => ("live", "live".to_owned()),
            Some(TopicStatus::Gap { missed_after, .. }) => {
                ("gap", format!("live, but messages after #{} could not be recovered", missed_after.seq))
            }
            Some(TopicStatus::Refused(e)) => ("refused", format!("refused: {e}")),
        }
    }

    fn message_list(lines: &VecDeque<Line>) -> Html {
        html! {
            <section class="messages">
                <h2>{ "Messages" }</h2>
                if lines.is_empty() {
                    <p class="empty">{ "No messages yet." }</p>
                }
                <ul id="messages" data-testid="messages">
                    { for lines.iter().map(|l| html! {
                        <li class={classes!("msg", l.mine.then_some("mine"), l.failed.is_some().then_some("failed"))}
                            data-seq={l.seq.map(|s| s.to_string()).unwrap_or_default()} data-from={l.from.clone()}>
                            <span class="from">{ if l.mine { format!("{} (you)", l.from) } else { l.from.clone() } }</span>
                            <span class="seq">{ l.seq.map(|s| format!("#{s}")).unwrap_or_else(|| "…".into()) }</span>
                            <span class="text">{ &l.text }</span>
                            if let Some(e) = &l.failed {
                                <span class="why">{ format!("not delivered: {e}") }</span>
                            }
                        </li>
                    }) }
                </ul>
            </section>
        }
    }

    /// Who is here, and the errors.
    fn sidebar(presence: &[PresenceEntry], me: Option<&str>, errors: &VecDeque<String>) -> Html {
        html! {
            <aside>
                <h2>{ "Here now" }</h2>
                <ul id="presence" data-testid="presence">
                    { for presence.iter().map(|p| html! {
                        <li data-peer={p.peer.clone()}>
                            { p.user.clone().unwrap_or_else(|| p.peer.clone()) }
                            if me == Some(p.peer.as_str()) { <em>{ " (you)" }</em> }
                        </li>
                    }) }
                </ul>
                <h2>{ "Errors" }</h2>
                <ul id="errors" data-testid="errors">
                    { for errors.iter().map(|e| html! { <li>{ e }</li> }) }
                </ul>
            </aside>
        }
    }
}
