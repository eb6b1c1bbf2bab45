//! Delivery: turning stored entries into messages for connected clients, whatever the
//! transport. Consumer groups (competing consumers, acknowledged) live in [`groups`]; the stream
//! watcher that wakes them in [`watcher`].
//!
//! Knows the backend and the model; knows nothing about HTTP, SSE framing or WebSocket frames.

pub mod groups;
pub mod watcher;
