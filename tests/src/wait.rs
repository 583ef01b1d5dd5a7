//! Waiting for a condition with a deadline, the only way tests wait.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;

/// How often [`until`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Ok(Some(value))`, then returns the value. Fails with `what` and
/// the last error or `None` when `deadline` passes. Errors from `check` are retried too: servers
/// under test may refuse for a while.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = tokio::time::Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met".to_owned(),
            Err(err) => format!("{err:#}"),
        };
        if started.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
