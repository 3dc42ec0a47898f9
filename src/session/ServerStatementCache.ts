/**
 * What the pooler believes the held server has prepared under server-side names, seen from one
 * client's relay. The table itself is the server's (`ServerConnection.statements`, so it survives
 * from one client to the next); this class holds the rules for reading and changing it, and is
 * pointed at the held server's table while the client holds that server.
 *
 * Each entry maps a server-side name to a stamp of the pool's statement clock (`StatementRegistry`),
 * in least-recently-used order:
 *
 * - a stamp ≥ 1: the pooler sent the statement's Parse at that tick. The entry is made when the
 *   Parse is **sent**, not when its ParseComplete arrives: requests pipelined behind it may use the
 *   statement at once, as the server runs them in order. While the Parse is in flight the
 *   expectation queue holds it; if it fails (or is skipped after an earlier error), `failed` marks
 *   the entry unsure, since an older copy may still be there;
 * - `UNSURE` (-1): the server may or may not hold a copy (a Parse or Close of it failed, or the
 *   server disagreed with the pooler). It is closed before it is prepared again, and never counts
 *   as current.
 *
 * A copy is current when it was prepared after the statement last went stale pool-wide.
 */
import type { StatementRegistry } from "../pool/StatementRegistry.ts"

const UNSURE = -1
const NO_SERVER: Map<string, number> = new Map()

/** What a Describe of one server-side copy answered (see `described`). */
export interface CopyDescription {
  /** The copy's stamp: the description is that copy's only while the table still holds this stamp. */
  readonly stamp: number
  /** `resultTypeKey` of its RowDescription or NoData. */
  readonly resultType: string
  /** Its ParameterDescription message. */
  readonly params: Buffer
}

/**
 * The descriptions of each server's copies, beside the server's own table (kept by the table's
 * identity, so they go with the server when it is closed). Read only on the rare paths: a statement
 * prepared on a server, and a client's use of a statement whose result type it has seen.
 */
const descriptions = new WeakMap<Map<string, number>, Map<string, CopyDescription>>()

export class ServerStatementCache {
  private table: Map<string, number> = NO_SERVER

  constructor(
    private readonly registry: StatementRegistry,
    /** Statements kept per server; the least recently used is closed beyond. */
    private readonly capacity: number
  ) {}

  attach(table: Map<string, number>): void {
    this.table = table
  }

  detach(): void {
    this.table = NO_SERVER
  }

  /** The description of the server's copy of `serverName`, if it was described since it was prepared. */
  describedOf(serverName: string): CopyDescription | undefined {
    const found = descriptions.get(this.table)?.get(serverName)
    return found !== undefined && found.stamp === this.table.get(serverName) ? found : undefined
  }

  /** The Describe sent behind the Parse of `serverName` answered: what the copy returns. */
  described(serverName: string, resultType: string, params: Buffer): CopyDescription | undefined {
    const stamp = this.table.get(serverName)
    if (stamp === undefined || stamp === UNSURE) return undefined
    let table = descriptions.get(this.table)
    if (table === undefined) {
      table = new Map()
      descriptions.set(this.table, table)
    }
    const description: CopyDescription = { stamp, resultType, params }
    table.set(serverName, description)
    // Entries of copies closed since are dropped here rather than at each Close (a cheap bound).
    if (table.size > this.table.size * 2 + 16) {
      for (const [name, d] of table) if (this.table.get(name) !== d.stamp) table.delete(name)
    }
    return description
  }

  /**
   * The server's copy of `serverName` was prepared after the statement went stale (`markStale` came
   * later, from what this copy showed): stamped anew, so it stays current, with its description.
   */
  renew(serverName: string): void {
    const stamp = this.table.get(serverName)
    if (stamp === undefined || stamp === UNSURE) return
    const renewed = this.registry.tick()
    this.table.set(serverName, renewed)
    const table = descriptions.get(this.table)
    const found = table?.get(serverName)
    if (found !== undefined && found.stamp === stamp) table!.set(serverName, { ...found, stamp: renewed })
  }

  /** The stamp of the server's copy, if the pooler believes it has one. */
  stampOf(serverName: string): number | undefined {
    return this.table.get(serverName)
  }

  /** Whether the server holds a copy prepared since the statement last went stale; leaves the LRU order alone. */
  holdsCurrent(serverName: string): boolean {
    const stamp = this.table.get(serverName)
    return stamp !== undefined && this.registry.isCurrent(serverName, stamp)
  }

  /** `holdsCurrent`, and a hit makes the statement the most recently used. */
  useCurrent(serverName: string): boolean {
    const stamp = this.table.get(serverName)
    if (stamp === undefined || !this.registry.isCurrent(serverName, stamp)) return false
    this.table.delete(serverName)
    this.table.set(serverName, stamp)
    return true
  }

  /**
   * Before sending a Parse of `serverName`: removes a copy the server may hold (stale or unsure), and
   * returns whether there was one, which the caller must Close first.
   */
  replace(serverName: string): boolean {
    return this.table.delete(serverName)
  }

  /** Removes and returns the least recently used statement while the table is full; the caller Closes it. */
  evict(): string | undefined {
    if (this.table.size < this.capacity) return undefined
    const oldest = this.table.keys().next().value
    if (oldest !== undefined) this.table.delete(oldest)
    return oldest
  }

  /** The Parse of `serverName` is being sent: the server has it from now on, as far as later requests go. */
  sent(serverName: string): void {
    this.table.set(serverName, this.registry.tick())
  }

  /** A Parse of it failed or was skipped: an older copy the pooler knew of may still be there. */
  failed(serverName: string): void {
    if (this.table.has(serverName)) this.table.set(serverName, UNSURE)
  }

  /**
   * The server may hold it though the pooler cannot tell (a Close of it was skipped, it reported
   * the name taken, or it is to be prepared afresh): closed before any new Parse of it.
   */
  unsure(serverName: string): void {
    this.table.set(serverName, UNSURE)
  }

  /** The server reported it missing (`26000`): prepared again at its next use, with no Close first. */
  lost(serverName: string): void {
    this.table.delete(serverName)
  }

  /** The session's statements were all deallocated (`DEALLOCATE ALL`, `DISCARD ALL`). */
  clear(): void {
    this.table.clear()
  }
}
