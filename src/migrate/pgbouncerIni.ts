import { existsSync, readFileSync } from "node:fs"
import { dirname, isAbsolute, resolve } from "node:path"
import { Result } from "effect"

/**
 * PgBouncer's file formats, read the way PgBouncer reads them (libusual's cfparser.c for the ini
 * file, loader.c for connection strings and auth_file), so a file PgBouncer accepts reads the same
 * here and a file it refuses is refused with the same line.
 */

/** One `key = value` line, with where it came from. */
export interface IniEntry {
  /** Section name as written, lower-cased: `pgbouncer`, `databases`, `users`, `peers`. */
  readonly section: string
  readonly key: string
  readonly value: string
  readonly file: string
  readonly line: number
}

/** PgBouncer stops at ten nested `%include`s; so do we, which also ends include cycles. */
const MAX_INCLUDE = 10

export const knownSections: ReadonlyArray<string> = ["pgbouncer", "databases", "users", "peers"]

/**
 * Where a file named in the ini (`%include`, `auth_file`, `server_tls_ca_file`) is: PgBouncer takes a
 * relative name from its working directory, which is rarely the importer's, so a name not found there
 * is looked up beside the ini file that names it.
 */
export const locateFile = (name: string, namedIn: string): string => {
  if (isAbsolute(name)) return name
  const fromCwd = resolve(name)
  return existsSync(fromCwd) ? fromCwd : resolve(dirname(namedIn), name)
}

const readText = (file: string): Result.Result<string, string> => {
  try {
    return Result.succeed(readFileSync(file, "utf8"))
  } catch (error) {
    return Result.fail(`cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? String(error)}`)
  }
}

const isSpace = (c: string | undefined) =>
  c === " " || c === "\t" || c === "\n" || c === "\r" || c === "\f" || c === "\v"
const isBlank = (c: string | undefined) => c === " " || c === "\t"
const isKeyChar = (c: string | undefined) => c !== undefined && /[A-Za-z0-9_.*-]/.test(c)

/** Reads an ini file and its `%include`s into entries, in file order. */
export const readIni = (file: string): Result.Result<ReadonlyArray<IniEntry>, string> => {
  const entries: Array<IniEntry> = []
  // PgBouncer keeps the section across an include: an included file may continue `[databases]`.
  let section = ""
  const parse = (path: string, depth: number): string | undefined => {
    const text = readText(path)
    if (Result.isFailure(text)) return text.failure
    const s = text.success
    let p = 0
    const lineAt = (at: number) => {
      let line = 1
      for (let i = 0; i < at && i < s.length; i++) if (s[i] === "\n") line++
      return line
    }
    const syntaxError = (at: number) => `syntax error in configuration (${path}:${lineAt(at)})`
    while (p < s.length) {
      while (p < s.length && isSpace(s[p])) p++
      if (p >= s.length) break
      if (s.startsWith("%include", p) && isBlank(s[p + 8])) {
        if (depth >= MAX_INCLUDE) return `include nesting level too deep (${path}:${lineAt(p)})`
        const at = p
        p += 8
        while (isBlank(s[p])) p++
        const start = p
        while (p < s.length && s[p] !== "\n") p++
        const name = s.slice(start, p).trimEnd()
        const problem = parse(locateFile(name, path), depth + 1)
        if (problem !== undefined) return `${problem}\n  included from ${path}:${lineAt(at)}`
        continue
      }
      if (s[p] === "#" || s[p] === ";") {
        while (p < s.length && s[p] !== "\n") p++
        continue
      }
      if (s[p] === "[") {
        const start = ++p
        while (p < s.length && s[p] !== "]" && s[p] !== "\n") p++
        if (s[p] !== "]") return syntaxError(p)
        section = s.slice(start, p).toLowerCase()
        if (!knownSections.includes(section)) return `invalid section "${s.slice(start, p)}" (${path}:${lineAt(p)})`
        p++
        continue
      }
      const keyAt = p
      let key: string
      if (s[p] === "'" || s[p] === '"') {
        // cfparser quotes names with '; the docs (and older releases) with SQL's "…" and "" inside.
        const quote = s[p]
        let name = ""
        p++
        for (;;) {
          if (p >= s.length || s[p] === "\n") return syntaxError(p)
          if (s[p] === quote) {
            if (quote === '"' && s[p + 1] === '"') {
              name += '"'
              p += 2
              continue
            }
            break
          }
          name += s[p++]
        }
        if (name === "") return syntaxError(p)
        p++
        key = name
      } else {
        while (isKeyChar(s[p])) p++
        key = s.slice(keyAt, p)
      }
      while (isBlank(s[p])) p++
      if (s[p] !== "=" || key === "") return syntaxError(p)
      p++
      while (isBlank(s[p])) p++
      const start = p
      while (p < s.length && s[p] !== "\n") p++
      const value = s.slice(start, p).trimEnd()
      if (section === "") return `${path}:${lineAt(keyAt)}: "${key}" is outside any section`
      entries.push({
        section,
        key: section === "pgbouncer" ? key.toLowerCase() : key,
        value,
        file: path,
        line: lineAt(keyAt)
      })
    }
    return undefined
  }
  const problem = parse(resolve(file), 0)
  return problem === undefined ? Result.succeed(entries) : Result.fail(problem)
}

