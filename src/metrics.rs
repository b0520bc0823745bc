//! The Prometheus recorder (installed once per process) and process gauges.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first use and returns the handle that renders it.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0,
            ];
            let counts = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), &counts))
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then ours
            // renders nothing, which is the embedder's choice.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The `# HELP` line of every metric.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "fleetlm_appends_total",
        "Appends answered, by result (appended, deduplicated, refused)."
    );
    describe_counter!(
        "fleetlm_archive_flush_errors_total",
        "Archive flush cycles that failed (retried with backoff)."
    );
    describe_counter!("fleetlm_archive_messages_total", "Messages written to the archive.");
    describe_counter!(
        "fleetlm_archive_shard_failures_total",
        "Flush attempts of one shard whose WAL entries could not be read or decoded, by shard."
    );
    describe_counter!(
        "fleetlm_leader_handovers_total",
        "Shard leaderships this node handed to another member, by reason (balance: to even out how many shards each member leads)."
    );
    describe_counter!(
        "fleetlm_consensus_group_restarts_total",
        "A shard's consensus group on this node stopped on a storage error (a full disk, an unreadable entry) and was started again from its durable log, by shard."
    );
    describe_counter!(
        "fleetlm_consensus_group_restarts_asked_total",
        "A shard's consensus group on this node restarted on request, not on an error: a leadership transfer nobody took up, or the retry of a damaged log's refetch."
    );
    describe_counter!(
        "fleetlm_consensus_stalled_transfers_total",
        "Leadership transfers this node started that no member took up within twice the election timeout (the group then restarts to be led again)."
    );
    describe_counter!(
        "fleetlm_replica_refetches_postponed_total",
        "Refetches of a damaged shard log that could not begin (too few other members could vote, or the member's own records could not be written); tried again later."
    );
    describe_counter!(
        "fleetlm_replica_refetches_total",
        "Damaged shard logs of this cluster member cut back to their intact prefix and refetched from the other members (counted when the member votes again)."
    );
    describe_counter!(
        "fleetlm_task_restarts_total",
        "Long-lived parts (shard writer, wal lane, flusher, dispatcher, ...) restarted after a panic or an unexpected stop, by task."
    );
    describe_counter!(
        "fleetlm_dispatches_total",
        "Agent dispatches ended, by outcome (ok, failed)."
    );
    describe_counter!("fleetlm_inbox_pushes_total", "inbox_delta pushes sent.");
    describe_counter!(
        "fleetlm_outbound_overflows_total",
        "Live events dropped because a socket's queue was full."
    );
    describe_counter!("fleetlm_sessions_created_total", "Sessions created.");
    describe_counter!(
        "fleetlm_sessions_evicted_total",
        "Idle, fully archived sessions removed from memory."
    );
    describe_counter!(
        "fleetlm_sessions_loaded_total",
        "Sessions loaded from the archive into memory."
    );
    describe_counter!(
        "fleetlm_client_id_unchecked_total",
        "Sends whose client_id, older than the in-memory window, was taken as new because the archive could not be asked."
    );
    describe_counter!(
        "fleetlm_socket_bad_frames_total",
        "WebSocket frames that could not be parsed."
    );
    describe_counter!(
        "fleetlm_socket_closed_slow_total",
        "Sockets closed with 1013 for not reading."
    );
    describe_counter!(
        "fleetlm_socket_resyncs_total",
        "resync pushes sent to sockets that fell behind."
    );
    describe_counter!(
        "fleetlm_stream_chunks_total",
        "Agent reply chunks forwarded as stream_chunk."
    );
    describe_counter!("fleetlm_wal_segment_rotations_total", "WAL segment files started.");
    describe_counter!(
        "fleetlm_webhook_failures_total",
        "Webhook transport failures, by cause (connection refused, timed out, ...)."
    );
    describe_counter!(
        "fleetlm_webhook_malformed_lines_total",
        "Agent reply lines that were not JSON or not a chunk."
    );
    describe_counter!(
        "fleetlm_webhook_replies_cut_total",
        "Agent replies ended for exceeding the size, chunk or time cap."
    );
    describe_counter!("fleetlm_webhook_retries_total", "Webhook attempts retried.");
    describe_gauge!("fleetlm_active_sessions", "Sessions in memory, by shard.");
    describe_gauge!("fleetlm_archive_lag_entries", "WAL entries not yet archived, by shard.");
    describe_gauge!(
        "fleetlm_archive_lag_seconds",
        Unit::Seconds,
        "Age of the oldest unarchived WAL entry, by shard."
    );
    describe_gauge!(
        "fleetlm_dispatch_queue_length",
        "Sessions waiting for a dispatch (debouncing or ready)."
    );
    describe_gauge!("fleetlm_joined_channels", "Channels joined on open sockets.");
    describe_gauge!(
        "fleetlm_process_rss_bytes",
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!("fleetlm_sockets", "Open WebSockets.");
    describe_gauge!("fleetlm_wal_disk_bytes", Unit::Bytes, "Disk used by WAL segments.");
    describe_gauge!(
        "fleetlm_wal_kept_bytes",
        Unit::Bytes,
        "WAL segments by what keeps them: for=flowing (counted against every shard's budget), archive_stalled, degraded."
    );
    describe_gauge!(
        "fleetlm_archive_shard_stalled",
        "1 while the flusher cannot read or decode this shard's WAL entries (set aside, retried), by shard."
    );
    describe_histogram!(
        "fleetlm_append_commit_seconds",
        Unit::Seconds,
        "Log entry handed to the WAL until durable."
    );
    describe_histogram!(
        "fleetlm_append_seconds",
        Unit::Seconds,
        "Append received until acknowledged (after fsync)."
    );
    describe_histogram!(
        "fleetlm_archive_flush_seconds",
        Unit::Seconds,
        "One archive flush cycle."
    );
    describe_histogram!("fleetlm_wal_fsync_batch_records", "Records per WAL group commit.");
    describe_histogram!("fleetlm_wal_fsync_seconds", Unit::Seconds, "One WAL write + fdatasync.");
    describe_histogram!(
        "fleetlm_webhook_seconds",
        Unit::Seconds,
        "One webhook attempt, request to end of reply."
    );
    describe_histogram!(
        "fleetlm_ws_send_seconds",
        Unit::Seconds,
        "WebSocket send handled until its ack is queued."
    );
}

/// Resident set size of this process, from /proc (Linux).
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * 4096)
}
