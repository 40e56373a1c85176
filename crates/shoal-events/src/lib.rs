//! Model-update events on NATS JetStream.
//!
//! With `--events nats://HOST:PORT`, the leading control plane publishes
//! each replica's desired state on `shoal.desired.<replica>` and the
//! routing table on `shoal.routing`, in one JetStream stream (`SHOAL`,
//! file storage) that keeps the latest message of each subject. A replica
//! or gateway reads its subject's latest stored message by a direct get
//! when it starts, after every reconnection, and whenever a plain
//! subscription to the subject signals a new one (JetStream delivers what
//! it stores to subscribers of the subject too), and passes on what it
//! reads in the stream's order. So one that was away (or a NATS server
//! that restarted) resumes from the newest state, not from the start of time;
//! no control plane holds a connection per replica; and the server keeps
//! no consumer per follower (a thousand ordered consumers were more than
//! nats-server 2.9 would set up on one machine: see BENCHMARKS.md). Every
//! message carries its fleet revision; followers ignore what is not newer
//! than what they have, so a late or repeated message changes nothing.
//!
//! [`subjects`] is the pure part (names); [`Events`] is the connection.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_api::fleet::{DesiredState, RoutingTable};

/// Subject and stream names.
pub mod subjects {
    /// The stream every subject below lives in.
    pub const STREAM: &str = "SHOAL";
    /// Subjects the stream takes.
    pub const ALL: &str = "shoal.>";
    /// The routing table's subject.
    pub const ROUTING: &str = "shoal.routing";

    /// Replica `id`'s desired state (ids are `[A-Za-z0-9._-]`; a `.` would
    /// add a token, which `shoal.desired.>` still matches, and nothing else
    /// does).
    pub fn desired(id: &str) -> String {
        format!("shoal.desired.{id}")
    }

    /// The de-duplication id of a message: JetStream drops a second
    /// message with the same id within its window, so two publishers of
    /// one revision store it once.
    pub fn message_id(subject: &str, revision: u64, content: u64) -> String {
        format!("{subject}@{revision}#{content:016x}")
    }
}

/// Why an event operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The URL is not one NATS takes.
    #[error("--events {0}")]
    Url(String),
    /// NATS or JetStream refused or could not be reached.
    #[error("NATS: {0}")]
    Nats(String),
    /// A message that is not what its subject carries.
    #[error("unreadable event on {subject}: {reason}")]
    Decode {
        /// Where it came.
        subject: String,
        /// Why.
        reason: String,
    },
}

fn nats(e: impl std::fmt::Display) -> EventError {
    EventError::Nats(e.to_string())
}

/// A connection to NATS with the Shoal stream in place.
#[derive(Debug, Clone)]
pub struct Events {
    client: async_nats::Client,
    js: jetstream::Context,
    url: String,
    /// How many times the connection has been (re)established.
    connections: tokio::sync::watch::Receiver<u64>,
}

/// A connection to `url`, if one is given and usable; otherwise `None`,
/// with a warning saying the caller follows the control plane's watch
/// stream instead. (Connecting returns at once and retries in the
/// background, so only a URL NATS cannot take fails here.)
pub async fn connect_or_warn(url: Option<&str>) -> Option<Events> {
    match Events::connect(url?).await {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(error = %e, "cannot use the event stream; following the control plane's watch stream instead");
            None
        }
    }
}

/// Checks `url` names a NATS server: `nats://HOST:PORT` (user and password
/// allowed), without connecting.
pub fn check_url(url: &str) -> Result<(), EventError> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        EventError::Url(format!(
            "{url:?}: expected nats://HOST:PORT (a NATS server with JetStream: nats-server -js)"
        ))
    })?;
    let host = rest.rsplit('@').next().unwrap_or(rest);
    if host.is_empty() || host.contains('/') {
        return Err(EventError::Url(format!(
            "{url:?}: expected nats://HOST:PORT"
        )));
    }
    Ok(())
}