/**
 * A `[databases]` or `[users]` value: `key=value` pairs separated by spaces, a value in single quotes
 * when it holds spaces (`''` is a quote). Empty values are refused, as PgBouncer refuses them.
 * Later pairs win over earlier ones with the same key, as in PgBouncer.
 */
export const parseConnString = (text: string): Result.Result<ReadonlyArray<readonly [string, string]>, string> => {
  const pairs: Array<readonly [string, string]> = []
  let p = 0
  const skip = () => {
    while (isSpace(text[p])) p++
  }
  for (;;) {
    skip()
    if (p >= text.length) return Result.succeed(pairs)
    const keyStart = p
    while (p < text.length && text[p] !== "=" && text[p] !== " ") p++
    const key = text.slice(keyStart, p)
    skip()
    if (text[p] !== "=" || key === "") return Result.fail(`syntax error at "${text.slice(keyStart)}"`)
    p++
    skip()
    let value = ""
    if (text[p] === "'") {
      p++
      for (;;) {
        if (p >= text.length) return Result.fail(`unterminated quote in value of ${key}`)
        if (text[p] === "'") {
          if (text[p + 1] === "'") {
            value += "'"
            p += 2
            continue
          }
          p++
          break
        }
        value += text[p++]
      }
    } else {
      const start = p
      while (p < text.length && text[p] !== " ") p++
      value = text.slice(start, p)
    }
    if (value === "") return Result.fail(`empty value for ${key}`)
    pairs.push([key, value])
  }
}

/** One `"user" "secret"` line of an auth_file. */
export interface AuthFileUser {
  readonly name: string
  readonly secret: string
  readonly line: number
}

export type SecretKind = "plain" | "md5" | "scram"

/** How PgBouncer tells the kinds apart: a prefix and a shape, as PostgreSQL stores them. */
export const secretKind = (secret: string): SecretKind => {
  if (/^md5[0-9a-f]{32}$/.test(secret)) return "md5"
  if (/^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$/.test(secret)) return "scram"
  return "plain"
}

/** Reads an auth_file (userlist.txt). A later line for the same user replaces an earlier one. */
export const readAuthFile = (file: string): Result.Result<ReadonlyArray<AuthFileUser>, string> => {
  const text = readText(file)
  if (Result.isFailure(text)) return Result.fail(text.failure)
  const s = text.success
  const users = new Map<string, AuthFileUser>()
  let p = 0
  let line = 1
  const advance = () => {
    if (s[p] === "\n") line++
    p++
  }
  const field = (): string | undefined => {
    if (s[p] !== '"') return undefined
    advance()
    let value = ""
    for (;;) {
      if (p >= s.length) return undefined
      if (s[p] === '"') {
        if (s[p + 1] === '"') {
          value += '"'
          advance()
          advance()
          continue
        }
        advance()
        return value
      }
      value += s[p]
      advance()
    }
  }
  while (p < s.length) {
    while (p < s.length && isSpace(s[p])) advance()
    if (p >= s.length) break
    if (s[p] === ";") {
      while (p < s.length && s[p] !== "\n") advance()
      continue
    }
    const at = line
    const name = field()
    while (isBlank(s[p])) advance()
    const secret = name === undefined ? undefined : field()
    if (name === undefined || secret === undefined) return Result.fail(`broken auth file (${file}:${at})`)
    users.set(name, { name, secret, line: at })
    while (p < s.length && s[p] !== "\n") advance()
  }
  return Result.succeed([...users.values()])
}
