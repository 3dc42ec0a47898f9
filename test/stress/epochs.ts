/**
 * The gates of one side of one run (script.ts's `Gate`): the shared tables' epochs. A use gated at
 * epoch e of a table waits until the table is in epoch e; the DDL that ends epoch e waits until every
 * use of epoch e is done, by whichever client. The direct run and the run through Tidepool each have
 * their own, built from the same scripts, so each client meets each shared table in the same state
 * both ways: the comparison stays exact, with no allowance for concurrent DDL.
 */
import { type Gate, SHARED_TABLES } from "./script.ts"
import { Stuck } from "./wire.ts"

/** What the gates need of a client's script (drivers.ts builds these from its operations). */
interface Gated {
  readonly steps: ReadonlyArray<{ readonly gate?: Gate | undefined }>
}

export class Epochs {
  /** Per table, its current epoch. */
  private readonly clock: Array<number> = new Array(SHARED_TABLES).fill(0)
  /** Per table, per epoch, per client: uses not done yet. */
  private readonly pending: Array<Map<number, Map<number, number>>> = Array.from(
    { length: SHARED_TABLES },
    () => new Map()
  )
  private readonly waiters = new Set<() => void>()

  constructor(scripts: ReadonlyArray<Gated>) {
    scripts.forEach((script, client) => {
      for (const step of script.steps) {
        if (step.gate === undefined || step.gate.ddl) continue
        const byClient = this.usesOf(step.gate)
        byClient.set(client, (byClient.get(client) ?? 0) + 1)
      }
    })
  }

  private usesOf(gate: Gate): Map<number, number> {
    const epochs = this.pending[gate.table]!
    let byClient = epochs.get(gate.epoch)
    if (byClient === undefined) {
      byClient = new Map()
      epochs.set(gate.epoch, byClient)
    }
    return byClient
  }

  /** A clock past the gate's epoch only follows a client that left without its DDL (already a failure): run on. */
  private open(gate: Gate, client: number): boolean {
    const clock = this.clock[gate.table]!
    if (clock < gate.epoch) return false
    if (!gate.ddl || clock > gate.epoch) return true
    for (const [other, n] of this.usesOf(gate)) if (other !== client && n > 0) return false
    return true
  }

  private waitingFor(gate: Gate): string {
    const clock = this.clock[gate.table]!
    if (clock < gate.epoch) return `shared table s${gate.table} to reach epoch ${gate.epoch} (it is at epoch ${clock})`
    const left = [...this.usesOf(gate)].filter(([, n]) => n > 0).map(([c, n]) => `client ${c}: ${n}`)
    return `the uses of shared table s${gate.table}'s epoch ${gate.epoch} before its DDL (left: ${left.join(", ")})`
  }

  /** Resolves when the client may run the gated step; throws Stuck at the deadline. */
  enter(gate: Gate, client: number, deadline: number): Promise<void> {
    if (this.open(gate, client)) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!this.open(gate, client)) return
        this.waiters.delete(check)
        clearTimeout(timer)
        resolve()
      }
      const timer = setTimeout(
        () => {
          this.waiters.delete(check)
          reject(new Stuck(this.waitingFor(gate)))
        },
        Math.max(0, deadline - Date.now())
      )
      this.waiters.add(check)
    })
  }

  /** The gated step is done: a use no longer holds its epoch; a DDL moves its table to the next. */
  done(gate: Gate, client: number): void {
    if (gate.ddl) {
      this.clock[gate.table] = Math.max(this.clock[gate.table]!, gate.epoch + 1)
    } else {
      const byClient = this.usesOf(gate)
      byClient.set(client, (byClient.get(client) ?? 1) - 1)
    }
    for (const check of [...this.waiters]) check()
  }

  /** A client that ended early (its connection closed, or it hung) lets the others go on without it. */
  retire(steps: Gated["steps"], client: number): void {
    for (const step of steps) if (step.gate !== undefined) this.done(step.gate, client)
  }
}
