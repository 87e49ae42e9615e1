//! Server-side rendering, natively: the provider and every hook render their
//! initial state (status `Connecting`, no messages, nobody present) and no
//! socket is opened. Yew's `ssr` feature comes from this crate's
//! dev-dependencies; the library itself enables no renderer.
#![cfg(not(target_arch = "wasm32"))]

use std::rc::Rc;

use crosswire_client::{
    use_crosswire, use_presence, use_status, use_topic, use_topic_callback, ClientConfig, ClientError,
    CrosswireProvider, Received, Status, TopicOptions,
};
use serde::{Deserialize, Serialize};
use yew::prelude::*;
use yew::LocalServerRenderer;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
struct Chat {
    text: String,
}

#[component]
fn Room() -> Html {
    let client = use_crosswire();
    let status = use_status();
    let chat = use_topic::<Chat>("chat:lobby");
    let here = use_presence("chat:lobby");
    let _sender = use_topic_callback::<Chat>(
        "chat:lobby",
        TopicOptions::default(),
        Callback::from(|_: Result<Rc<Received<Chat>>, ClientError>| unreachable!("no messages under SSR")),
    );
    // Rendering must not have started the connection (the provider starts it
    // in an effect, and SSR runs none).
    assert!(!client.is_started());
    assert_eq!(client.status(), Status::Connecting { attempt: 0 });
    html! {
        <div>
            <p id="status">{ status.name() }</p>
            <p id="here">{ here.len() }</p>
            <p id="total">{ chat.total() }</p>
            <p id="topic">{ chat.status().map_or("none", |s| if s.is_live() { "live" } else { "not live" }) }</p>
            <ul>{ for chat.messages().iter().map(|m| html! { <li>{ &m.data.text }</li> }) }</ul>
        </div>
    }
}

#[component]
fn App() -> Html {
    html! {
        <CrosswireProvider url="ws://127.0.0.1:9/_ws" config={ClientConfig::default().with_token("t")}>
            <Room />
        </CrosswireProvider>
    }
}

#[tokio::test]
async fn the_hooks_render_their_initial_state_and_open_no_socket() {
    let html = LocalServerRenderer::<App>::new().hydratable(false).render().await;
    assert_eq!(
        html,
        r#"<div><p id="status">connecting</p><p id="here">0</p><p id="total">0</p><p id="topic">none</p><ul></ul></div>"#
    );
}
