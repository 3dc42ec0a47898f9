import { Effect, Option, Schema } from "effect"
import { Tenant } from "../config/index.ts"
import { TenantStore } from "../tenants/index.ts"
import type { ImportPlan, Unmapped } from "./ImportPlan.ts"

/** What applying a plan did (or, in a dry run, would do) to one tenant. */
export interface TenantOutcome {
  readonly externalId: string
  readonly action: "create" | "update" | "unchanged"
  /** Field paths that differ from the store (`users[app].pool_size`); never values. */
  readonly changed: ReadonlyArray<string>
}

export interface ImportReport {
  readonly source: string
  readonly dryRun: boolean
  readonly outcomes: ReadonlyArray<TenantOutcome>
  readonly unmapped: ReadonlyArray<Unmapped>
  /** Tenants in the store that the plan does not name: left as they are, never deleted. */
  readonly untouched: ReadonlyArray<string>
  readonly store: "sqlite" | "postgres"
}

const encode = Schema.encodeSync(Tenant)

/** JSON with sorted keys, so two encodings of the same tenant compare equal as text. */
const canonical = (value: unknown): string =>
  JSON.stringify(value, (_key, v: unknown) =>
    v !== null && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1)))
      : v
  )

type Encoded = Record<string, unknown> & { readonly users: ReadonlyArray<Record<string, unknown>> }

/** The tenant as plain JSON; the encoded side of a Redacted is its value (compared, never printed). */
const plain = (tenant: Tenant): Encoded => encode(tenant) as unknown as Encoded

/** Which fields differ between what is stored and what the plan wants, users matched by login name. */
export const differences = (stored: Tenant, wanted: Tenant): ReadonlyArray<string> => {
  const before = plain(stored)
  const after = plain(wanted)
  const changed: Array<string> = []
  const keys = new Set([...Object.keys(before), ...Object.keys(after)])
  keys.delete("users")
  for (const key of [...keys].sort()) {
    if (canonical(before[key]) !== canonical(after[key])) changed.push(key)
  }
  const nameOf = (u: Record<string, unknown>) => String(u.db_user_alias ?? u.db_user)
  const beforeUsers = new Map(before.users.map((u) => [nameOf(u), u]))
  const afterUsers = new Map(after.users.map((u) => [nameOf(u), u]))
  for (const [name, user] of afterUsers) {
    const old = beforeUsers.get(name)
    if (old === undefined) {
      changed.push(`users[${name}] (added)`)
      continue
    }
    for (const key of [...new Set([...Object.keys(old), ...Object.keys(user)])].sort()) {
      if (canonical(old[key]) !== canonical(user[key])) changed.push(`users[${name}].${key}`)
    }
  }
  for (const name of beforeUsers.keys()) if (!afterUsers.has(name)) changed.push(`users[${name}] (removed)`)
  return changed
}

/**
 * Writes a plan's tenants to the store: new ones created, differing ones replaced whole, equal
 * ones not written at all, so a second run changes nothing (not even versions). Tenants the plan
 * does not name are left alone. A dry run compares the same way and writes nothing.
 */
export const applyPlan = Effect.fn("migrate.applyPlan")(function* (
  plan: ImportPlan,
  options: { readonly dryRun: boolean }
) {
  const store = yield* TenantStore
  const outcomes: Array<TenantOutcome> = []
  const named = new Set<string>()
  for (const tenant of plan.tenants) {
    named.add(tenant.external_id)
    const existing = yield* store.get(tenant.external_id)
    const changed = Option.isNone(existing) ? [] : differences(existing.value.tenant, tenant)
    const action = Option.isNone(existing) ? "create" : changed.length === 0 ? "unchanged" : "update"
    if (action !== "unchanged" && !options.dryRun) yield* store.upsert(tenant)
    outcomes.push({ externalId: tenant.external_id, action, changed })
  }
  const versions = yield* store.versions
  const untouched = [...versions.keys()].filter((id) => !named.has(id)).sort()
  const report: ImportReport = {
    source: plan.source,
    dryRun: options.dryRun,
    outcomes,
    unmapped: plan.unmapped,
    untouched,
    store: store.kind
  }
  return report
})

/** The report an operator reads: one line per tenant, every unmapped field, then the totals. */
export const formatReport = (report: ImportReport): string => {
  const lines: Array<string> = []
  const verb = (action: TenantOutcome["action"]) =>
    report.dryRun
      ? { create: "would create", update: "would update", unchanged: "unchanged" }[action]
      : { create: "created", update: "updated", unchanged: "unchanged" }[action]
  for (const o of report.outcomes) {
    lines.push(`${verb(o.action)} tenant ${o.externalId}${o.changed.length > 0 ? `: ${o.changed.join(", ")}` : ""}`)
  }
  if (report.unmapped.length > 0) {
    lines.push("", `not imported (${report.unmapped.length}):`)
    for (const u of report.unmapped) lines.push(`  ${u.source} · ${u.field}: ${u.reason}`)
  }
  if (report.untouched.length > 0) {
    lines.push("", `left as they are (in the store, not in ${report.source}): ${report.untouched.join(", ")}`)
  }
  const count = (action: TenantOutcome["action"]) => report.outcomes.filter((o) => o.action === action).length
  lines.push(
    "",
    report.dryRun
      ? `dry run: would create ${count("create")}, would update ${count("update")}, unchanged ${count("unchanged")}; nothing was written`
      : `created ${count("create")}, updated ${count("update")}, unchanged ${count("unchanged")}`
  )
  return lines.join("\n")
}
