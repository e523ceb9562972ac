//! `lattice-export`: publishes one Lattice node's change log to RabbitMQ.

use anyhow::{Context, Result};
use clap::Parser;
use lattice_client::{Client, Endpoint};
use lattice_export::{probe_lag, Exporter, Settings, Stats, Topology};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Publishes one Lattice node's change log to RabbitMQ, at least once.
///
/// It reads the node's log (a pull: the node never waits for it), publishes
/// each change as a persistent MessagePack message to a durable topic
/// exchange with publisher confirms, and stores its checkpoint as the
/// register `_consumers/NAME` in Lattice once the broker confirmed the
/// changes before it. Started again under the same name, it resumes there;
/// changes published but not yet checkpointed are published again (consumers
/// deduplicate on the message id, `LOG:PARTITION:SEQ`).
#[derive(Parser)]
#[command(name = "lattice-export", version, about, long_about)]
struct Cli {
    /// The node whose log to export, as NAME@HOST:PORT (its certificate
    /// must name NAME). The checkpoint is read and written on it too.
    #[arg(long, env = "LATTICE_EXPORT_ENDPOINT")]
    endpoint: Endpoint,
    /// Client token.
    #[arg(long, env = "LATTICE_TOKEN", hide_env_values = true)]
    token: String,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "LATTICE_CA")]
    ca: PathBuf,
    /// The broker's URL.
    #[arg(
        long,
        env = "LATTICE_EXPORT_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// The durable topic exchange to publish to (declared if missing).
    /// Routing keys are partition numbers.
    #[arg(long, default_value = "lattice.changes")]
    exchange: String,
    /// A durable queue to declare and bind to the exchange with `#`, so no
    /// change is dropped before consumers bind their own; `--queue ''`
    /// declares none (then a message no queue takes stops the batch).
    #[arg(long, default_value = "lattice.changes")]
    queue: String,
    /// Consumer name: the checkpoint is the register `_consumers/NAME`.
    #[arg(long, default_value = "export")]
    name: String,
    /// Export only keys starting with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Export only these partitions (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<u16>,
    /// Most changes per batch: published, confirmed, then checkpointed
    /// together (1 to 1000).
    #[arg(long, default_value_t = 500)]
    batch: u32,
    /// How long a batch may wait for the broker's confirms, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    confirm_timeout_ms: u64,
    /// First wait after a failure, milliseconds (it doubles up to --max-backoff-ms).
    #[arg(long, default_value_t = 200)]
    min_backoff_ms: u64,
    /// Longest wait between attempts, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    max_backoff_ms: u64,
    /// Serve Prometheus metrics (lag, confirmed, retries) on this address,
    /// at /metrics.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// How often to count the lag, milliseconds.
    #[arg(long, default_value_t = 2_000)]
    lag_interval_ms: u64,
    /// How often to log a progress line (lag, confirmed), seconds (0: never).
    #[arg(long, default_value_t = 10)]
    report_interval_s: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let ca = std::fs::read_to_string(&cli.ca).with_context(|| format!("reading the CA {}", cli.ca.display()))?;
    let client = Arc::new(
        Client::new(vec![cli.endpoint.clone()], cli.token.clone(), &ca).context("setting up the Lattice client")?,
    );
    let mut settings = Settings::new(cli.amqp_url.clone());
    settings.topology = Topology {
        exchange: cli.exchange.clone(),
        queue: Some(cli.queue.clone()).filter(|q| !q.is_empty()),
    };
    settings.name.clone_from(&cli.name);
    settings.prefix.clone_from(&cli.prefix);
    settings.partitions.clone_from(&cli.partitions);
    settings.batch = cli.batch.clamp(1, 1_000);
    settings.confirm_timeout = Duration::from_millis(cli.confirm_timeout_ms);
    settings.backoff = (
        Duration::from_millis(cli.min_backoff_ms.max(1)),
        Duration::from_millis(cli.max_backoff_ms.max(cli.min_backoff_ms.max(1))),
    );
    let stats = Arc::new(Stats::new());
    if let Some(addr) = cli.metrics_addr {
        serve_metrics(addr, stats.clone()).await?;
    }
    tokio::spawn(lag_loop(
        client.clone(),
        cli.prefix.clone(),
        cli.partitions.clone(),
        stats.clone(),
        cli.lag_interval_ms,
    ));
    if cli.report_interval_s > 0 {
        tokio::spawn(report_loop(stats.clone(), Duration::from_secs(cli.report_interval_s)));
    }
    tracing::info!(endpoint = %cli.endpoint, exchange = %cli.exchange, name = %cli.name, "lattice-export started");
    Exporter::new(&client, &settings, &stats)
        .run()
        .await
        .with_context(|| format!("exporting the log of {} under the name {:?}", cli.endpoint, cli.name))
}

/// Serves `stats` at `http://ADDR/metrics`.
async fn serve_metrics(addr: SocketAddr, stats: Arc<Stats>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let stats = stats.clone();
            async move { stats.render() }
        }),
    );
    tracing::info!(%addr, "serving metrics at /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(())
}

/// Counts the lag every `every_ms`.
async fn lag_loop(client: Arc<Client>, prefix: String, partitions: Vec<u16>, stats: Arc<Stats>, every_ms: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(100)));
    loop {
        tick.tick().await;
        if let Err(e) = probe_lag(&client, &prefix, &partitions, &stats).await {
            tracing::warn!(error = %e, "counting the export lag failed");
        }
    }
}

/// Logs a progress line every `every`.
async fn report_loop(stats: Arc<Stats>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            confirmed = stats.confirmed.get(),
            lag_changes = stats.lag_changes.get(),
            lag_ms = stats.lag_ms.get(),
            broker_up = stats.broker_up.get(),
            retries = stats.retries.get(),
            "export progress"
        );
    }
}
