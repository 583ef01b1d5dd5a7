#!/usr/bin/env bash
# Runs once when the PostgreSQL container initialises: applies schemas/postgres in order, as the
# local stack does, with the scoresync role's password from $SCORESYNC_PASSWORD.
set -euo pipefail
for f in /schemas/*.sql; do
    psql -v ON_ERROR_STOP=1 -v scoresync_password="${SCORESYNC_PASSWORD:-scoresync}" \
        --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -q -f "$f"
done
