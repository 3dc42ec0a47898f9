/**
 * One transaction-mode client's statements as it sees them (docs/prepared-statements.md): its named
 * statements by its own names, each mapped to the server-side name clients share, and its unnamed
 * statement, which must follow it from server to server. What any server holds is
 * `ServerStatementCache`'s business; this table outlives every server the client is lent.
 */
import { Buffer } from "node:buffer"
import { createHash } from "node:crypto"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import type { StatementRegistry } from "../pool/StatementRegistry.ts"
import { renamedParse } from "./StatementMessages.ts"

export interface Statement {
  /** The client's name. */
  readonly name: string
  readonly serverName: string
  /** `serverName` and its NUL, as Bind and Describe carry it. */
  readonly serverNameZ: Buffer
  /** The client's Parse, renamed: what a server lacking the statement is sent. */
  readonly parse: Buffer
  readonly bytes: number
  /** The pool's statement clock (`StatementRegistry`) when the client parsed it. */
  readonly parsedAt: number
  /**
   * The clock when a Bind or Describe of it by this client last succeeded, -1 before the first: the
   * client has seen the statement's result type as of then.
   */
  usedAt: number
  /**
   * The statement's result type as PostgreSQL fixed it for this client (`resultTypeKey`): read from
   * a copy described when the client's Parse reached a server, else at its first use; undefined
   * until then, and again once the client was told `cached plan must not change result type` (from
   * then on it takes the type it meets, docs/prepared-statements.md, "After DDL").
   */
  resultType: string | undefined
  /** The stamp of the last copy found to return `resultType` (the check is skipped for it), -1 for none. */
  checkedStamp: number
  /** The ParameterDescription PostgreSQL would answer a Describe of it with, once known. */
  params: Buffer | undefined
}

export interface ClientStatementLimits {
  /** Named statements one client may hold (EMAXPREPARED). */
  readonly maxCount: number
  /** Bytes of Parse messages one client may hold (EMAXPREPAREDMEM). */
  readonly maxMemory: number
}

/**
 * Settings that change what a statement means when it is parsed (how literals are read, which tables
 * a name means): part of its identity, so clients with different values never share a statement.
 */
const PARSE_SETTINGS = [
  "search_path",
  "datestyle",
  "intervalstyle",
  "timezone",
  "standard_conforming_strings",
  "client_encoding"
] as const

/** Beyond this, the chunk holding an unnamed Parse is not kept alive for it: the Parse is copied out. */
const UNNAMED_BY_REFERENCE = 4096

const formatBytes = (n: number): string =>
  n % 1_048_576 === 0 ? `${n / 1_048_576}MB` : n % 1024 === 0 ? `${n / 1024}kB` : `${n} bytes`

export class ClientStatements {
  private readonly byName = new Map<string, Statement>()
  /** Bytes of the client's Parse messages held (its limit is `maxMemory`). */
  private memory = 0

  /** The chunk holding the client's unnamed statement's Parse at [unnamedAt, unnamedEnd), if it has one. */
  private unnamedChunk: Buffer | undefined = undefined
  private unnamedAt = 0
  private unnamedEnd = 0
  /** The held server's unnamed statement is the client's (or both have none) since it was lent. */
  unnamedHere = false

  constructor(
    private readonly registry: StatementRegistry,
    private readonly limits: ClientStatementLimits,
    /** The client's session settings (kept current by the relay, which may replace the map: `useSettings`). */
    private settings: ReadonlyMap<string, string>
  ) {}

  /** The relay's settings map is now this one (its own copy, made at the client's first change). */
  useSettings(settings: ReadonlyMap<string, string>): void {
    this.settings = settings
  }

  get size(): number {
    return this.byName.size
  }

  get(name: string): Statement | undefined {
    return this.byName.get(name)
  }

  has(name: string): boolean {
    return this.byName.has(name)
  }