impl Events {
    /// Connects to the NATS server at `url` (retrying in the background
    /// when it is down: this returns at once) and makes sure the stream
    /// exists once it can.
    pub async fn connect(url: &str) -> Result<Events, EventError> {
        check_url(url)?;
        let (connected, connections) = tokio::sync::watch::channel(0u64);
        let connected = std::sync::Arc::new(connected);
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    connected.send_modify(|n| *n += 1);
                }
                std::future::ready(())
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(nats)?;
        let js = jetstream::new(client.clone());
        Ok(Events {
            client,
            js,
            url: url.to_owned(),
            connections,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The stream, created on first use: the latest message per subject,
    /// on disk, de-duplicated over two minutes, readable by direct gets.
    async fn stream(&self) -> Result<stream::Stream, EventError> {
        self.js
            .get_or_create_stream(stream_config())
            .await
            .map_err(nats)
    }

    /// Makes sure the stream exists as this version wants it (a control
    /// plane does at start, so followers find it; a stream made by an
    /// older version is updated in place, its messages kept).
    pub async fn ensure_stream(&self) -> Result<(), EventError> {
        self.js
            .create_or_update_stream(stream_config())
            .await
            .map(|_| ())
            .map_err(nats)
    }

    /// Sends `value` (of fleet revision `revision`) on `subject`; the
    /// future resolves when JetStream has stored it.
    async fn send<T: Serialize>(
        &self,
        subject: String,
        revision: u64,
        value: &T,
    ) -> Result<jetstream::context::PublishAckFuture, EventError> {
        let payload = serde_json::to_vec(value).map_err(nats)?;
        let id = subjects::message_id(&subject, revision, content_hash(&payload));
        self.js
            .send_publish(
                subject,
                jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(id),
            )
            .await
            .map_err(nats)
    }

    /// Publishes replica `id`'s desired state and waits until it is stored.
    pub async fn publish_desired(&self, id: &str, state: &DesiredState) -> Result<(), EventError> {
        self.send(subjects::desired(id), state.revision, state)
            .await?
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// Publishes many replicas' desired states at once (sent back to back,
    /// then every acknowledgement awaited); how many were stored before
    /// the first failure, and that failure.
    pub async fn publish_desired_all(
        &self,
        states: &[(String, DesiredState)],
    ) -> (usize, Result<(), EventError>) {
        let mut acks = Vec::new();
        for (id, state) in states {
            match self
                .send(subjects::desired(id), state.revision, state)
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => return (0, Err(e)),
            }
        }
        let mut stored = 0;
        for ack in acks {
            if let Err(e) = ack.await {
                return (stored, Err(nats(e)));
            }
            stored += 1;
        }
        (stored, Ok(()))
    }

    /// Publishes the routing table.
    pub async fn publish_routing(&self, table: &RoutingTable) -> Result<(), EventError> {
        self.send(subjects::ROUTING.to_owned(), table.revision, table)
            .await?
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// Follows `subject` from its latest message on: each item is a message
    /// decoded, or why it could not be. The subject's latest stored message
    /// comes first; after that, each message delivered on a plain
    /// subscription (and each reconnection: what was published while the
    /// connection was down reached no subscriber) is a signal to read the
    /// latest stored message again, one read at a time, and a message is
    /// passed on only when its stream sequence differs from the last one
    /// passed on. So messages come in the stream's order, never an older
    /// one after a newer (a live delivery and a read's answer can overtake
    /// each other on the wire; reads one after another cannot), signals
    /// that pile up during a read are answered by one read, and a stream
    /// made anew (sequences starting over) is followed too. An error item
    /// means the stream could not be read: the caller follows again after
    /// a pause.
    async fn follow<T: DeserializeOwned>(
        &self,
        subject: String,
    ) -> Result<impl Stream<Item = Result<T, EventError>> + use<T>, EventError> {
        /// The follow's state between items.
        struct Following {
            stream: stream::Stream,
            live: async_nats::Subscriber,
            connections: tokio::sync::watch::Receiver<u64>,
            subject: String,
            last: Option<u64>,
        }
        let stream = self.stream().await?;
        // Subscribed before the first read: whatever is stored after the
        // read is signalled (the subscription is on the server before the
        // read, the two going out in order on one connection; after a
        // reconnection the client sends its subscriptions first).
        let live = self.client.subscribe(subject.clone()).await.map_err(nats)?;
        let mut connections = self.connections.clone();
        connections.mark_changed();
        let following = Following {
            stream,
            live,
            connections,
            subject: subject.clone(),
            last: None,
        };
        let latest = futures::stream::unfold(following, |mut f| async move {
            loop {
                tokio::select! {
                    biased;
                    changed = f.connections.changed() => changed.ok()?,
                    message = f.live.next() => { message?; }
                }
                // Whatever else has arrived is answered by the same read.
                while let Some(Some(_)) = futures::FutureExt::now_or_never(f.live.next()) {}
                match f
                    .stream
                    .direct_get_last_for_subject(f.subject.clone())
                    .await
                {
                    Ok(message) if Some(message.sequence) != f.last => {
                        f.last = Some(message.sequence);
                        return Some((Ok(message.payload), f));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
                    Err(e) => return Some((Err(nats(e)), f)),
                }
            }
        });
        Ok(
            latest.map(move |payload: Result<bytes::Bytes, EventError>| {
                serde_json::from_slice(&payload?).map_err(|e| EventError::Decode {
                    subject: subject.clone(),
                    reason: e.to_string(),
                })
            }),
        )
    }

    /// Replica `id`'s desired states, from the latest on.
    pub async fn follow_desired(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<DesiredState, EventError>> + use<>, EventError> {
        self.follow(subjects::desired(id)).await
    }

    /// Routing tables, from the latest on.
    pub async fn follow_routing(
        &self,
    ) -> Result<impl Stream<Item = Result<RoutingTable, EventError>> + use<>, EventError> {
        self.follow(subjects::ROUTING.to_owned()).await
    }
}

/// The stream as this version wants it.
fn stream_config() -> stream::Config {
    stream::Config {
        name: subjects::STREAM.to_owned(),
        subjects: vec![subjects::ALL.to_owned()],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        ..Default::default()
    }
}

/// A 64-bit FNV-1a hash of `bytes`: tells apart two messages of one
/// revision with different contents (routing tables change with liveness,
/// not only with revisions).
fn content_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_connecting() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("nats://user:pw@nats.internal:4222").is_ok());
        let err = check_url("http://127.0.0.1:4222").unwrap_err().to_string();
        assert!(err.contains("nats://HOST:PORT"), "{err}");
        assert!(check_url("nats://").is_err());
        assert!(check_url("nats://host:4222/x").is_err());
    }

    #[test]
    fn message_ids_differ_by_subject_revision_and_content() {
        let a = subjects::message_id("shoal.routing", 7, content_hash(b"a"));
        assert_eq!(
            a,
            subjects::message_id("shoal.routing", 7, content_hash(b"a"))
        );
        assert_ne!(
            a,
            subjects::message_id("shoal.routing", 7, content_hash(b"b"))
        );
        assert_ne!(
            a,
            subjects::message_id("shoal.routing", 8, content_hash(b"a"))
        );
        assert_eq!(subjects::desired("r-1"), "shoal.desired.r-1");
    }
}
