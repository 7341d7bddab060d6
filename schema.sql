-- arbstr request log (SPEC §7). One row per client request.
--
-- Applied by arbstr_core/log/db.py on every start: every statement is idempotent. The last line
-- records the schema version in PRAGMA user_version. To change the schema later: edit this file so a
-- fresh database gets the new shape, add the statements that bring an existing database from version
-- N-1 to N under key N in arbstr_core/log/db.py MIGRATIONS (they run before this file), and bump the version below.
-- A migration ends with the hourly totals recomputed from every row, all in one transaction. A database
-- whose user_version is newer than this file is left alone.
--
-- What the writer pays for, per row, into a log of a million rows: an index whose key order is not
-- time order dirties a page in a random place, about one 4 KiB WAL frame per row each; an index that
-- starts with the time (or the hour, or a name then the time) appends to a few hot pages. So only
-- request_id (unique) and latency_ms (percentiles over any range) have such an index; cost_sats is
-- sorted hour by hour.
--
-- timestamp is ISO 8601 UTC with milliseconds and Z ("2026-05-01T12:34:56.789Z") so that text order
-- is time order and range filters use the index. model, provider and policy compare case-insensitively
-- (COLLATE NOCASE), so filters and grouping ignore case and still use their indexes. api is NULL in the
-- rows logged before version 3, which all came through chat completions: readers take NULL as 'chat'
-- (log/db.py API_OF_ROW), and so do the hourly tables.

