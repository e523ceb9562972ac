//! Exports a Lattice node's change log to RabbitMQ, at least once.
//!
//! `lattice-export` is a separate process that *pulls*: it reads one node's
//! durable change log through the SDK ([`lattice_client::LogConsumer`]),
//! publishes every change to a durable RabbitMQ exchange as a persistent
//! message with publisher confirms, and stores its checkpoint (the log
//! position after the last change the broker confirmed) as the register
//! `_consumers/NAME` in Lattice. The node never waits for it: when the broker
//! is slow or down the exporter falls behind, retries with backoff and
//! reports how far behind it is ([`Stats`]), and the node goes on writing its
//! log (retention may eventually drop what was never exported: the exporter
//! then stops with [`Error::Trimmed`]).
//!
//! Each message carries its change's log position (log id, partition,
//! sequence numbers) and op id, so consumers can deduplicate what a restart
//! delivers twice; one key's changes are in one partition and are published
//! in order on one channel. See [`ExportedChange`] for the body.
//!
//! ```no_run
//! # async fn run() -> Result<(), lattice_export::Error> {
//! use lattice_export::{Exporter, Settings, Stats};
//! let client = lattice_client::Client::new(
//!     vec!["n1@127.0.0.1:7401".parse::<lattice_client::Endpoint>()?],
//!     "TOKEN",
//!     &std::fs::read_to_string(".lattice-dev/ca.pem").unwrap_or_default(),
//! )?;
//! let settings = Settings::new("amqp://guest:guest@127.0.0.1:5672/%2f");
//! let stats = Stats::new();
//! Exporter::new(&client, &settings, &stats).run().await
//! # }
//! ```
#![warn(missing_docs)]
#![warn(unreachable_pub)]

mod broker;
mod exporter;
mod lag;
mod message;
mod stats;

pub use broker::{Broker, Topology};
pub use exporter::{Exporter, Settings, CHECKPOINT_PREFIX};
pub use lag::{probe_lag, LAG_COUNT_MAX};
pub use message::{ExportedChange, CONTENT_TYPE, MAX_BODY_BYTES, PERSISTENT};
pub use stats::Stats;

/// What can stop or delay an export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the log or storing the checkpoint in Lattice failed.
    #[error("lattice: {0}")]
    Lattice(#[from] lattice_client::Error),
    /// The broker refused or dropped a connection, channel or publish.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker did not accept a connection in time.
    #[error("the broker did not accept a connection within {0:?}")]
    ConnectTimeout(std::time::Duration),
    /// The broker did not confirm a batch in time.
    #[error("the broker did not confirm {count} messages within {waited:?}")]
    ConfirmTimeout {
        /// Messages waiting for their confirm.
        count: usize,
        /// How long the exporter waited.
        waited: std::time::Duration,
    },
    /// The broker refused a message (a negative acknowledgement).
    #[error("the broker refused the message {0}")]
    Nacked(String),
    /// The broker could route a message to no queue (it would be lost).
    #[error("the broker routed the message {0} to no queue: bind a queue to the exchange")]
    Unroutable(String),
    /// The checkpoint is past what the log retains, or belongs to another
    /// log: changes were dropped before they were exported.
    #[error(
        "the log no longer holds the checkpoint's position ({0}); changes were lost to retention \
         before export. Re-read the state, then delete the checkpoint register to export from the oldest retained change"
    )]
    Trimmed(String),
    /// A change could not be encoded.
    #[error("encoding a change: {0}")]
    Encode(String),
    /// A body could not be decoded.
    #[error("decoding a change: {0}")]
    Decode(String),
}

impl Error {
    /// True when retrying cannot help: the exporter stops.
    pub fn is_fatal(&self) -> bool {
        use lattice_client::Error as L;
        match self {
            Error::Trimmed(_) | Error::Encode(_) => true,
            Error::Lattice(e) => matches!(
                e,
                L::Config(_) | L::Unauthorized(_) | L::TypeMismatch(_) | L::InvalidRequest(_) | L::PolicyDenied { .. }
            ),
            Error::Broker(_)
            | Error::ConnectTimeout(_)
            | Error::ConfirmTimeout { .. }
            | Error::Nacked(_)
            | Error::Unroutable(_)
            | Error::Decode(_) => false,
        }
    }

    /// A Lattice error, with the log's trimming made its own variant.
    pub(crate) fn lattice(e: lattice_client::Error) -> Error {
        match e {
            lattice_client::Error::Trimmed(m) => Error::Trimmed(m),
            e => Error::Lattice(e),
        }
    }
}
