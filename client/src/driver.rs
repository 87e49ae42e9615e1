//! What the client needs from its platform, in two forms: the browser's
//! (`web_sys::WebSocket`, `setTimeout`, the page's `online`/`offline`/
//! `visibilitychange` events, `fetch`) on wasm32, and a detached one
//! elsewhere. Detached, a client never opens a socket and its status stays
//! `Connecting`: that is what server-side rendering and native builds of a
//! Yew app see.

use std::{future::Future, rc::Rc};

use crate::Millis;

/// What a socket reports.
// The detached driver has no socket, so nothing constructs these there.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) enum SocketEvent {
    Open,
    Text(String),
    Closed { code: u16, reason: String },
}

/// What the page reports.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) enum PageEvent {
    Online,
    Offline,
    Visibility { hidden: bool },
}

#[cfg(target_arch = "wasm32")]
pub(crate) use browser::*;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use detached::*;

#[cfg(target_arch = "wasm32")]
mod browser {
    use std::cell::RefCell;

    use gloo_timers::callback::Timeout;
    use wasm_bindgen::{closure::Closure, JsCast};
    use wasm_bindgen_futures::JsFuture;

    use super::*;
    use crate::socket::Socket;

    pub(crate) fn now() -> Millis {
        js_sys::Date::now() as Millis
    }

    pub(crate) fn random() -> f64 {
        js_sys::Math::random()
    }

    pub(crate) fn spawn(fut: impl Future<Output = ()> + 'static) {
        wasm_bindgen_futures::spawn_local(fut);
    }

    /// Fetches the `http(s)` form of the WebSocket URL and returns its status.
    pub(crate) async fn probe(target: String) -> Option<u16> {
        let window = web_sys::window()?;
        let response = JsFuture::from(window.fetch_with_str(&target)).await.ok()?;
        let response: web_sys::Response = response.dyn_into().ok()?;
        Some(response.status())
    }

    pub(crate) fn document_hidden() -> Option<bool> {
        Some(web_sys::window()?.document()?.hidden())
    }

    #[derive(Default)]
    struct Timers {
        armed: Option<(Millis, Timeout)>,
        /// The timer that fired last. Its closure may still be running when it
        /// is taken out of `armed`, so it is dropped later, when the next one
        /// fires (or with the client), instead of being leaked.
        spent: Option<Timeout>,
    }

    /// The socket, the timer and the page listeners of one client.
    #[derive(Default)]
    pub(crate) struct Driver {
        socket: RefCell<Option<Socket>>,
        timers: RefCell<Timers>,
        page: RefCell<Option<PageEvents>>,
    }

    impl Driver {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        pub(crate) fn open(&self, url: &str, on_event: Rc<dyn Fn(SocketEvent)>) -> Result<(), String> {
            *self.socket.borrow_mut() = Some(Socket::open(url, on_event)?);
            Ok(())
        }

        /// The socket reported its close: it is gone.
        pub(crate) fn forget_socket(&self) {
            self.socket.borrow_mut().take();
        }

        pub(crate) fn send(&self, text: &str) {
            if let Some(socket) = &*self.socket.borrow() {
                socket.send(text);
            }
        }

        pub(crate) fn close(&self, code: u16, reason: &str) {
            let socket = self.socket.borrow_mut().take();
            if let Some(socket) = socket {
                socket.close(code, reason);
            }
        }

        /// When the armed timer fires, if one is.
        pub(crate) fn armed_at(&self) -> Option<Millis> {
            self.timers.borrow().armed.as_ref().map(|(at, _)| *at)
        }

        /// Arms one timer for `at` (replacing any other), or none.
        pub(crate) fn arm(&self, at: Option<Millis>, fire: impl FnOnce() + 'static) {
            let timeout = at.map(|at| {
                let delay = at.saturating_sub(now()).min(i32::MAX as u64) as u32;
                (at, Timeout::new(delay, fire))
            });
            // Dropping a replaced timer that has not fired cancels it.
            let old = std::mem::replace(&mut self.timers.borrow_mut().armed, timeout);
            drop(old);
        }

        /// The timer for `at` fired: move it to `spent` (releasing the one
        /// before it) rather than drop it while its closure runs.
        pub(crate) fn fired(&self, at: Millis) {
            let mut timers = self.timers.borrow_mut();
            if timers.armed.as_ref().is_some_and(|(t, _)| *t == at) {
                let done = timers.armed.take().map(|(_, t)| t);
                let older = std::mem::replace(&mut timers.spent, done);
                drop(timers);
                drop(older);
            }
        }

