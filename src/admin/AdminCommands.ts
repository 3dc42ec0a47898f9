import { type Context, Effect } from "effect"
import type { PoolRegistry, TenantPool } from "../pool/index.ts"
import type { SessionRegistry } from "../session/SessionRegistry.ts"

/** The admin console's commands that act on pools, as one process carries them out. */
export type PoolCommand = "PAUSE" | "RESUME" | "RECONNECT" | "KILL"

export const POOL_COMMANDS: ReadonlySet<string> = new Set<PoolCommand>(["PAUSE", "RESUME", "RECONNECT", "KILL"])

type Pools = Context.Service.Shape<typeof PoolRegistry>
type Sessions = Context.Service.Shape<typeof SessionRegistry>

const poolsOf = (registry: Pools, name: string | undefined): ReadonlyArray<TenantPool> =>
  registry
    .all()
    .filter(
      (p) => name === undefined || name === p.settings.tenant || name === `${p.settings.tenant}/${p.settings.database}`
    )

/** Resolves once no transaction-mode server of `pools` is lent out. */
const waitQuiet = (pools: ReadonlyArray<TenantPool>) =>
  Effect.forEach(
    // A session-mode client holds its server for life: waiting for it could take forever.
    pools.filter((p) => p.settings.mode === "transaction"),
    (pool) =>
      Effect.callback<void>((resume) => {
        const forget = pool.whenQuiet(() => resume(Effect.void))
        return Effect.sync(forget)
      }),
    { discard: true }
  )

/**
 * Carries out a pool command in this process (docs/admin-console.md#commands): `name` is a tenant,
 * a `tenant/database` or, where allowed, undefined for every pool. In worker mode every worker runs
 * it (docs/admin-console.md#worker-mode).
 */
export const runPoolCommand = (
  registry: Pools,
  sessions: Sessions,
  command: PoolCommand,
  name: string | undefined
): Effect.Effect<void> =>
  Effect.gen(function* () {
    switch (command) {
      case "PAUSE":
        // As PgBouncer: done once every running transaction has finished.
        yield* waitQuiet(registry.pause(name))
        return
      case "RESUME":
        registry.resume(name)
        return
      case "RECONNECT":
        for (const pool of poolsOf(registry, name)) pool.reconnect()
        return
      case "KILL": {
        const pools = new Set(poolsOf(registry, name))
        for (const session of sessions.all()) {
          const info = session.handle.info
          if (info !== undefined && pools.has(info.pool) && session.handle.kill !== undefined) {
            yield* session.handle.kill()
          }
        }
        for (const pool of pools) pool.reconnect()
        return
      }
    }
  })
