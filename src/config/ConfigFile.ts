import { readFile } from "node:fs/promises"
import { extname } from "node:path"
import { Config, ConfigProvider, Effect, Exit, Option, Redacted, Schema, SchemaAST, SchemaIssue } from "effect"
import { type Document, isNode, LineCounter, parseDocument } from "yaml"
import {
  type AppConfigShape,
  configProviderFor,
  environment,
  loadAppConfig,
  parseSettings,
  type ServerSection,
  type SettingField,
  serverKeys,
  settingFields,
  settings
} from "./AppConfig.ts"
import { ConfigError, type ConfigProblem, formatPath } from "./ConfigError.ts"
import { strictParseOptions, Tenant, tenantIssues, userMaxClients, userPoolSize } from "./Tenant.ts"

export { ConfigError, type ConfigProblem } from "./ConfigError.ts"

const ServerValueSchema = Schema.Union([Schema.String, Schema.Number, Schema.Boolean]).annotate({
  message: "expected a string, number or boolean"
})

const ServerSectionSchema = Schema.Struct(
  Object.fromEntries(serverKeys.map((key) => [key, Schema.optionalKey(ServerValueSchema)]))
).annotate({ message: "expected a mapping of server settings" })

const ConfigFileSchema = Schema.Struct({
  tenants: Schema.Array(Tenant)
    .annotate({ message: "expected a list of tenants" })
    .pipe(Schema.withDecodingDefaultKey(Effect.succeed([]))),
  server: ServerSectionSchema.pipe(Schema.withDecodingDefaultKey(Effect.succeed({})))
}).annotate({ message: "expected a mapping with `tenants:` and/or `server:`" })

export interface ConfigFileContents {
  /** The file it came from; none when no file was given. */
  readonly file: Option.Option<string>
  readonly tenants: ReadonlyArray<Tenant>
  readonly server: ServerSection
}

// --- parsing ---------------------------------------------------------------

type Format = "yaml" | "json"

const formatOf = (file: string): Format => (extname(file).toLowerCase() === ".json" ? "json" : "yaml")

interface Located {
  readonly line?: number
  readonly column?: number
}

const locate = (doc: Document, lines: LineCounter, path: ReadonlyArray<PropertyKey>): Located => {
  // Walk down as far as the document goes, so a missing key points at its parent.
  for (let depth = path.length; depth >= 0; depth--) {
    const node = doc.getIn(path.slice(0, depth), true)
    if (isNode(node) && node.range !== undefined && node.range !== null) {
      const { line, col } = lines.linePos(node.range[0])
      return { line, column: col }
    }
  }
  return {}
}

const valueAt = (
  input: unknown,
  path: ReadonlyArray<PropertyKey>
): { readonly found: boolean; readonly value?: unknown } => {
  let current: unknown = input
  for (const segment of path) {
    if (typeof current !== "object" || current === null || !(segment in current)) return { found: false }
    current = (current as Record<PropertyKey, unknown>)[segment]
  }
  return { found: true, value: current }
}

const editDistance = (a: string, b: string): number => {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]
    row[0] = i
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1))
      diagonal = above
    }
  }
  return row[b.length]
}

// The candidates are the fields of the struct that refused the key, so suggestions work at any
// depth and for any struct.
const unknownKeyReason = (path: ReadonlyArray<PropertyKey>, known: ReadonlyArray<string>): string => {
  const key = String(path[path.length - 1]).toLowerCase()
  const best = known
    .map((name) => ({ name, distance: editDistance(key, name) }))
    .filter(({ distance }) => distance <= Math.max(2, Math.floor(key.length / 3)))
    .sort((a, b) => a.distance - b.distance)[0]
  return best === undefined ? "unknown field" : `unknown field (did you mean "${best.name}"?)`
}

const defaultTypeMessage = /^Expected (.*?)(, got .*)?$/s

// Leaf messages are tagged so the walk below can tell a missing or unknown key from a wrong value;
// NUL cannot occur in a message of ours.
const missingTag = "\u0000missing"
const unexpectedTag = "\u0000unexpected\u0000"

