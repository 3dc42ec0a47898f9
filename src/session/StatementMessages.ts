/**
 * The bytes of statement rewriting (docs/prepared-statements.md): reading names out of Parse, Bind,
 * Describe and Close, building their renamed forms, and the messages the pooler makes up or sends
 * on its own account. Pure functions and constants, no state: what to send when is decided in
 * `PreparedStatements`.
 */
import { Buffer } from "node:buffer"
import { Backend, errorResponse, Frontend, readyForQuery, STATEMENT_TARGET } from "../protocol/index.ts"

export const PARSE_COMPLETE_MESSAGE = Buffer.from([Backend.ParseComplete, 0, 0, 0, 4])
export const CLOSE_COMPLETE_MESSAGE = Buffer.from([Backend.CloseComplete, 0, 0, 0, 4])
export const READY_IDLE = readyForQuery("I")
export const SYNC_MESSAGE = Buffer.from([Frontend.Sync, 0, 0, 0, 4])
export const FLUSH_MESSAGE = Buffer.from([Frontend.Flush, 0, 0, 0, 4])

/**
 * A request that always fails without side effects: Describe of a statement no one can have
 * prepared (longer than SQL identifiers may be, and clients' protocol-level names are renamed).
 * Sent in place of a request the pooler refuses, so the server's transaction state follows
 * PostgreSQL's.
 */
export const DESCRIBE_MISSING = (() => {
  const name = Buffer.from("tidepool.missing.statement.that.no.session.can.have.prepared.ever\0")
  const m = Buffer.alloc(6 + name.length)
  m[0] = Frontend.Describe
  m.writeInt32BE(5 + name.length, 1)
  m[5] = STATEMENT_TARGET
  name.copy(m, 6)
  return m
})()

export const closeStatement = (serverName: string): Buffer => {
  const len = Buffer.byteLength(serverName)
  const m = Buffer.alloc(7 + len)
  m[0] = Frontend.Close
  m.writeInt32BE(6 + len, 1)
  m[5] = STATEMENT_TARGET
  m.write(serverName, 6)
  return m
}

/** Describe of a server-side statement (`serverNameZ`: its name and NUL). */
export const describeStatement = (serverNameZ: Buffer): Buffer => {
  const m = Buffer.allocUnsafe(6 + serverNameZ.length)
  m[0] = Frontend.Describe
  m.writeInt32BE(5 + serverNameZ.length, 1)
  m[5] = STATEMENT_TARGET
  serverNameZ.copy(m, 6)
  return m
}

/**
 * What PostgreSQL compares when it re-plans a prepared statement (`cached plan must not change
 * result type`: `equalTupleDescs`, `equalRowTypes` from version 17), read from the RowDescription
 * at [`pos`, `next`) of `data` (or a NoData): the number of columns and each one's name, type and
 * type modifier. The table and column a field comes from, and its format, are left out: a table
 * dropped and created again with the same columns gives the same result type. A column's
 * collation, which PostgreSQL compares too, is not in the message.
 */
export const resultTypeKey = (data: Buffer, pos: number, next: number): string => {
  if (data[pos] !== Backend.RowDescription) return "n"
  const count = data.readUInt16BE(pos + 5)
  let key = `T${count}`
  let at = pos + 7
  for (let i = 0; i < count && at < next; i++) {
    const nameEnd = data.indexOf(0, at)
    if (nameEnd < 0 || nameEnd + 19 > next) break
    key += `|${data.toString("utf8", at, nameEnd)}:${data.readUInt32BE(nameEnd + 7)}:${data.readInt32BE(nameEnd + 13)}`
    at = nameEnd + 19
  }
  return key
}

/** Close of the unnamed statement: makes a server without the client's unnamed statement fail as PostgreSQL would. */
export const CLOSE_UNNAMED = closeStatement("")

/**
 * The client's Parse at [`pos`, `next`) under `serverName`: kept for as long as the statement lives
 * and sent to every server that lacks it, so it is a copy, not a view of the client's chunk.
 */