CREATE TABLE IF NOT EXISTS requests (
    id                 INTEGER PRIMARY KEY,
    request_id         TEXT    NOT NULL UNIQUE,
    timestamp          TEXT    NOT NULL,
    model              TEXT    COLLATE NOCASE,
    provider           TEXT    COLLATE NOCASE,
    policy             TEXT    COLLATE NOCASE,
    streaming          INTEGER NOT NULL DEFAULT 0,   -- 0/1
    status             TEXT    NOT NULL,             -- ok, error, streaming, complete, interrupted, client_disconnected
    success            INTEGER NOT NULL DEFAULT 0,   -- 0/1
    http_status        INTEGER,
    input_tokens       INTEGER,
    output_tokens      INTEGER,
    cost_sats          REAL,                         -- NULL = unknown (no usage), never 0 for unknown
    latency_ms         INTEGER,                      -- milliseconds (a fraction is kept if one is given)
    ttft_ms            INTEGER,
    stream_duration_ms INTEGER,
    retries            TEXT,                         -- "2/provider-alpha, 1/provider-beta", as x-arbstr-retries
    error_type         TEXT,
    error_message      TEXT,
    client_retry_count INTEGER,                      -- x-stainless-retry-count sent by the client
    writer             TEXT,                         -- token of the LogStore that inserted the row (not in the API)
    -- Version 3 (after writer: ALTER TABLE appends, so a new and a migrated database have one column order).
    -- Rows written before version 3 have NULL in all seven: their reported cost and savings are unknown.
    cached_tokens      INTEGER,                      -- usage.prompt_tokens_details.cached_tokens, part of input_tokens
    reasoning_tokens   INTEGER,                      -- usage.completion_tokens_details.reasoning_tokens, part of output_tokens
    cost_source        TEXT,                         -- cost_sats is: 'provider' (what it said it charged), 'rates'; NULL: unknown
    rates_cost_sats    REAL,                         -- the rates formula for the usage (SPEC §2.3), whatever cost_source says
    max_cost_sats      REAL,                         -- the rates formula at the dearest provider that could have served it
    api                TEXT,                         -- the client's API: 'chat' (/v1/chat/completions), 'messages'
                                                     -- (/v1/messages); NULL: logged before version 3, read as 'chat'
    routed_model       TEXT    COLLATE NOCASE,       -- the model id sent to providers when an [aliases] entry renamed
                                                     -- model (which keeps the client's name); NULL: model itself
    -- Version 4. NULL in the rows written before.
    output_tokens_per_sec REAL                       -- output tokens over a stream's first content → end, or over an
                                                     -- answer's latency (request/speed.py); NULL: unknown
);

-- Filters and sorts of /v1/stats and /v1/requests. SQLite appends the rowid (id) to every index,
-- which is the tie-breaker of every sort.
CREATE INDEX IF NOT EXISTS idx_requests_timestamp ON requests (timestamp);
CREATE INDEX IF NOT EXISTS idx_requests_model     ON requests (model, timestamp);
CREATE INDEX IF NOT EXISTS idx_requests_provider  ON requests (provider, timestamp);
CREATE INDEX IF NOT EXISTS idx_requests_policy    ON requests (policy, timestamp);
CREATE INDEX IF NOT EXISTS idx_requests_success   ON requests (success, timestamp);
CREATE INDEX IF NOT EXISTS idx_requests_streaming ON requests (streaming, timestamp);
-- Sorting by cost: each hour's rows in cost order, with the filter columns so that rows which do not
-- match are skipped without reading the table; a page merges the hours (reads/costorder.py).
CREATE INDEX IF NOT EXISTS idx_requests_hour_cost
    ON requests (substr(timestamp, 1, 13), cost_sats, timestamp, success, streaming, model, provider, policy, api);
-- Sorting by latency, and latency percentiles over many rows (SPEC §4.7 p50/p95/p99 of successful
-- requests), walk this index in latency order, from the edge of the latency band that holds the rank
-- (requests_latency_hourly below), and check success, time, name and API filters without reading the table.
CREATE INDEX IF NOT EXISTS idx_requests_latency
    ON requests (latency_ms, success, timestamp, model, provider, policy, api);
-- The same, hour by hour: the percentiles of one hour (group_by=hour) walk only that hour's rows.
CREATE INDEX IF NOT EXISTS idx_requests_hour_latency
    ON requests (substr(timestamp, 1, 13), success, latency_ms, timestamp, model, provider, policy, api);
-- First-token times and speeds: the same two walks, over the rows that have one (partial indexes: a
-- non-streaming row has no first-token time, and adds nothing to that index).
CREATE INDEX IF NOT EXISTS idx_requests_ttft
    ON requests (ttft_ms, success, timestamp, model, provider, policy, api) WHERE ttft_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_requests_hour_ttft
    ON requests (substr(timestamp, 1, 13), success, ttft_ms, timestamp, model, provider, policy, api)
    WHERE ttft_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_requests_speed
    ON requests (output_tokens_per_sec, success, timestamp, model, provider, policy, api)
    WHERE output_tokens_per_sec IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_requests_hour_speed
    ON requests (substr(timestamp, 1, 13), success, output_tokens_per_sec, timestamp, model, provider, policy, api)
    WHERE output_tokens_per_sec IS NOT NULL;
-- Only the rows of streams in flight: the startup sweep that marks orphans 'interrupted' reads it.
CREATE INDEX IF NOT EXISTS idx_requests_streaming_status ON requests (writer) WHERE status = 'streaming';

-- Hourly totals, so /v1/stats sums a few thousand rows instead of scanning a million: the rows with
-- id <= rollup_state.upto are in requests_hourly and requests_latency_hourly, the newer ones (the
-- "tail") are not, and readers sum them from requests. The writer folds the tail in at the end of each
-- transaction (log/db.py roll_up): one GROUP BY per batch costs the writer far less than a trigger per
-- insert (which also made SQLite keep a statement journal for every row). Updates and deletes of rows
-- already folded in are applied by the triggers below, in the same transaction. NULL model, provider
-- and policy are stored as '', a NULL api as 'chat'. The key is log/db.py KEY_OF_ROW.
CREATE TABLE IF NOT EXISTS rollup_state (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    upto INTEGER NOT NULL                            -- rows with id <= upto are in the hourly tables
);
INSERT OR IGNORE INTO rollup_state (one, upto) VALUES (1, 0);

-- The sums after the key are declared once, in this order, by log/db.py SUMS, which the roll-up and the
-- readers follow; the triggers below spell them again, row by row and by position, and
-- tests/test_logstore.py checks that they agree.
CREATE TABLE IF NOT EXISTS requests_hourly (
    hour               TEXT    NOT NULL,             -- substr(timestamp, 1, 13): '2026-05-01T13'
    model              TEXT    NOT NULL COLLATE NOCASE,
    provider           TEXT    NOT NULL COLLATE NOCASE,
    policy             TEXT    NOT NULL COLLATE NOCASE,
    api                TEXT    NOT NULL,             -- 'chat', 'messages'
    total              INTEGER NOT NULL,
    success            INTEGER NOT NULL,
    streaming          INTEGER NOT NULL,
    ok_streaming       INTEGER NOT NULL,             -- successful streams: with the two above, every
                                                     -- success/streaming combination is a difference
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    cost_sats          REAL    NOT NULL,             -- sum of known costs
    costed             INTEGER NOT NULL,             -- rows with a known cost
    reported_cost_sats REAL    NOT NULL,             -- sum of the costs the providers reported (cost_source 'provider')
    rates_cost_sats    REAL    NOT NULL,             -- sum of the rates formula's costs
    rates_n            INTEGER NOT NULL,             -- rows with one
    savings_sats       REAL    NOT NULL,             -- sum of MAX(max_cost_sats - cost_sats, 0), rows with both known
    savings_n          INTEGER NOT NULL,             -- rows with both known
    latency_sum        REAL    NOT NULL,             -- successful rows with a latency
    latency_n          INTEGER NOT NULL,
    ttft_sum           REAL    NOT NULL,             -- successful rows with a ttft
    ttft_n             INTEGER NOT NULL,
    PRIMARY KEY (hour, model, provider, policy, api)
) WITHOUT ROWID;

-- Successful latencies counted per hour, name and band: a percentile's rank falls in a known band, and
-- the walk in idx_requests_latency starts at that band's edge (reads/percentiles.py), so the narrower the
-- bands the shorter the walk, and the more rows here. Four bands an octave (4, 5, 6, 7, 8, 10, 12, ...
-- ms, up to 8 hours), below 4 ms one a millisecond, below 1 ms one. Never change the bands of an
-- existing database: the counts are filed under them. The key is the hourly key and the band, stored
-- hour, band, then the names: readers sum the bands hour by hour in this order, which SQLite does as it
-- reads, without sorting every row of the range (reads/queries.py FEW_NAMES).
CREATE TABLE IF NOT EXISTS latency_bands (lo INTEGER PRIMARY KEY);  -- a band is [lo, next lo)
INSERT OR IGNORE INTO latency_bands (lo) VALUES (-9223372036854775808), (1), (2), (3);
WITH RECURSIVE octave(base) AS (SELECT 1 UNION ALL SELECT base * 2 FROM octave WHERE base < 4194304)
INSERT OR IGNORE INTO latency_bands (lo) SELECT base * column1 FROM octave, (VALUES (4), (5), (6), (7));
CREATE TABLE IF NOT EXISTS requests_latency_hourly (
    hour     TEXT    NOT NULL,
    model    TEXT    NOT NULL COLLATE NOCASE,
    provider TEXT    NOT NULL COLLATE NOCASE,
    policy   TEXT    NOT NULL COLLATE NOCASE,
    api      TEXT    NOT NULL,
    band     INTEGER NOT NULL,                       -- latency_bands.lo
    n        INTEGER NOT NULL,
    PRIMARY KEY (hour, band, model, provider, policy, api)
) WITHOUT ROWID;
-- The same for successful first-token times (ttft_ms, streams) and speeds (output_tokens_per_sec, in
-- tokens a second), read by the percentiles of log/db.py METRICS, on wider bands: one an octave, the
-- latency_bands that start one (lo is a power of two, or the band below 1).
CREATE TABLE IF NOT EXISTS requests_ttft_hourly (
    hour     TEXT    NOT NULL,
    model    TEXT    NOT NULL COLLATE NOCASE,
    provider TEXT    NOT NULL COLLATE NOCASE,
    policy   TEXT    NOT NULL COLLATE NOCASE,
    api      TEXT    NOT NULL,
    band     INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (hour, band, model, provider, policy, api)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests_speed_hourly (
    hour     TEXT    NOT NULL,
    model    TEXT    NOT NULL COLLATE NOCASE,
    provider TEXT    NOT NULL COLLATE NOCASE,
    policy   TEXT    NOT NULL COLLATE NOCASE,
    api      TEXT    NOT NULL,
    band     INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (hour, band, model, provider, policy, api)
) WITHOUT ROWID;

-- Per provider and per policy (groups read a name at a time, and filters: reads/queries.py FEW_NAMES):
-- one name's band counts over a range, in hour and band order, without reading the other names' rows.
CREATE INDEX IF NOT EXISTS idx_latency_hourly_provider ON requests_latency_hourly (provider, hour, band, n);
CREATE INDEX IF NOT EXISTS idx_ttft_hourly_provider ON requests_ttft_hourly (provider, hour, band, n);
CREATE INDEX IF NOT EXISTS idx_speed_hourly_provider ON requests_speed_hourly (provider, hour, band, n);
CREATE INDEX IF NOT EXISTS idx_latency_hourly_policy ON requests_latency_hourly (policy, hour, band, n);
CREATE INDEX IF NOT EXISTS idx_ttft_hourly_policy ON requests_ttft_hourly (policy, hour, band, n);
CREATE INDEX IF NOT EXISTS idx_speed_hourly_policy ON requests_speed_hourly (policy, hour, band, n);

-- A row's key and sums (log/db.py SUMS) leave the hourly totals when it is deleted, and move when it is
-- updated; each VALUES list holds them in requests_hourly's column order.
CREATE TRIGGER IF NOT EXISTS requests_hourly_delete AFTER DELETE ON requests
WHEN OLD.id <= (SELECT upto FROM rollup_state) BEGIN
    INSERT INTO requests_hourly VALUES (
        substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''), COALESCE(OLD.provider, ''),
        COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'), -1, -(OLD.success = 1), -(OLD.streaming = 1),
        -(OLD.success = 1 AND OLD.streaming = 1),
        -COALESCE(OLD.input_tokens, 0), -COALESCE(OLD.output_tokens, 0),
        -COALESCE(OLD.cached_tokens, 0), -COALESCE(OLD.reasoning_tokens, 0),
        -COALESCE(OLD.cost_sats, 0), -(OLD.cost_sats IS NOT NULL),
        -IIF(OLD.cost_source = 'provider', COALESCE(OLD.cost_sats, 0), 0),
        -COALESCE(OLD.rates_cost_sats, 0), -(OLD.rates_cost_sats IS NOT NULL),
        -COALESCE(MAX(OLD.max_cost_sats - OLD.cost_sats, 0), 0),
        -(OLD.max_cost_sats IS NOT NULL AND OLD.cost_sats IS NOT NULL),
        -IIF(OLD.success = 1, COALESCE(OLD.latency_ms, 0), 0), -(OLD.success = 1 AND OLD.latency_ms IS NOT NULL),
        -IIF(OLD.success = 1, COALESCE(OLD.ttft_ms, 0), 0), -(OLD.success = 1 AND OLD.ttft_ms IS NOT NULL))
    ON CONFLICT DO UPDATE SET
        total = total + excluded.total, success = success + excluded.success,
        streaming = streaming + excluded.streaming, ok_streaming = ok_streaming + excluded.ok_streaming,
        input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
        cached_tokens = cached_tokens + excluded.cached_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_sats = cost_sats + excluded.cost_sats, costed = costed + excluded.costed,
        reported_cost_sats = reported_cost_sats + excluded.reported_cost_sats,
        rates_cost_sats = rates_cost_sats + excluded.rates_cost_sats, rates_n = rates_n + excluded.rates_n,
        savings_sats = savings_sats + excluded.savings_sats, savings_n = savings_n + excluded.savings_n,
        latency_sum = latency_sum + excluded.latency_sum, latency_n = latency_n + excluded.latency_n,
        ttft_sum = ttft_sum + excluded.ttft_sum, ttft_n = ttft_n + excluded.ttft_n;
    DELETE FROM requests_hourly WHERE total = 0 AND hour = substr(OLD.timestamp, 1, 13)
        AND model = COALESCE(OLD.model, '') AND provider = COALESCE(OLD.provider, '')
        AND policy = COALESCE(OLD.policy, '') AND api = COALESCE(OLD.api, 'chat');
    INSERT INTO requests_latency_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.latency_ms), -1
        WHERE OLD.success = 1 AND OLD.latency_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    DELETE FROM requests_latency_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
    INSERT INTO requests_ttft_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.ttft_ms AND (lo < 1 OR (lo & (lo - 1)) = 0)), -1
        WHERE OLD.success = 1 AND OLD.ttft_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    INSERT INTO requests_speed_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.output_tokens_per_sec AND (lo < 1 OR (lo & (lo - 1)) = 0)), -1
        WHERE OLD.success = 1 AND OLD.output_tokens_per_sec IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    DELETE FROM requests_ttft_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
    DELETE FROM requests_speed_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
    -- Deleting the newest rows lets SQLite hand their ids out again: keep upto at or below the
    -- largest id left, so a reused id counts as new.
    UPDATE rollup_state SET upto = (SELECT COALESCE(MAX(id), 0) FROM requests)
        WHERE upto > (SELECT COALESCE(MAX(id), 0) FROM requests);
