//! A minimal chat room on crosswire, written the way another Yew project would
//! use the crate: a typed message, one provider, the status, topic and
//! presence hooks, and publishing with an acknowledgement.
//!
//! Build and serve it (with a crosswire server on :3000):
//!
//! ```text
//! cargo build -p crosswire-client --example chat --target wasm32-unknown-unknown --release
//! wasm-bindgen --target web --no-typescript --out-dir target/chat \
//!     target/wasm32-unknown-unknown/release/examples/chat.wasm
//! cp client/examples/chat.html target/chat/index.html
//! cargo run -p crosswire-server -- --static target/chat   # http://127.0.0.1:3000/
//! ```

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!("this example runs in the browser; see the build steps at the top of examples/chat.rs");
}

#[cfg(target_arch = "wasm32")]
fn main() {
    yew::Renderer::<chat::App>::new().render();
}

#[cfg(target_arch = "wasm32")]
mod chat {
    use crosswire_client::{
        use_presence, use_status, use_topic, BackoffConfig, ClientConfig, CrosswireProvider, Status,
    };
    use serde::{Deserialize, Serialize};
    use web_sys::HtmlInputElement;
    use yew::prelude::*;

    /// What this app publishes on its topic.
    #[derive(Clone, PartialEq, Serialize, Deserialize)]
    struct ChatLine {
        user: String,
        text: String,
    }

    const ROOM: &str = "chat:lobby";

    #[component]
    pub(crate) fn App() -> Html {
        let origin = web_sys::window().and_then(|w| w.location().host().ok()).unwrap_or_default();
        let config = ClientConfig {
            backoff: BackoffConfig { max_ms: 10_000, ..BackoffConfig::default() },
            queue_capacity: 20,
            ..ClientConfig::default()
        };
        html! {
            <CrosswireProvider url={format!("ws://{origin}/_ws")} {config}>
                <Room />
            </CrosswireProvider>
        }
    }

    #[component]
    fn Room() -> Html {
        let status = use_status();
        let chat = use_topic::<ChatLine>(ROOM);
        let here = use_presence(ROOM);
        let input = use_node_ref();
        let last_ack = use_state(|| None::<String>);

        let send = {
            let (chat, input, last_ack) = (chat.clone(), input.clone(), last_ack.clone());
            Callback::from(move |e: SubmitEvent| {
                e.prevent_default();
                let Some(field) = input.cast::<HtmlInputElement>() else { return };
                let line = ChatLine { user: "guest".into(), text: field.value() };
                field.set_value("");
                let ack = chat.publish_with_ack(line);
                let last_ack = last_ack.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    last_ack.set(Some(match ack.await {
                        Ok(seq) => format!("delivered as #{seq}"),
                        Err(e) => format!("not delivered: {e}"),
                    }));
                });
            })
        };

        html! {
            <main>
                <p>{ match &status {
                    Status::Open { .. } => "online".to_owned(),
                    Status::Reconnecting { attempt, .. } => format!("reconnecting (attempt {attempt})…"),
                    other => other.name().to_owned(),
                } }</p>
                <p>{ format!("{} here", here.len()) }</p>
                <ul>{ for chat.messages().iter().map(|m| html! {
                    <li><b>{ &m.data.user }</b>{ ": " }{ &m.data.text }</li>
                }) }</ul>
                <ul>{ for chat.errors().iter().map(|e| html! { <li class="error">{ e.to_string() }</li> }) }</ul>
                <form onsubmit={send}>
                    <input ref={input} placeholder="message" />
                    <button>{ "Send" }</button>
                </form>
                if let Some(ack) = &*last_ack { <small>{ ack }</small> }
            </main>
        }
    }
}
