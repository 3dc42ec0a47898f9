import { type TidepoolError, tidepoolError } from "../errors/index.ts"

/** Who the client says it is, before any lookup. */
export interface ClientIdentity {
  readonly user: string
  /** undefined: no tenant in the username or options; SNI may still name one. */
  readonly tenant: string | undefined
  readonly database: string | undefined
  /** `-c name=value` settings from `options`, names lower-cased. */
  readonly settings: ReadonlyMap<string, string>
  /** `options=--jit=true`: the client asks for JIT access (docs/jit.md). */
  readonly jit: boolean
}

/**
 * Splits the `options` startup parameter like PostgreSQL does: whitespace separates arguments and a
 * backslash makes the next character literal.
 */
export const splitOptions = (options: string): Array<string> => {
  const out: Array<string> = []
  let current = ""
  let inArg = false
  for (let i = 0; i < options.length; i++) {
    const ch = options[i]!
    if (ch === "\\" && i + 1 < options.length) {
      current += options[++i]
      inArg = true
    } else if (/\s/.test(ch)) {
      if (inArg) out.push(current)
      current = ""
      inArg = false
    } else {
      current += ch
      inArg = true
    }
  }
  if (inArg) out.push(current)
  return out
}

/** `-c a=b`, `-ca=b`, `--a=b` and bare `a=b` (Supavisor's `reference=x`) all set `a`. */
export const parseOptions = (options: string): Map<string, string> => {
  const settings = new Map<string, string>()
  const args = splitOptions(options)
  for (let i = 0; i < args.length; i++) {
    let arg = args[i]!
    if (arg === "-c") arg = args[++i] ?? ""
    else if (arg.startsWith("-c")) arg = arg.slice(2)
    else if (arg.startsWith("--")) arg = arg.slice(2)
    const eq = arg.indexOf("=")
    if (eq <= 0) continue
    settings.set(arg.slice(0, eq).toLowerCase().replace(/-/g, "_"), arg.slice(eq + 1))
  }
  return settings
}

const validName = (name: string): boolean => {
  const bytes = Buffer.byteLength(name, "utf8")
  return bytes >= 1 && bytes <= 63 && !/[\p{Cc}]/u.test(name)
}

/** docs/operations.md#how-a-client-is-served: `options` reference wins, then `user.tenant` split at the last dot, then SNI. */
export const resolveIdentity = (parameters: Readonly<Record<string, string>>): ClientIdentity | TidepoolError => {
  const rawUser = parameters.user ?? ""
  const settings = parseOptions(parameters.options ?? "")
  const database = parameters.database === undefined || parameters.database === "" ? undefined : parameters.database
  const reference = settings.get("reference")
  settings.delete("reference")
  const jit = settings.get("jit")?.toLowerCase() === "true"
  settings.delete("jit")
  let user = rawUser
  let tenant: string | undefined
  if (reference !== undefined) {
    tenant = reference
  } else {
    const dot = rawUser.lastIndexOf(".")
    if (dot >= 0) {
      user = rawUser.slice(0, dot)
      tenant = rawUser.slice(dot + 1)
    }
  }
  if (!validName(user) || (tenant !== undefined && !validName(tenant))) return tidepoolError("EINVALIDUSERINFO")
  if (database !== undefined && !validName(database)) return tidepoolError("EINVALIDUSERINFO")
  return { user, tenant, database, settings, jit }
}
