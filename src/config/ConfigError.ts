import { Data, Redacted } from "effect"

/**
 * One thing wrong with the configuration. `path` names where: a config file
 * path such as `tenants[0].db_port`, or an environment variable name.
 */
export interface ConfigProblem {
  readonly path: string
  readonly value?: unknown
  readonly reason: string
  readonly line?: number
  readonly column?: number
}

/**
 * Invalid configuration. Start-up prints `message`, which lists every problem
 * so an operator fixes them in one pass instead of one restart per mistake.
 */
export class ConfigError extends Data.TaggedError("ConfigError")<{
  readonly file?: string
  readonly problems: ReadonlyArray<ConfigProblem>
}> {
  override get message(): string {
    return this.format()
  }

  format(): string {
    const where = this.file === undefined ? "" : ` in ${this.file}`
    const count = this.problems.length === 1 ? "1 problem" : `${this.problems.length} problems`
    return [`Invalid configuration${where} (${count}):`, ...this.problems.map((p) => `  ${formatProblem(p)}`)].join(
      "\n"
    )
  }
}

export const formatProblem = (problem: ConfigProblem): string => {
  const prefix = problem.path === "" ? "" : `${problem.path}: `
  const got = "value" in problem ? `, got ${showValue(problem.path, problem.value)}` : ""
  const at =
    problem.line === undefined
      ? ""
      : problem.column === undefined
        ? ` (line ${problem.line})`
        : ` (line ${problem.line}, column ${problem.column})`
  return `${prefix}${problem.reason}${got}${at}`
}

// Matched against the last path segment, so a value under such a key is never
// echoed back even when it was given as the wrong type or under a typo'd key.
const secretKey = /pass(word|wd)?|secret|token|credential|private_?key/i

const lastSegment = (path: string): string => {
  const match = /([A-Za-z0-9_]+)\]?"?$/.exec(path)
  return match === null ? path : match[1]
}

export const isSecretPath = (path: string): boolean => secretKey.test(lastSegment(path))

const redactDeep = (value: unknown): unknown => {
  if (Redacted.isRedacted(value)) return "<redacted>"
  if (Array.isArray(value)) return value.map(redactDeep)
  if (typeof value === "object" && value !== null) {
    const out: Record<string, unknown> = {}
    for (const [key, item] of Object.entries(value)) {
      out[key] = secretKey.test(key) ? "<redacted>" : redactDeep(item)
    }
    return out
  }
  return value
}

const maxShown = 60

/** Renders a value for an error line: secrets as `<redacted>`, long values cut. */
export const showValue = (path: string, value: unknown): string => {
  if (isSecretPath(path) || Redacted.isRedacted(value)) return "<redacted>"
  let text: string
  try {
    text = value === undefined ? "undefined" : (JSON.stringify(redactDeep(value)) ?? String(value))
  } catch {
    text = String(value)
  }
  return text.length > maxShown ? `${text.slice(0, maxShown - 3)}...` : text
}

/** Renders a parse path the way a reader of the YAML file thinks of it: `tenants[0].users[1].db_user`. */
export const formatPath = (segments: ReadonlyArray<PropertyKey>): string => {
  let out = ""
  for (const segment of segments) {
    if (typeof segment === "number") out += `[${segment}]`
    else {
      const key = String(segment)
      if (/^[A-Za-z_][A-Za-z0-9_-]*$/.test(key)) out += out === "" ? key : `.${key}`
      else out += `[${JSON.stringify(key)}]`
    }
  }
  return out
}
