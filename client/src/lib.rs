//! The crosswire browser client: a Yew-friendly connection to a crosswire
//! server over protocol v1 ([`crosswire_shared`]).
//!
//! The client owns the WebSocket so that application code never sees a socket
//! go down: it reconnects with exponential backoff and full jitter, resubscribes
//! every topic with the last position seen (`since`) so the server can replay
//! what was missed, drops duplicates by sequence number, queues publishes made
//! while offline (bounded; overflow is reported, never silent), and detects
//! dead connections with an application-level heartbeat.
//!
//! # Layers
//!
//! - Pure logic, built and tested on any target: [`Backoff`], [`OfflineQueue`]
//!   and the [`session::Session`] state machine, which takes inputs and the
//!   current time and returns commands.
//! - The client, [`Crosswire`]: one shared connection that carries out the
//!   session's commands through a platform driver: `web_sys::WebSocket`,
//!   timers and page events on wasm32; detached elsewhere (no socket, status
//!   `Connecting`), which is what server-side rendering sees.
//! - The Yew API, on any target and with whichever renderer the app enables
//!   (`csr`, `ssr`, `hydration`): [`CrosswireProvider`] owns one connection
//!   per app and starts it in an effect (so SSR opens no socket);
//!   [`use_status`], [`use_topic`] / [`use_topic_with`] (a capped list, O(1)
//!   per message), [`use_topic_callback`] (for apps that keep their own
//!   state) and [`use_presence`] read it.
//!
//! Tokens: a [`TokenRefresher`] supplies the first token when none is given,
//! a new one before every reconnect and after a 4001 close (the client then
//! reconnects at once), and one shortly before the current token's `exp`,
//! which is handed to the server over the open connection (`refresh`) so
//! nothing is resubscribed or lost.
//!
//! # Example
//!
//! ```no_run
//! use crosswire_client::{use_status, use_topic, ClientConfig, CrosswireProvider};
//! use serde::{Deserialize, Serialize};
//! use yew::prelude::*;
//!
//! #[derive(Clone, PartialEq, Serialize, Deserialize)]
//! struct Chat {
//!     text: String,
//! }
//!
//! #[component]
//! fn Room() -> Html {
//!     let status = use_status();
//!     let chat = use_topic::<Chat>("chat:lobby");
//!     let say = {
//!         let chat = chat.clone();
//!         Callback::from(move |_| chat.publish(Chat { text: "hi".into() }))
//!     };
//!     html! {
//!         <>
//!             <p>{ status.name() }</p>
//!             <button onclick={say}>{ "Say hi" }</button>
//!             <ul>{ for chat.messages().iter().map(|m| html! { <li>{ &m.data.text }</li> }) }</ul>
//!         </>
//!     }
//! }
//!
//! #[component]
//! fn App() -> Html {
//!     html! {
//!         <CrosswireProvider url="wss://example.com/_ws" config={ClientConfig::default()}>
//!             <Room />
//!         </CrosswireProvider>
//!     }
//! }
//! ```
//!
//! A publish with `ack` resolves to the seq the server assigned:
//!
//! ```ignore
//! let seq = chat.publish_with_ack(Chat { text: "hi".into() }).await?;
//! ```

mod ack;
mod backoff;
mod client;
mod config;
mod driver;
mod error;
mod event;
mod hooks;
mod provider;
mod queue;
pub mod session;
#[cfg(target_arch = "wasm32")]
mod socket;
pub mod token;
pub mod url;

pub use ack::{AckFuture, AckResult, HistoryFuture, Reply};
pub use backoff::{Backoff, BackoffConfig};
pub use config::{ClientConfig, TokenFuture, TokenRefresher};
pub use crosswire_shared::{ErrorCode, PeerId, PresenceEntry, Since, Topic};
pub use error::ClientError;
pub use event::{Event, History, Millis, Received, Status, TopicMessage, TopicStatus};
pub use queue::OfflineQueue;

pub use client::{Crosswire, Listener, Subscription};
pub use hooks::{
    use_crosswire, use_presence, use_status, use_topic, use_topic_callback, use_topic_with, TopicOptions, TopicSender,
    UseTopicHandle,
};
pub use provider::{CrosswireContext, CrosswireProvider, CrosswireProviderProps};
