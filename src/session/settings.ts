import { quoteIdentifier, quoteLiteral } from "../protocol/index.ts"
import type { ServerConnection } from "../upstream/index.ts"

/**
 * Settings PostgreSQL reports with ParameterStatus that a client may change with SET, by lower-cased
 * name. In transaction mode these follow the client from server to server (PgBouncer's approach);
 * settings the server does not report cannot be observed when a client SETs them, so only their
 * startup values follow.
 */
export const TRACKED_PARAMETERS: ReadonlyArray<string> = [
  "application_name",
  "client_encoding",
  "datestyle",
  "intervalstyle",
  "timezone",
  "search_path",
  "standard_conforming_strings"
]

/**
 * Startup settings a client may carry to its server: the tracked ones plus a few that shape results.
 * Anything else a client sends (including `-c` settings in `options`) is not applied upstream:
 * `-c work_mem=2047GB` must not reach a shared server.
 */
export const FORWARDED_PARAMETERS: ReadonlySet<string> = new Set([
  ...TRACKED_PARAMETERS,
  "extra_float_digits",
  "bytea_output",
  "lc_monetary",
  "lc_numeric",
  "lc_time"
])

/** A setting the pooler changes itself around its own silent queries (SessionProbe.ts, `settingsChange`). */
export const STATEMENT_TIMEOUT = "statement_timeout"

/**
 * A setting's name for RESET, each dotted part a quoted identifier: a custom name comes from a
 * client's SQL (and PostgreSQL before 14 accepts almost any text after a dot), so it is never
 * spliced in as SQL.
 */
const quoteSettingName = (name: string): string => name.split(".").map(quoteIdentifier).join(".")

/** A query that gives a server a client's settings, and what to record once it has run. */
export interface SettingsChange {
  readonly sql: string
  /** Records the new settings on the server; call when the query succeeded (or cannot silently fail). */
  readonly commit: () => void
}

const NO_CHANGE: SettingsChange = { sql: "", commit: () => {} }

/**
 * What gives `server` the client's `desired` settings (sql "" when it has them all). Values go
 * through `set_config`, which takes the raw string like a startup parameter does (`SET` would
 * re-parse it: `search_path=a,b` must not become one quoted name). Settings the pooler applied for
 * an earlier client that PostgreSQL does not report are RESET unless this client wants them too,
 * so they never carry over.
 */
export const settingsChange = (server: ServerConnection, desired: ReadonlyMap<string, string>): SettingsChange => {
  let calls = ""
  let resets = ""
  const set: Array<[string, string]> = []
  const reset: Array<string> = []
  for (const [name, value] of desired) {
    if (server.settings.get(name) === value) continue
    calls += `${calls === "" ? "SELECT " : ", "}pg_catalog.set_config(${quoteLiteral(name)}, ${quoteLiteral(value)}, false)`
    set.push([name, value])
  }
  for (const name of server.unreported) {
    if (desired.has(name)) continue
    resets += `; RESET ${quoteSettingName(name)}`
    reset.push(name)
  }
  if (set.length === 0 && reset.length === 0) return NO_CHANGE
  // The server still has the last client's statement_timeout, and PostgreSQL arms it per statement:
  // changing it first, alone, keeps a short one from cancelling the rest (which closes the server).
  let first = ""
  const timeout = desired.get(STATEMENT_TIMEOUT)
  if (timeout !== undefined && set.some(([name]) => name === STATEMENT_TIMEOUT)) {
    first = `SELECT pg_catalog.set_config('statement_timeout', ${quoteLiteral(timeout)}, false); `
  } else if (reset.includes(STATEMENT_TIMEOUT)) first = "RESET statement_timeout; "
  return {
    sql: first + (calls === "" ? resets.slice(2) : calls + resets),
    commit: () => {
      // Followed only if tracked and reported (search_path is tracked, but reported only from PostgreSQL 18).
      for (const [name, value] of set)
        server.applied(name, value, TRACKED_PARAMETERS.includes(name) ? undefined : false)
      for (const name of reset) server.unapplied(name)
    }
  }
}

/**
 * One string per distinct set of client settings (names and values cannot hold NUL): equal keys mean
 * equal settings, so a server synchronised for one client needs nothing for the next with the same key.
 */
export const settingsKey = (settings: ReadonlyMap<string, string>): string => {
  let key = ""
  for (const [name, value] of settings) key += `${name}\0${value}\0`
  return intern(key)
}

/**
 * Keys seen, each kept once. A key is built by concatenation (a tree of a dozen string pieces, some
 * 600 bytes) and kept by its client for as long as it is connected; the clients of a pool nearly
 * always have the same settings, so they share one flat string instead. Bounded: past the limit
 * (many distinct `application_name`s, say) it starts over, which only costs the sharing.
 */
const interned = new Map<string, string>()
const INTERNED_MAX = 4096

/** A client's settings as it logged in, with their `settingsKey`: what its relay starts from. */
export interface StartSettings {
  /** Shared by the clients that logged in with the same settings: read only (a relay copies it first). */
  readonly map: Map<string, string>
  readonly key: string
}

/** `settings` as the relay starts from them: keyed, and the map shared with equal ones (`sharedSettings`). */
export const shareSettings = (settings: Map<string, string>): StartSettings => {
  const key = settingsKey(settings)
  return { map: sharedSettings(key, settings), key }
}

/**
 * The settings map of clients that logged in with the settings `key` names: the first such map,
 * shared by the rest. Read only: a relay copies it before its client's first change.
 */
const sharedSettings = (key: string, settings: Map<string, string>): Map<string, string> => {
  const known = sharedMaps.get(key)
  if (known !== undefined) return known
  if (sharedMaps.size >= INTERNED_MAX) sharedMaps.clear()
  sharedMaps.set(key, settings)
  return settings
}

const sharedMaps = new Map<string, Map<string, string>>()

const intern = (key: string): string => {
  const known = interned.get(key)
  if (known !== undefined) return known
  if (interned.size >= INTERNED_MAX) interned.clear()
  interned.set(key, key)
  return key
}

/** After a client's transaction: what it SET on the server is now its own state. */
export const adoptSettings = (desired: Map<string, string>, server: ServerConnection): void => {
  for (const name of TRACKED_PARAMETERS) {
    const value = server.settings.get(name)
    if (value !== undefined) desired.set(name, value)
  }
}

/**
 * A transaction-mode client's settings: the pool's pristine server defaults for every tracked
 * setting, overlaid with what the client asked for at startup. Spelling out the defaults is what
 * resets a server another client left with, say, a different TimeZone.
 */
export const clientSettings = (
  pristine: ReadonlyMap<string, string>,
  startup: ReadonlyMap<string, string>
): Map<string, string> => {
  const settings = new Map<string, string>()
  for (const [name, value] of pristine) {
    const lower = name.toLowerCase()
    if (TRACKED_PARAMETERS.includes(lower)) settings.set(lower, value)
  }
  for (const [name, value] of startup) settings.set(name, value)
  return settings
}

/** ParameterStatus values for a client's greeting: the server's, with the client's own settings shown. */
export const reportedParameters = (
  parameters: ReadonlyMap<string, string>,
  settings: ReadonlyMap<string, string>
): Array<[string, string]> => [...parameters].map(([name, value]) => [name, settings.get(name.toLowerCase()) ?? value])
