import { quoteLiteral } from "../protocol/index.ts"
import { STATEMENT_TIMEOUT } from "./settings.ts"

/**
 * The question a transaction-mode relay asks a server at a transaction boundary when its client's
 * SQL may have left session state there (SessionEffects.ts): which settings the session changed,
 * which channels it listens on, and whether it holds anything that cannot move to another server.
 * Asking PostgreSQL instead of parsing SQL gets every rule right by construction: `SET LOCAL`, a
 * `SET` in a rolled-back transaction, `set_config` inside a function, a temporary table dropped
 * `ON COMMIT`, an advisory lock taken and released in the same transaction
 * (docs/session-state.md).
 */

/**
 * One row: session-level settings as a JSON object (name → value as `SHOW` prints it), listening
 * channels as a JSON array, then whether the session holds a session-level advisory lock, a
 * temporary relation, a `WITH HOLD` cursor or a SQL-level prepared statement. Schema-qualified, so a
 * client's `search_path` cannot redirect it.
 */
const PROBE_REST =
  " (SELECT COALESCE(pg_catalog.json_agg(c), '[]') FROM pg_catalog.pg_listening_channels() AS c)," +
  " EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())," +
  " EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())," +
  " EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)," +
  " EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)"

// Only settings a session can SET: the rest (is_superuser, …) follow from them and cannot be replayed.
const SESSION_SETTINGS =
  "SELECT name, pg_catalog.current_setting(name, true) AS value FROM pg_catalog.pg_settings" +
  " WHERE source = 'session' AND context IN ('user', 'superuser')"

/**
 * The probe's SQL. Custom settings (`app.user_id`) are not listed in `pg_settings`, so those the
 * client named (`customSettingNames`) are asked for by name; one reset to its empty default reads
 * as unset.
 */
export const sessionProbe = (customNames: ReadonlySet<string> | undefined, loginUser: string): string => {
  // role and session_authorization are not listed in pg_settings either; each reads as unset at its
  // login value ("none"; the user the server logged in as).
  let settings =
    `${SESSION_SETTINGS} UNION ALL SELECT 'role', NULLIF(pg_catalog.current_setting('role'), 'none')` +
    ` UNION ALL SELECT 'session_authorization', NULLIF(pg_catalog.current_setting('session_authorization'), ${quoteLiteral(loginUser)})`
  if (customNames !== undefined && customNames.size > 0) {
    const names = [...customNames].map(quoteLiteral).join(", ")
    settings += ` UNION ALL SELECT n, NULLIF(pg_catalog.current_setting(n, true), '') FROM pg_catalog.unnest(ARRAY[${names}]::text[]) AS n`
  }
  return `${TIMEOUT_FIRST}(SELECT COALESCE(pg_catalog.json_object_agg(name, value), '{}') FROM (${settings}) AS s),${PROBE_REST}`
}

/**
 * The client's own `statement_timeout` must not cancel the probe (a failed probe closes the server,
 * ending the client's session): its value is read first, by a statement too small to time out, and
 * RESET before the rest (PostgreSQL arms the timeout per statement of a multi-statement query). A
 * client that had SET it gets its value back from the relay (`resync`); most never do, and cost no
 * second round trip. The main row starts with the default, to tell a SET value from it.
 */
const TIMEOUT_FIRST =
  "SELECT pg_catalog.current_setting('statement_timeout'); RESET statement_timeout; SELECT pg_catalog.current_setting('statement_timeout'), "

const SET_CONFIG_NAME = /set_config\s*\(\s*'((?:[^']|'')+)'/gi
const SET_NAME = /(?:^|[;'$\s])(?:set(?:\s+session)?|reset)\s+("?[\w$]+"?\s*\.\s*"?[\w$]+"?)/gi

/** Names of custom (dotted) settings that `sql` may SET, RESET or `set_config`, lower-cased. */
export const customSettingNames = (sql: string): Array<string> => {
  const names: Array<string> = []
  for (const match of sql.matchAll(SET_CONFIG_NAME)) {
    const name = match[1]!.replace(/''/g, "'").toLowerCase()
    if (name.includes(".")) names.push(name)
  }
  for (const match of sql.matchAll(SET_NAME)) names.push(match[1]!.replace(/["\s]/g, "").toLowerCase())
  return names
}

export interface ProbeResult {
  /** Session-level settings by (lower-case) name. */
  readonly settings: ReadonlyMap<string, string>
  /** Channels the session listens on. */
  readonly channels: ReadonlyArray<string>
  /** What keeps the client on this server, or undefined when nothing does. */
  readonly pin: string | undefined
}

const PINS = ["session advisory lock", "temporary table", "WITH HOLD cursor", "SQL-level prepared statement"]

/** Reads the probe's row (from `ServerConnection.probe`). */
export const probeResult = (rows: ReadonlyArray<ReadonlyArray<string | null>>): ProbeResult => {
  const before = rows[0]?.[0]
  const row = rows[1]
  if (before === undefined || row === undefined || row.length < 7) {
    throw new Error(`unexpected session probe reply (${rows.length} rows)`)
  }
  const settings = new Map<string, string>()
  const object = JSON.parse(row[1] ?? "{}") as Record<string, string | null>
  for (const name of Object.keys(object)) {
    const value = object[name]
    if (typeof value === "string") settings.set(name, value)
  }
  if (before !== null && before !== row[0]) settings.set(STATEMENT_TIMEOUT, before)
  const channels = JSON.parse(row[2] ?? "[]") as Array<string>
  let pin: string | undefined
  for (let i = 0; i < PINS.length; i++) if (row[3 + i] === "t") pin ??= PINS[i]
  return { settings, channels, pin }
}
