//! What streamgate measures, exported at `/metrics` in the Prometheus/OpenMetrics text format.
//!
//! One [`Metrics`] per instance, with its own registry (never a process-global recorder), so
//! several instances in one process (the tests) keep separate counts. Every label has a bounded
//! set of values: transports, modes and sources are fixed words; HTTP routes are the route
//! templates (`/api/streams/{stream}/messages`), never raw paths; methods outside the usual ones
//! are `other`.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::model::{Entry, now_ms};

/// Seconds: from half a millisecond to ten seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveredLabels {
    pub transport: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The delivery modes, as label values.
pub mod mode {
    pub const BROADCAST: &str = "broadcast";
    pub const AT_LEAST_ONCE: &str = "at_least_once";
    pub const AT_MOST_ONCE: &str = "at_most_once";
}

/// Every delivery mode.
const MODES: [&str; 3] = [mode::BROADCAST, mode::AT_LEAST_ONCE, mode::AT_MOST_ONCE];

/// Where published messages come from, as label values.
pub mod source {
    pub const HTTP: &str = "http";
    pub const WEBSOCKET: &str = "websocket";
    pub const PUBSUB: &str = "pubsub";
}

/// The transports, as label values.
pub mod transport {
    pub const SSE: &str = "sse";
    pub const WEBSOCKET: &str = "websocket";
    pub const LONG_POLL: &str = "long_poll";
}

/// Every transport.
const TRANSPORTS: [&str; 3] = [transport::SSE, transport::WEBSOCKET, transport::LONG_POLL];

/// Every series streamgate exports.
pub struct Metrics {
    registry: Registry,
    connections: Family<TransportLabels, Gauge>,
    messages_received: Family<SourceLabels, Counter>,
    messages_delivered: Family<DeliveredLabels, Counter>,
    delivery_latency: Family<TransportLabels, Histogram, fn() -> Histogram>,
    /// The two series above per (transport, mode), taken from their families on first use: a
    /// busy consumer delivers hundreds of thousands of messages a second, and a family lookup
    /// hashes the labels under a lock shared by every thread.
    delivery_series: [OnceLock<(Counter, Histogram)>; TRANSPORTS.len() * MODES.len()],
    pub redeliveries: Counter,
    pub dead_lettered: Counter,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    backend_errors: Family<KindLabels, Counter>,
    pub rate_limited: Counter,
    pub probe_failures: Counter,
    pub probe_round_trip: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("streamgate");
        let metrics = Metrics {
            connections: Family::default(),
            messages_received: Family::default(),
            messages_delivered: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            delivery_series: Default::default(),
            redeliveries: Counter::default(),
            dead_lettered: Counter::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            backend_errors: Family::default(),
            rate_limited: Counter::default(),
            probe_failures: Counter::default(),
            probe_round_trip: latency_histogram(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open streaming connections by transport",
            metrics.connections.clone(),
        );
        registry.register(
            "messages_received",
            "Messages published, by where they came from (http, websocket, pubsub)",
            metrics.messages_received.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages sent to clients, by transport and delivery mode",
            metrics.messages_delivered.clone(),
        );
        registry.register_with_unit(
            "delivery_latency",
            "Time from a message's append to its delivery to a client",
            Unit::Seconds,
            metrics.delivery_latency.clone(),
        );
        registry.register(
            "redeliveries",
            "Group messages delivered again (after a reconnect, a claim or a nack)",
            metrics.redeliveries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Group messages moved to a dead-letter stream after too many deliveries",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            metrics.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request (to the response head, for streams)",
            Unit::Seconds,
            metrics.http_duration.clone(),
        );
        registry.register(
            "backend_errors",
            "Backend failures by kind (unavailable, internal)",
            metrics.backend_errors.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by the rate limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "probe_failures",
            "Synthetic probes that did not come back",
            metrics.probe_failures.clone(),
        );
        registry.register_with_unit(
            "probe_round_trip",
            "Round trip of the synthetic probe through publish and delivery",
            Unit::Seconds,
            metrics.probe_round_trip.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// A message published (`source`: http, websocket, pubsub).
    pub fn received(&self, source: &'static str, n: u64) {
        self.messages_received
            .get_or_create(&SourceLabels { source })
            .inc_by(n);
    }

    /// A message sent to a client; its latency is measured from the time in its id.
    pub fn delivered(&self, transport: &'static str, mode: &'static str, entry: &Entry) {
        let series = || {
            (
                self.messages_delivered
                    .get_or_create_owned(&DeliveredLabels { transport, mode }),
                self.delivery_latency
                    .get_or_create_owned(&TransportLabels { transport }),
            )
        };
        let slot = TRANSPORTS
            .iter()
            .position(|known| *known == transport)
            .zip(MODES.iter().position(|known| *known == mode))
            .map(|(t, m)| t * MODES.len() + m);
        let looked_up;
        let (count, latency) = match slot {
            Some(slot) => self.delivery_series[slot].get_or_init(series),
            None => {
                looked_up = series();
                &looked_up
            }
        };
        count.inc();
        latency.observe(now_ms().saturating_sub(entry.id.ms) as f64 / 1000.0);
    }

    /// One answered HTTP request.
    pub fn request(&self, route: &str, method: &axum::http::Method, status: u16, seconds: f64) {
        let method = match method.as_str() {
            "GET" => "GET",
            "POST" => "POST",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            "OPTIONS" => "OPTIONS",
            "HEAD" => "HEAD",
            _ => "other",
        };
        self.http_requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method,
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                method,
            })
            .observe(seconds);
    }

    /// A request head refused before routing (408, 414, 431, 400), counted under the route
    /// `unparsed`.
    pub fn refused_head(&self, status: u16) {
        self.http_requests
            .get_or_create(&RequestLabels {
                route: "unparsed".to_owned(),
                method: "other",
                status,
            })
            .inc();
    }

    /// A backend failure (`kind`: unavailable, internal).
    pub fn backend_error(&self, kind: &'static str) {
        self.backend_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// The text exposition, with the connection gauges set to `(sse, websocket, long_poll)`.
    pub fn render(&self, connections: (u64, u64, u64)) -> String {
        let (sse, websocket, long_poll) = connections;
        for (transport, open) in [
            (transport::SSE, sse),
            (transport::WEBSOCKET, websocket),
            (transport::LONG_POLL, long_poll),
        ] {
            self.connections
                .get_or_create(&TransportLabels { transport })
                .set(open as i64);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_conventional_names() {
        let metrics = Metrics::new();
        metrics.received("http", 3);
        metrics.request(
            "/api/streams/{stream}/messages",
            &axum::http::Method::POST,
            201,
            0.002,
        );
        metrics.backend_error("unavailable");
        let text = metrics.render((1, 2, 3));
        for expected in [
            "streamgate_messages_received_total{source=\"http\"} 3",
            "streamgate_connections{transport=\"websocket\"} 2",
            "streamgate_http_requests_total{route=\"/api/streams/{stream}/messages\",method=\"POST\",status=\"201\"} 1",
            "streamgate_http_request_duration_seconds_bucket{le=\"0.005\",route=\"/api/streams/{stream}/messages\",method=\"POST\"} 1",
            "streamgate_backend_errors_total{kind=\"unavailable\"} 1",
            "# TYPE streamgate_probe_round_trip_seconds histogram",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}