END;

CREATE TRIGGER IF NOT EXISTS requests_hourly_update AFTER UPDATE OF
    timestamp, model, provider, policy, api, streaming, success, input_tokens, output_tokens, cached_tokens,
    reasoning_tokens, cost_sats, cost_source, rates_cost_sats, max_cost_sats, latency_ms, ttft_ms,
    output_tokens_per_sec
ON requests WHEN OLD.id <= (SELECT upto FROM rollup_state) BEGIN
    INSERT INTO requests_hourly VALUES (
        substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''), COALESCE(OLD.provider, ''),
        COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'), -1, -(OLD.success = 1), -(OLD.streaming = 1),
        -(OLD.success = 1 AND OLD.streaming = 1),
        -COALESCE(OLD.input_tokens, 0), -COALESCE(OLD.output_tokens, 0),
        -COALESCE(OLD.cached_tokens, 0), -COALESCE(OLD.reasoning_tokens, 0),
        -COALESCE(OLD.cost_sats, 0), -(OLD.cost_sats IS NOT NULL),
        -IIF(OLD.cost_source = 'provider', COALESCE(OLD.cost_sats, 0), 0),
        -COALESCE(OLD.rates_cost_sats, 0), -(OLD.rates_cost_sats IS NOT NULL),
        -COALESCE(MAX(OLD.max_cost_sats - OLD.cost_sats, 0), 0),
        -(OLD.max_cost_sats IS NOT NULL AND OLD.cost_sats IS NOT NULL),
        -IIF(OLD.success = 1, COALESCE(OLD.latency_ms, 0), 0), -(OLD.success = 1 AND OLD.latency_ms IS NOT NULL),
        -IIF(OLD.success = 1, COALESCE(OLD.ttft_ms, 0), 0), -(OLD.success = 1 AND OLD.ttft_ms IS NOT NULL))
    ON CONFLICT DO UPDATE SET
        total = total + excluded.total, success = success + excluded.success,
        streaming = streaming + excluded.streaming, ok_streaming = ok_streaming + excluded.ok_streaming,
        input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
        cached_tokens = cached_tokens + excluded.cached_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_sats = cost_sats + excluded.cost_sats, costed = costed + excluded.costed,
        reported_cost_sats = reported_cost_sats + excluded.reported_cost_sats,
        rates_cost_sats = rates_cost_sats + excluded.rates_cost_sats, rates_n = rates_n + excluded.rates_n,
        savings_sats = savings_sats + excluded.savings_sats, savings_n = savings_n + excluded.savings_n,
        latency_sum = latency_sum + excluded.latency_sum, latency_n = latency_n + excluded.latency_n,
        ttft_sum = ttft_sum + excluded.ttft_sum, ttft_n = ttft_n + excluded.ttft_n;
    INSERT INTO requests_hourly VALUES (
        substr(NEW.timestamp, 1, 13), COALESCE(NEW.model, ''), COALESCE(NEW.provider, ''),
        COALESCE(NEW.policy, ''), COALESCE(NEW.api, 'chat'), 1, (NEW.success = 1), (NEW.streaming = 1),
        (NEW.success = 1 AND NEW.streaming = 1),
        COALESCE(NEW.input_tokens, 0), COALESCE(NEW.output_tokens, 0),
        COALESCE(NEW.cached_tokens, 0), COALESCE(NEW.reasoning_tokens, 0),
        COALESCE(NEW.cost_sats, 0), (NEW.cost_sats IS NOT NULL),
        IIF(NEW.cost_source = 'provider', COALESCE(NEW.cost_sats, 0), 0),
        COALESCE(NEW.rates_cost_sats, 0), (NEW.rates_cost_sats IS NOT NULL),
        COALESCE(MAX(NEW.max_cost_sats - NEW.cost_sats, 0), 0),
        (NEW.max_cost_sats IS NOT NULL AND NEW.cost_sats IS NOT NULL),
        IIF(NEW.success = 1, COALESCE(NEW.latency_ms, 0), 0), (NEW.success = 1 AND NEW.latency_ms IS NOT NULL),
        IIF(NEW.success = 1, COALESCE(NEW.ttft_ms, 0), 0), (NEW.success = 1 AND NEW.ttft_ms IS NOT NULL))
    ON CONFLICT DO UPDATE SET
        total = total + excluded.total, success = success + excluded.success,
        streaming = streaming + excluded.streaming, ok_streaming = ok_streaming + excluded.ok_streaming,
        input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
        cached_tokens = cached_tokens + excluded.cached_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_sats = cost_sats + excluded.cost_sats, costed = costed + excluded.costed,
        reported_cost_sats = reported_cost_sats + excluded.reported_cost_sats,
        rates_cost_sats = rates_cost_sats + excluded.rates_cost_sats, rates_n = rates_n + excluded.rates_n,
        savings_sats = savings_sats + excluded.savings_sats, savings_n = savings_n + excluded.savings_n,
        latency_sum = latency_sum + excluded.latency_sum, latency_n = latency_n + excluded.latency_n,
        ttft_sum = ttft_sum + excluded.ttft_sum, ttft_n = ttft_n + excluded.ttft_n;
    DELETE FROM requests_hourly WHERE total = 0 AND hour = substr(OLD.timestamp, 1, 13)
        AND model = COALESCE(OLD.model, '') AND provider = COALESCE(OLD.provider, '')
        AND policy = COALESCE(OLD.policy, '') AND api = COALESCE(OLD.api, 'chat');
    INSERT INTO requests_latency_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.latency_ms), -1
        WHERE OLD.success = 1 AND OLD.latency_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    INSERT INTO requests_latency_hourly SELECT substr(NEW.timestamp, 1, 13), COALESCE(NEW.model, ''),
        COALESCE(NEW.provider, ''), COALESCE(NEW.policy, ''), COALESCE(NEW.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= NEW.latency_ms), 1
        WHERE NEW.success = 1 AND NEW.latency_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    DELETE FROM requests_latency_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
    INSERT INTO requests_ttft_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.ttft_ms AND (lo < 1 OR (lo & (lo - 1)) = 0)), -1
        WHERE OLD.success = 1 AND OLD.ttft_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    INSERT INTO requests_speed_hourly SELECT substr(OLD.timestamp, 1, 13), COALESCE(OLD.model, ''),
        COALESCE(OLD.provider, ''), COALESCE(OLD.policy, ''), COALESCE(OLD.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= OLD.output_tokens_per_sec AND (lo < 1 OR (lo & (lo - 1)) = 0)), -1
        WHERE OLD.success = 1 AND OLD.output_tokens_per_sec IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    INSERT INTO requests_ttft_hourly SELECT substr(NEW.timestamp, 1, 13), COALESCE(NEW.model, ''),
        COALESCE(NEW.provider, ''), COALESCE(NEW.policy, ''), COALESCE(NEW.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= NEW.ttft_ms AND (lo < 1 OR (lo & (lo - 1)) = 0)), 1
        WHERE NEW.success = 1 AND NEW.ttft_ms IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    INSERT INTO requests_speed_hourly SELECT substr(NEW.timestamp, 1, 13), COALESCE(NEW.model, ''),
        COALESCE(NEW.provider, ''), COALESCE(NEW.policy, ''), COALESCE(NEW.api, 'chat'),
        (SELECT MAX(lo) FROM latency_bands WHERE lo <= NEW.output_tokens_per_sec AND (lo < 1 OR (lo & (lo - 1)) = 0)), 1
        WHERE NEW.success = 1 AND NEW.output_tokens_per_sec IS NOT NULL ON CONFLICT DO UPDATE SET n = n + excluded.n;
    DELETE FROM requests_ttft_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
    DELETE FROM requests_speed_hourly WHERE n = 0 AND hour = substr(OLD.timestamp, 1, 13);
END;

-- Debug captures (README "Debug capture"): written only with [debug] enabled, by the same writer thread,
-- deleted after [debug] retention_days. capture is one JSON document (the client's request, each upstream
-- request with its key masked, the answer as received), scrubbed of every secret before it was queued.
CREATE TABLE IF NOT EXISTS debug_captures (
    request_id TEXT    PRIMARY KEY,
    timestamp  TEXT    NOT NULL,                     -- as requests.timestamp
    capture    TEXT    NOT NULL,                     -- JSON
    bytes      INTEGER NOT NULL,                     -- the parts' stored size
    truncated  INTEGER NOT NULL DEFAULT 0            -- 0/1: a part was cut at [debug] max_bytes
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_debug_captures_timestamp ON debug_captures (timestamp);

-- One row per live LogStore (gunicorn worker). A stream row belongs to a live process while its
-- writer's heartbeat is fresh; rows of dead writers are marked 'interrupted' by the others.
CREATE TABLE IF NOT EXISTS writers (
    token     TEXT PRIMARY KEY,
    pid       INTEGER NOT NULL,
    started   TEXT    NOT NULL,
    heartbeat TEXT    NOT NULL
);

PRAGMA user_version = 4;
