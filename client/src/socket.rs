//! A thin binding over `web_sys::WebSocket`: open, send, close, and events as
//! one enum. Dropping a [`Socket`] detaches its handlers and closes it.

use std::rc::Rc;

use wasm_bindgen::{closure::Closure, JsCast};
use web_sys::{BinaryType, CloseEvent, Event, MessageEvent, WebSocket};

use crate::driver::SocketEvent;

pub(crate) struct Socket {
    ws: WebSocket,
    closed: bool,
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
    _on_error: Closure<dyn FnMut(Event)>,
}

impl Socket {
    /// Opens a socket to `url`; events go to `on_event` until the socket is
    /// closed or dropped.
    pub(crate) fn open(url: &str, on_event: Rc<dyn Fn(SocketEvent)>) -> Result<Self, String> {
        let ws = WebSocket::new(url).map_err(|e| js_error(&e))?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let f = on_event.clone();
        let on_open = Closure::<dyn FnMut(Event)>::new(move |_| f(SocketEvent::Open));
        let f = on_event.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
            // Binary frames are not part of protocol v1; ignore them.
            if let Some(text) = e.data().as_string() {
                f(SocketEvent::Text(text));
            }
        });
        let f = on_event;
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |e: CloseEvent| {
            f(SocketEvent::Closed { code: e.code(), reason: e.reason() });
        });
        // An error event is always followed by a close event, which carries
        // what there is to know.
        let on_error = Closure::<dyn FnMut(Event)>::new(|_| {});
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        ws.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        Ok(Self {
            ws,
            closed: false,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
            _on_error: on_error,
        })
    }

    /// Sends a text frame; a failure shows up as a close event.
    pub(crate) fn send(&self, text: &str) {
        let _ = self.ws.send_with_str(text);
    }

    /// Detaches the handlers and closes with `code` (1000 or 3000–4999).
    pub(crate) fn close(mut self, code: u16, reason: &str) {
        self.detach();
        let reason = truncate(reason, 123);
        if self.ws.close_with_code_and_reason(code, reason).is_err() {
            let _ = self.ws.close();
        }
        self.closed = true;
    }

    fn detach(&self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        self.ws.set_onerror(None);
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if !self.closed {
            self.detach();
            let _ = self.ws.close();
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn js_error(e: &wasm_bindgen::JsValue) -> String {
    e.as_string()
        .or_else(|| e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())))
        .unwrap_or_else(|| format!("{e:?}"))
}