const leafHook: SchemaIssue.LeafHook = (issue) => {
  switch (issue._tag) {
    case "MissingKey":
      return missingTag
    case "UnexpectedKey": {
      const known = SchemaAST.isObjects(issue.ast) ? issue.ast.propertySignatures.map((p) => String(p.name)) : []
      return unexpectedTag + JSON.stringify(known)
    }
    default:
      return SchemaIssue.defaultLeafHook(issue)
  }
}

const formatter = SchemaIssue.makeFormatterStandardSchemaV1({ leafHook })

/**
 * Turns a schema failure into one problem per mistake, each with its path, the
 * offending value (secrets redacted when printed) and its line in the file.
 */
export const problemsFromParseError = (
  error: Schema.SchemaError | SchemaIssue.Issue,
  input: unknown,
  locateAt: (path: ReadonlyArray<PropertyKey>) => Located = () => ({})
): Array<ConfigProblem> =>
  formatter(Schema.isSchemaError(error) ? error.issue : error).issues.map((issue) => {
    const issuePath = (issue.path ?? []).map((segment) =>
      typeof segment === "object" && segment !== null ? segment.key : segment
    )
    const at = locateAt(issuePath)
    const path = formatPath(issuePath)
    if (issue.message === missingTag) return { path, reason: "is required", ...at }
    if (issue.message.startsWith(unexpectedTag)) {
      // The value of an unknown key is never shown: `db_pasword: hunter2` is a typo'd secret.
      const known = JSON.parse(issue.message.slice(unexpectedTag.length)) as ReadonlyArray<string>
      return { path, reason: unknownKeyReason(issuePath, known), ...at }
    }
    // Library default messages embed the actual value unredacted; keep only the expectation.
    const match = defaultTypeMessage.exec(issue.message)
    const reason = match === null ? issue.message : `expected ${match[1]}`
    // Scalars only: a whole tenant or user echoed back is noise (and holds secrets).
    const { found, value } = valueAt(input, issuePath)
    return found && (typeof value !== "object" || value === null)
      ? { path, reason, value, ...at }
      : { path, reason, ...at }
  })

const syntaxProblems = (doc: Document, lines: LineCounter, format: Format): Array<ConfigProblem> =>
  doc.errors.map((e) => {
    const { line, col } = lines.linePos(e.pos[0])
    // This message quotes the scalar, which could be a password.
    const message =
      e.code === "TAG_RESOLVE_FAILED" && format === "json"
        ? "unquoted value (JSON strings need double quotes)"
        : e.message.replace(/\s+at line \d+, column \d+[\s\S]*$/, "")
    return { path: "", reason: `${format === "json" ? "JSON" : "YAML"} syntax error: ${message}`, line, column: col }
  })

const dedupe = (problems: ReadonlyArray<ConfigProblem>): Array<ConfigProblem> => {
  const seen = new Set<string>()
  return problems.filter((p) => {
    const key = `${p.path}\u0000${p.reason}`
    if (seen.has(key)) return false
    seen.add(key)
    return true
  })
}

// Cross-field rules and duplicate external_ids, checked on the raw input so they
// are reported even when the same tenant also has a field-level mistake.
const crossFieldProblems = (input: unknown, locateAt: (path: ReadonlyArray<PropertyKey>) => Located) => {
  const problems: Array<ConfigProblem> = []
  if (typeof input !== "object" || input === null || !("tenants" in input) || !Array.isArray(input.tenants)) {
    return problems
  }
  const tenants: ReadonlyArray<unknown> = input.tenants
  const firstIndex = new Map<string, number>()
  tenants.forEach((tenant, i) => {
    for (const issue of tenantIssues(tenant)) {
      const path = ["tenants", i, ...issue.path]
      problems.push({ path: formatPath(path), reason: issue.message, ...locateAt(path) })
    }
    if (typeof tenant !== "object" || tenant === null || !("external_id" in tenant)) return
    const id = tenant.external_id
    if (typeof id !== "string") return
    const first = firstIndex.get(id)
    if (first === undefined) firstIndex.set(id, i)
    else {
      const path = ["tenants", i, "external_id"]
      problems.push({
        path: formatPath(path),
        reason: `duplicates tenants[${first}].external_id; external_id must be unique`,
        value: id,
        ...locateAt(path)
      })
    }
  })
  return problems
}

