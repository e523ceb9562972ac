//! The RabbitMQ side: one connection, one confirming channel, the durable
//! exchange (and optionally a queue bound to it), and publishing a batch.

use crate::message::ExportedChange;
use crate::Error;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;

/// Where messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// A durable topic exchange, declared if missing. Routing keys are
    /// partition numbers.
    pub exchange: String,
    /// A durable classic queue bound to the exchange with `#` (every
    /// message), declared if missing, so that changes published before any
    /// consumer bound its own queue are kept (`None`: declare none; a
    /// message no queue takes is then an error, not a silent loss).
    pub queue: Option<String>,
}

/// A connection to the broker with a channel in confirm mode.
pub struct Broker {
    conn: Connection,
    channel: Channel,
    exchange: String,
}

impl Broker {
    /// Connects to `url` (`amqp://` or `amqps://`), declares `topology`
    /// and puts the channel in confirm mode, all within `timeout` (a broker
    /// that accepts the connection and then says nothing must not hang the
    /// exporter).
    pub async fn connect(url: &str, topology: &Topology, timeout: Duration) -> Result<Broker, Error> {
        tokio::time::timeout(timeout, Broker::open(url, topology))
            .await
            .map_err(|_| Error::ConnectTimeout(timeout))?
    }

    async fn open(url: &str, topology: &Topology) -> Result<Broker, Error> {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name("lattice-export".into());
        let conn = Connection::connect(url, props).await?;
        let channel = conn.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(&topology.exchange, ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        if let Some(q) = &topology.queue {
            let opts = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel.queue_declare(q, opts, FieldTable::default()).await?;
            channel
                .queue_bind(
                    q,
                    &topology.exchange,
                    "#",
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Broker {
            conn,
            channel,
            exchange: topology.exchange.clone(),
        })
    }

    /// Publishes `batch` in order (persistent, mandatory) and waits until
    /// the broker confirmed every message, at most `timeout` in all (a
    /// broker under a memory or disk alarm blocks publishers: that shows
    /// here as [`Error::ConfirmTimeout`]). Any refused or unroutable
    /// message fails the batch: the caller publishes it again later.
    pub async fn publish(&self, batch: &[ExportedChange], timeout: Duration) -> Result<(), Error> {
        let work = async {
            let mut confirms = Vec::with_capacity(batch.len());
            for change in batch {
                let body = change.encode()?;
                let opts = BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                };
                let confirm = self
                    .channel
                    .basic_publish(&self.exchange, &change.routing_key(), opts, &body, change.properties())
                    .await?;
                confirms.push((change.message_id(), confirm));
            }
            for (id, confirm) in confirms {
                match confirm.await? {
                    Confirmation::Ack(None) => {}
                    Confirmation::Ack(Some(_)) => return Err(Error::Unroutable(id)),
                    Confirmation::Nack(_) | Confirmation::NotRequested => return Err(Error::Nacked(id)),
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::ConfirmTimeout {
                count: batch.len(),
                waited: timeout,
            })?
    }

    /// Closes the connection politely (errors ignored: it is going away).
    pub async fn close(self) {
        let _ = self.channel.close(200, "bye").await;
        let _ = self.conn.close(200, "bye").await;
    }
}
