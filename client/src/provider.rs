//! The Yew provider: one shared connection per app.

use yew::prelude::*;

use crate::{ClientConfig, Crosswire};

/// What [`CrosswireProvider`] puts in the Yew context: the shared connection.
/// Read it with [`crate::use_crosswire`] (or `use_context::<CrosswireContext>()`).
pub type CrosswireContext = Crosswire;

/// The properties of [`CrosswireProvider`].
#[derive(Properties, PartialEq)]
pub struct CrosswireProviderProps {
    /// The server's WebSocket URL, `ws://` or `wss://`.
    pub url: AttrValue,
    /// How to connect; `ClientConfig::default()` if not given.
    #[prop_or_default]
    pub config: ClientConfig,
    /// The app, which may use the crosswire hooks.
    #[prop_or_default]
    pub children: Html,
}

/// Owns one connection for everything below it. Changing `url` or `config`
/// replaces the connection; unmounting closes it. The connection starts in an
/// effect: server-side rendering (which runs no effects) opens no socket, and
/// the hooks render their initial state (status `Connecting`, no messages).
///
/// ```ignore
/// html! {
///     <CrosswireProvider url="wss://example.com/_ws">
///         <App />
///     </CrosswireProvider>
/// }
/// ```
#[component]
pub fn CrosswireProvider(props: &CrosswireProviderProps) -> Html {
    let client =
        use_memo((props.url.clone(), props.config.clone()), |(url, config)| Crosswire::idle(url, config.clone()));
    use_effect_with(client.clone(), |client| {
        let client = Crosswire::clone(client);
        client.start();
        move || client.close()
    });
    html! {
        <ContextProvider<CrosswireContext> context={Crosswire::clone(&client)}>
            { props.children.clone() }
        </ContextProvider<CrosswireContext>>
    }
}
