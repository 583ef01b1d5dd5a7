//! `scoresync run`: source and sink in one process, the default way to run scoresync. SIGTERM
//! drains both; a permanent error in either stops both and exits 1.

use std::process::ExitCode;
use std::sync::Arc;

use error_reporter::Report;
use tokio_util::sync::CancellationToken;

use scoresync_sink::SinkStats;
use scoresync_source::Source;

use crate::commands::Role;
use crate::config::Config;

/// Runs both roles until SIGTERM/SIGINT or a permanent error.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let stats = Arc::new(SinkStats::default());
    crate::commands::serve_metrics(config, Role::Run, Some(&stats), &shutdown).await?;
    let mut source = Source::new(config.postgres.clone(), config.kafka.clone());
    source.max_in_flight = config.source.max_in_flight_events;
    source.snapshot_chunk_rows = config.source.snapshot_chunk_rows;
    let sink = crate::commands::sink::sink(config, stats);

    let source_stop = shutdown.child_token();
    let sink_stop = shutdown.child_token();
    let mut source_task = tokio::spawn(source.run(source_stop.clone()));
    let mut sink_task = tokio::spawn(sink.run(sink_stop.clone()));
    let mut failed = false;
    // Whichever ends first (a permanent error, or shutdown) stops the other.
    tokio::select! {
        result = &mut source_task => {
            failed |= report("source", result.map(|r| r.map_err(|e| Report::new(&e).to_string())));
            sink_stop.cancel();
            failed |= report("sink", sink_task.await.map(|r| r.map_err(|e| Report::new(&e).to_string())));
        }
        result = &mut sink_task => {
            failed |= report("sink", result.map(|r| r.map_err(|e| Report::new(&e).to_string())));
            source_stop.cancel();
            failed |= report("source", source_task.await.map(|r| r.map_err(|e| Report::new(&e).to_string())));
        }
    }
    shutdown.cancel();
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Prints a role's failure; true when it failed.
fn report(role: &str, result: Result<Result<(), String>, tokio::task::JoinError>) -> bool {
    match result {
        Ok(Ok(())) => false,
        Ok(Err(message)) => {
            eprintln!("scoresync {role}: {message}");
            true
        }
        Err(join) => {
            eprintln!("scoresync {role}: task failed: {join}");
            true
        }
    }
}
