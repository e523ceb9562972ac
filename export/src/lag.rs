//! How far behind the export is: counted from the log itself, so that it
//! keeps growing while the broker is down and the exporter is not reading.

use crate::exporter::exported;
use crate::stats::Stats;
use crate::Error;
use lattice_client::Client;
use lattice_core::proto::client::LOG_MAX_CHANGES;
use std::time::Duration;

/// Most changes one probe counts (ten pages): the lag reads "at least
/// this" beyond it, and a probe's cost on the node stays bounded.
pub const LAG_COUNT_MAX: u64 = 10 * LOG_MAX_CHANGES as u64;

/// Counts the changes of node 0 of `client` after the stored checkpoint
/// that the exporter would publish (up to [`LAG_COUNT_MAX`]) and the age
/// of the oldest, and stores both in `stats`. Does nothing before the
/// exporter has read its checkpoint.
pub async fn probe_lag(client: &Client, prefix: &str, partitions: &[u16], stats: &Stats) -> Result<(), Error> {
    let Some(mut from) = stats.checkpoint() else {
        return Ok(());
    };
    let (mut count, mut oldest) = (0u64, None::<u64>);
    for _ in 0..LAG_COUNT_MAX / u64::from(LOG_MAX_CHANGES) {
        let page = client
            .log_read(0, partitions, from.clone(), prefix, LOG_MAX_CHANGES, Duration::ZERO)
            .await
            .map_err(Error::lattice)?;
        for l in page.changes.iter().filter(|l| exported(l)) {
            count += 1;
            let at = l.change.applied.wall_ms;
            oldest = Some(oldest.map_or(at, |o| o.min(at)));
        }
        if from.as_ref() == Some(&page.next) || page.changes.is_empty() {
            break;
        }
        from = Some(page.next);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    stats.lag_changes.set(count as i64);
    stats.lag_ms.set(oldest.map_or(0, |o| now.saturating_sub(o)) as i64);
    Ok(())
}