// Values are run through AppConfig's own parsers, so the file and the environment
// accept exactly the same things. Done on the raw section so these are reported
// alongside mistakes elsewhere in the file.
const serverProblems = (
  input: unknown,
  locateAt: (path: ReadonlyArray<PropertyKey>) => Located
): Effect.Effect<Array<ConfigProblem>> => {
  const section = valueAt(input, ["server"]).value
  if (typeof section !== "object" || section === null || Array.isArray(section)) return Effect.succeed([])
  const raw: Partial<Record<SettingField, string>> = {}
  for (const field of settingFields) {
    const value: unknown = (section as Record<string, unknown>)[settings[field].fileKey]
    // Unknown keys and non-scalar values are the schema's to report.
    if (typeof value === "string" || typeof value === "number" || typeof value === "boolean") raw[field] = String(value)
  }
  const parsed = parseSettings(raw)
  if (parsed._tag === "Success") return Effect.succeed([])
  return Effect.succeed(
    parsed.failure.map((p) => {
      const field = settingFields.find((f) => settings[f].env === p.path)
      const key = field === undefined ? p.path : settings[field].fileKey
      return { ...p, path: field === undefined ? p.path : `server.${key}`, ...locateAt(["server", key]) }
    })
  )
}

// In file order, which is how an operator fixes them; problems without a place go last.
const byPosition = (a: ConfigProblem, b: ConfigProblem) =>
  (a.line ?? Number.MAX_SAFE_INTEGER) - (b.line ?? Number.MAX_SAFE_INTEGER) || (a.column ?? 0) - (b.column ?? 0)

/**
 * Parses and validates config file text. YAML unless `file` ends in `.json`
 * (YAML 1.2 reads JSON too, but JSON files get JSON's stricter rules).
 */
export const parseConfig = (text: string, file?: string): Effect.Effect<ConfigFileContents, ConfigError> =>
  Effect.gen(function* () {
    const fail = (problems: ReadonlyArray<ConfigProblem>) =>
      new ConfigError(file === undefined ? { problems } : { file, problems })
    const format = file === undefined ? "yaml" : formatOf(file)
    const lines = new LineCounter()
    const doc = parseDocument(text, {
      lineCounter: lines,
      prettyErrors: false,
      uniqueKeys: true,
      schema: format === "json" ? "json" : "core"
    })
    if (doc.errors.length > 0) return yield* fail(syntaxProblems(doc, lines, format))

    const raw: unknown = doc.toJS({ maxAliasCount: 100 })
    // An empty file, or a section with every entry commented out, means "nothing set".
    const input =
      raw === null || raw === undefined
        ? {}
        : typeof raw === "object" && !Array.isArray(raw)
          ? Object.fromEntries(Object.entries(raw).filter(([, value]) => value !== null))
          : raw
    const locateAt = (path: ReadonlyArray<PropertyKey>) => locate(doc, lines, path)

    const decoded = Schema.decodeUnknownExit(ConfigFileSchema, strictParseOptions)(input)
    const failure = Exit.findErrorOption(decoded)
    const problems: Array<ConfigProblem> = Option.isSome(failure)
      ? problemsFromParseError(failure.value, input, locateAt)
      : []
    problems.push(...crossFieldProblems(input, locateAt), ...(yield* serverProblems(input, locateAt)))

    const unique = dedupe(problems).sort(byPosition)
    if (unique.length > 0 || !Exit.isSuccess(decoded)) return yield* fail(unique)
    return {
      file: Option.fromNullishOr(file),
      tenants: decoded.value.tenants,
      server: decoded.value.server
    } satisfies ConfigFileContents
  })