        pub(crate) fn watch_page(&self, on_event: Rc<dyn Fn(PageEvent)>) {
            *self.page.borrow_mut() = PageEvents::install(on_event);
        }

        /// Whether the page is hidden, if there is a page.
        pub(crate) fn hidden(&self) -> Option<bool> {
            document_hidden()
        }

        /// Removes the page listeners and the timer (the socket is closed by
        /// the session's own `CloseSocket`).
        pub(crate) fn shut_down(&self) {
            self.page.borrow_mut().take();
            let mut timers = self.timers.borrow_mut();
            let (armed, spent) = (timers.armed.take(), timers.spent.take());
            drop(timers);
            drop((armed, spent));
        }
    }

    /// `online`/`offline` on the window and `visibilitychange` on the
    /// document, removed on drop.
    struct PageEvents {
        online: Closure<dyn FnMut()>,
        offline: Closure<dyn FnMut()>,
        visibility: Closure<dyn FnMut()>,
    }

    impl PageEvents {
        fn install(on_event: Rc<dyn Fn(PageEvent)>) -> Option<Self> {
            let window = web_sys::window()?;
            let document = window.document()?;
            let f = on_event.clone();
            let online = Closure::<dyn FnMut()>::new(move || f(PageEvent::Online));
            let f = on_event.clone();
            let offline = Closure::<dyn FnMut()>::new(move || f(PageEvent::Offline));
            let f = on_event;
            let visibility = Closure::<dyn FnMut()>::new(move || {
                if let Some(hidden) = document_hidden() {
                    f(PageEvent::Visibility { hidden });
                }
            });
            window.add_event_listener_with_callback("online", online.as_ref().unchecked_ref()).ok()?;
            window.add_event_listener_with_callback("offline", offline.as_ref().unchecked_ref()).ok()?;
            document.add_event_listener_with_callback("visibilitychange", visibility.as_ref().unchecked_ref()).ok()?;
            Some(Self { online, offline, visibility })
        }
    }

    impl Drop for PageEvents {
        fn drop(&mut self) {
            if let Some(window) = web_sys::window() {
                let _ = window.remove_event_listener_with_callback("online", self.online.as_ref().unchecked_ref());
                let _ = window.remove_event_listener_with_callback("offline", self.offline.as_ref().unchecked_ref());
                if let Some(document) = window.document() {
                    let f = self.visibility.as_ref().unchecked_ref();
                    let _ = document.remove_event_listener_with_callback("visibilitychange", f);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod detached {
    use super::*;

    pub(crate) fn now() -> Millis {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
    }

    /// Only backoff jitter uses it, and a detached client never retries.
    pub(crate) fn random() -> f64 {
        0.5
    }

    /// There is no event loop to run it on: the future is dropped unpolled.
    pub(crate) fn spawn(fut: impl Future<Output = ()> + 'static) {
        drop(fut);
    }

    pub(crate) async fn probe(_target: String) -> Option<u16> {
        None
    }

    /// No socket, no timer, no page.
    pub(crate) struct Driver;

    impl Driver {
        pub(crate) fn new() -> Self {
            Self
        }

        /// Opens nothing: the session waits in `Connecting` (its connect
        /// timeout needs a timer, and there is none here).
        pub(crate) fn open(&self, _url: &str, _on_event: Rc<dyn Fn(SocketEvent)>) -> Result<(), String> {
            Ok(())
        }

        pub(crate) fn forget_socket(&self) {}

        pub(crate) fn send(&self, _text: &str) {}

        pub(crate) fn close(&self, _code: u16, _reason: &str) {}

        pub(crate) fn armed_at(&self) -> Option<Millis> {
            None
        }

        pub(crate) fn arm(&self, _at: Option<Millis>, _fire: impl FnOnce() + 'static) {}

        pub(crate) fn fired(&self, _at: Millis) {}

        pub(crate) fn watch_page(&self, _on_event: Rc<dyn Fn(PageEvent)>) {}

        pub(crate) fn hidden(&self) -> Option<bool> {
            None
        }

        pub(crate) fn shut_down(&self) {}
    }
}