  /** Why a Parse of `name` (`bytes` long) is refused, if it is. */
  refusal(name: string, bytes: number): TidepoolError | undefined {
    const { maxCount, maxMemory } = this.limits
    return this.byName.has(name)
      ? tidepoolError("EPREPAREDDUP", name)
      : this.byName.size >= maxCount
        ? tidepoolError("EMAXPREPARED", maxCount)
        : this.memory + bytes > maxMemory
          ? tidepoolError("EMAXPREPAREDMEM", formatBytes(maxMemory))
          : undefined
  }

  /**
   * Whether `count` more statements of `bytes` more Parse bytes fit within the limits: a batch
   * answered without a server must not fail half way, so it is checked whole first.
   */
  wouldFit(count: number, bytes: number): boolean {
    return this.byName.size + count <= this.limits.maxCount && this.memory + bytes <= this.limits.maxMemory
  }

  /** The server-side name of the Parse at `nameEnd` (the end of its client-side name). */
  serverNameOf(data: Buffer, nameEnd: number, next: number): string {
    // Query text, parameter types, and the settings that decide how the text is read: its identity.
    const hash = createHash("sha256").update(data.subarray(nameEnd + 1, next))
    for (const setting of PARSE_SETTINGS) hash.update(`\0${setting}=${this.settings.get(setting) ?? ""}`)
    return `tp_${hash.digest("hex").slice(0, 40)}`
  }

  /** Records the client's statement from its Parse message at [`pos`, `next`). */
  register(name: string, data: Buffer, pos: number, nameEnd: number, next: number, serverName?: string): Statement {
    const bytes = next - pos
    const server = serverName ?? this.serverNameOf(data, nameEnd, next)
    const statement: Statement = {
      name,
      serverName: server,
      serverNameZ: Buffer.from(`${server}\0`),
      parse: renamedParse(server, data, nameEnd, next),
      bytes,
      parsedAt: this.registry.tick(),
      usedAt: -1,
      resultType: undefined,
      checkedStamp: -1,
      params: undefined
    }
    this.byName.set(name, statement)
    this.memory += bytes
    return statement
  }

  /** The client closed it, or its Parse did not happen; a newer statement of the same name stays. */
  forget(statement: Statement): void {
    if (this.byName.get(statement.name) !== statement) return
    this.byName.delete(statement.name)
    this.memory -= statement.bytes
  }

  /** Its Close did not happen after all: the statement is the client's again, unless the name was reused. */
  restore(statement: Statement): void {
    if (this.byName.has(statement.name)) return
    this.byName.set(statement.name, statement)
    this.memory += statement.bytes
  }

  /** `DEALLOCATE ALL` / `DISCARD ALL`. */
  clear(): void {
    this.byName.clear()
    this.memory = 0
  }

  /**
   * The client's unnamed statement lives on whichever server ran its Parse, and dies with a simple
   * Query, a Close of it or the next unnamed Parse. A Bind or Describe of it in a later transaction
   * may land on another server, which holds another client's unnamed statement or none: the
   * client's Parse is sent there first (its ParseComplete swallowed), or, when the client has none,
   * a Close of the unnamed statement, so the server fails as PostgreSQL would for this client.
   * The Parse is kept by reference (the relay owns its chunks), copied only out of a large chunk.
   */
  keepUnnamed(data: Buffer, pos: number, next: number): void {
    this.unnamedHere = true
    if (next > data.length) {
      this.unnamedChunk = undefined // streamed: too large to keep (docs/prepared-statements.md, limits)
    } else if (data.length > UNNAMED_BY_REFERENCE) {
      this.unnamedChunk = Buffer.from(data.subarray(pos, next))
      this.unnamedAt = 0
      this.unnamedEnd = next - pos
    } else {
      this.unnamedChunk = data
      this.unnamedAt = pos
      this.unnamedEnd = next
    }
  }

  /** A simple Query or a Close of it destroyed the unnamed statement, here and for the client. */
  forgetUnnamed(): void {
    this.unnamedChunk = undefined
    this.unnamedHere = true
  }

  /** The client's unnamed Parse, to send to the held server first; undefined when the client has none. */
  unnamedParse(): Buffer | undefined {
    const chunk = this.unnamedChunk
    return chunk === undefined ? undefined : chunk.subarray(this.unnamedAt, this.unnamedEnd)
  }
}