/** Reads and validates a config file. */
export const loadConfigFile = (path: string): Effect.Effect<ConfigFileContents, ConfigError> =>
  Effect.tryPromise({
    try: () => readFile(path, "utf8"),
    catch: (cause) =>
      new ConfigError({
        file: path,
        problems: [
          { path: "", reason: `cannot read the file: ${cause instanceof Error ? cause.message : String(cause)}` }
        ]
      })
  }).pipe(Effect.flatMap((text) => parseConfig(text, path)))

// --- `tidepool config check` ---------------------------------------------

export type SettingSource = "default" | "file" | "env"

export interface TenantSummary {
  readonly external_id: string
  readonly db: string
  readonly users: ReadonlyArray<{
    readonly username: string
    readonly db_user: string
    readonly pool_size: number
    readonly max_clients: number
  }>
}

/**
 * What `tidepool config check` reports for a valid file. `toString()` is the
 * human-readable report (no secrets), so the CLI can print it as it is.
 */
export class ConfigCheckSummary {
  constructor(
    readonly file: string,
    readonly tenants: ReadonlyArray<TenantSummary>,
    /** The effective settings: environment over the file's `server:` section over defaults. */
    readonly settings: AppConfigShape,
    readonly sources: { readonly [K in SettingField]: SettingSource }
  ) {}

  toString(): string {
    const users = this.tenants.reduce((n, t) => n + t.users.length, 0)
    const out = [
      `${plural(this.tenants.length, "tenant")}, ${plural(users, "user")}`,
      ...this.tenants.flatMap((t) => [
        `  tenant ${t.external_id} -> ${t.db}`,
        ...t.users.map(
          (u) => `    ${u.username} (db user ${u.db_user}, pool_size ${u.pool_size}, max_clients ${u.max_clients})`
        )
      ]),
      "settings (source):",
      ...settingFields.map(
        (field) => `  ${settings[field].env}=${showSetting(this.settings[field])} (${this.sources[field]})`
      )
    ]
    return out.join("\n")
  }
}

/** Secrets as `<redacted>`, lists comma-separated, objects as JSON, unset as `(unset)`. */
const showSetting = (value: unknown): string =>
  value === undefined
    ? "(unset)"
    : Redacted.isRedacted(value)
      ? "<redacted>"
      : Array.isArray(value)
        ? value.length === 0
          ? "(none)"
          : `${value.length} entr${value.length === 1 ? "y" : "ies"}`
        : typeof value === "object" && value !== null
          ? JSON.stringify(value)
          : String(value)

const plural = (n: number, noun: string) => `${n} ${noun}${n === 1 ? "" : "s"}`

/** Validates a config file as `serve` would, and summarises what it would run with. */
export const checkConfigFile = (
  path: string,
  env: ConfigProvider.ConfigProvider = environment()
): Effect.Effect<ConfigCheckSummary, ConfigError> =>
  Effect.gen(function* () {
    const contents = yield* loadConfigFile(path)
    const config = yield* loadAppConfig(configProviderFor(contents.server, env)).pipe(
      Effect.mapError((error) => new ConfigError({ file: path, problems: error.problems }))
    )
    const sources = {} as Record<SettingField, SettingSource>
    for (const field of settingFields) {
      const { env: name, fileKey } = settings[field]
      const fromEnv = yield* Config.option(Config.String(name)).pipe(
        Effect.provideService(ConfigProvider.ConfigProvider, env),
        Effect.orElseSucceed(Option.none)
      )
      sources[field] = Option.isSome(fromEnv) ? "env" : contents.server[fileKey] !== undefined ? "file" : "default"
    }
    const tenants = contents.tenants.map((t) => ({
      external_id: t.external_id,
      db: `${t.db_host}:${t.db_port}/${t.db_database}`,
      users: t.users.map((u) => ({
        username: `${u.db_user_alias}.${t.external_id}`,
        db_user: u.db_user,
        pool_size: userPoolSize(t, u),
        max_clients: userMaxClients(t, u)
      }))
    }))
    return new ConfigCheckSummary(path, tenants, { ...config, configFile: Option.some(path) }, sources)
  })
