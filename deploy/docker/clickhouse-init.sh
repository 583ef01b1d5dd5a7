#!/usr/bin/env bash
# Runs once when a ClickHouse container initialises: creates the `director` database and applies
# schemas/clickhouse in order, as the local stack does on each shard.
set -euo pipefail
clickhouse client -q "CREATE DATABASE IF NOT EXISTS director"
for f in /schemas/*.sql; do
    clickhouse client --database director --multiquery <"$f"
done