export const renamedParse = (serverName: string, data: Buffer, nameEnd: number, next: number): Buffer => {
  const serverNameBytes = Buffer.byteLength(serverName)
  const parse = Buffer.allocUnsafe(next - nameEnd + 5 + serverNameBytes)
  parse[0] = Frontend.Parse
  parse.writeInt32BE(parse.length - 1, 1)
  parse.write(serverName, 5)
  data.copy(parse, 5 + serverNameBytes, nameEnd, next)
  return parse
}

/**
 * Appends to `pieces` the Bind or Describe at [`pos`, `next`) with the statement name at
 * [`nameStart`, `nameEnd`) replaced by `serverNameZ`: a new header, then views of the client's bytes
 * (a Bind's parameters are not copied).
 */
export const pushRenamed = (
  pieces: Array<Buffer>,
  data: Buffer,
  pos: number,
  nameStart: number,
  nameEnd: number,
  next: number,
  serverNameZ: Buffer
): void => {
  const header = Buffer.allocUnsafe(5)
  header[0] = data[pos]!
  header.writeInt32BE(next - pos - 1 - (nameEnd + 1 - nameStart) + serverNameZ.length, 1)
  pieces.push(header)
  if (nameStart > pos + 5) pieces.push(data.subarray(pos + 5, nameStart))
  pieces.push(serverNameZ)
  if (next > nameEnd + 1) pieces.push(data.subarray(nameEnd + 1, next))
}

/**
 * The server's ErrorResponse (fields at [`start`, `start + length`)) with `serverName` replaced by
 * `clientName` (`bind message supplies 0 parameters, but prepared statement "q" requires 1`): the
 * pooler's `tp_…` names stay internal. Undefined when the error does not name it.
 */
export const clientNamedError = (
  serverName: string,
  clientName: string,
  body: Buffer,
  start: number,
  length: number
): Buffer | undefined => {
  const text = body.toString("utf8", start, start + length)
  if (!text.includes(serverName)) return undefined
  const fields = Buffer.from(text.replaceAll(serverName, clientName), "utf8")
  const message = Buffer.allocUnsafe(5 + fields.length)
  message[0] = Backend.ErrorResponse
  message.writeInt32BE(4 + fields.length, 1)
  fields.copy(message, 5)
  return message
}

/** PostgreSQL's answer to a request in a failed transaction. */
export const ABORTED = errorResponse({
  severity: "ERROR",
  code: "25P02",
  message: "current transaction is aborted, commands ignored until end of transaction block"
})

/** What PostgreSQL says when a statement's result type changed since it was prepared (postgres.js re-prepares on its routine). */
export const STALE_PLAN = errorResponse({
  severity: "ERROR",
  code: "0A000",
  message: "cached plan must not change result type",
  routine: "RevalidateCachedQuery"
})

/** What a CommandComplete tag means for SQL-level statements (`commandTag`). */
export enum SqlTag {
  Other = 0,
  Prepare = 1,
  Deallocate = 2,
  /** `DEALLOCATE ALL` or `DISCARD ALL`: every statement of the session is gone. */
  DeallocateAll = 3
}

const TAG_PREPARE = Buffer.from("PREPARE\0")
const TAG_DEALLOCATE = Buffer.from("DEALLOCATE\0")
const TAG_DEALLOCATE_ALL = Buffer.from("DEALLOCATE ALL\0")
const TAG_DISCARD_ALL = Buffer.from("DISCARD ALL\0")

const isTag = (body: Buffer, start: number, length: number, tag: Buffer) =>
  length === tag.length && body.compare(tag, 0, tag.length, start, start + length) === 0

/** Classifies the CommandComplete tag at [`start`, `start + length`), comparing bytes only for tags starting P or D. */
export const commandTag = (body: Buffer, start: number, length: number): SqlTag => {
  const first = body[start]
  if (first === 0x50) return isTag(body, start, length, TAG_PREPARE) ? SqlTag.Prepare : SqlTag.Other
  if (first !== 0x44) return SqlTag.Other
  if (isTag(body, start, length, TAG_DEALLOCATE)) return SqlTag.Deallocate
  return isTag(body, start, length, TAG_DEALLOCATE_ALL) || isTag(body, start, length, TAG_DISCARD_ALL)
    ? SqlTag.DeallocateAll
    : SqlTag.Other
}
