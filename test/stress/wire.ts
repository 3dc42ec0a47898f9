/**
 * The stress harness's raw protocol client: the script decides every byte that goes on the wire
 * (pipelining, split writes, half-sent messages, vanishing), and every backend message that comes back
 * is recorded as one comparable line (see `observe`). Built on test/support/raw.ts's ideas, with
 * deadlines on every wait and a memory of what was last sent and received for hang reports.
 */
import { createHash } from "node:crypto"
import * as net from "node:net"
import { serialize } from "pg-protocol"
import { cancelRequest, ScramClient, startupMessage } from "../../src/protocol/index.ts"

export interface Message {
  readonly type: string
  readonly body: Buffer
}

/** Thrown when a wait passes its deadline; the harness turns it into a hang report. */
export class Stuck extends Error {
  constructor(readonly waitingFor: string) {
    super(`stuck waiting for ${waitingFor}`)
  }
}

/** Thrown when the connection closes while the script still expects something. */
export class Closed extends Error {
  constructor(readonly waitingFor: string) {
    super(`connection closed while waiting for ${waitingFor}`)
  }
}

export interface Endpoint {
  readonly port: number
  readonly user: string
  readonly password: string
  readonly database: string
}

const HISTORY = 6

/** Values longer than this are recorded as their length and digest: comparable, and short to print. */
const LONG_VALUE = 120

const digest = (data: Buffer | string): string => createHash("sha1").update(data).digest("hex").slice(0, 12)

const text = (value: string): string =>
  value.length > LONG_VALUE ? `<${value.length} chars ${digest(value)}>` : JSON.stringify(value)

const bytes = (value: Buffer): string =>
  value.length > LONG_VALUE ? `<${value.length} bytes ${digest(value)}>` : JSON.stringify(value.toString("utf8"))

const cstring = (body: Buffer, at: number): [string, number] => {
  const end = body.indexOf(0, at)
  const stop = end < 0 ? body.length : end
  return [body.toString("utf8", at, stop), stop + 1]
}

/** Error and notice fields, by their one-letter code. */
export const fields = (body: Buffer): Record<string, string> => {
  const out: Record<string, string> = {}
  let at = 0
  while (at < body.length && body[at] !== 0) {
    const code = String.fromCharCode(body[at]!)
    const [value, next] = cstring(body, at + 1)
    out[code] = value
    at = next
  }
  return out
}

/**
 * Error fields that say what went wrong. Left out: F/L/R (source file, line, routine: the same server
 * either way) and W (context; none of the scripts' statements run in functions).
 */
const ERROR_FIELDS = ["S", "C", "M", "D", "H", "P", "s", "t", "c", "n"] as const

/**
 * One backend message as a line of text holding everything that must match between Tidepool and a
 * direct connection, and nothing that may not: no backend pid (NotificationResponse), no table OID
 * (RowDescription: the two runs use two databases, whose tables have different OIDs).
 * `normalizeError` rewrites error text before it is recorded (see differences.ts).
 */
export const observe = (m: Message, normalizeError: (fields: Record<string, string>) => void): string => {
  const body = m.body
  switch (m.type) {
    case "C":
      return `C ${cstring(body, 0)[0]}`
    case "D": {
      const n = body.readInt16BE(0)
      const values: Array<string> = []
      let at = 2
      for (let i = 0; i < n; i++) {
        const len = body.readInt32BE(at)
        at += 4
        if (len < 0) values.push("NULL")
        else {
          values.push(text(body.toString("utf8", at, at + len)))
          at += len
        }
      }
      return `D ${values.join(",")}`
    }
    case "T": {
      const n = body.readInt16BE(0)
      const columns: Array<string> = []
      let at = 2
      for (let i = 0; i < n; i++) {
        const [name, next] = cstring(body, at)
        const attnum = body.readInt16BE(next + 4)
        const typeOid = body.readInt32BE(next + 6)
        const typlen = body.readInt16BE(next + 10)
        const typmod = body.readInt32BE(next + 12)
        const format = body.readInt16BE(next + 16)
        columns.push(`${name}:${typeOid}/${typlen}/${typmod}/${format}@${attnum}`)
        at = next + 18
      }
      return `T ${columns.join(",")}`
    }
    case "t": {
      const n = body.readInt16BE(0)
      const oids: Array<number> = []
      for (let i = 0; i < n; i++) oids.push(body.readInt32BE(2 + 4 * i))
      return `t ${oids.join(",")}`
    }
    case "E":
    case "N": {
      const f = fields(body)
      normalizeError(f)
      return `${m.type} ${ERROR_FIELDS.filter((k) => f[k] !== undefined)
        .map((k) => `${k}=${text(f[k]!)}`)
        .join(" ")}`
    }
    case "S": {
      const [name, next] = cstring(body, 0)
      return `S ${name}=${cstring(body, next)[0]}`
    }
    case "Z":
      return `Z ${String.fromCharCode(body[0]!)}`
    case "d":
      return `d ${bytes(body)}`
    case "G":
    case "H":
    case "W": {
      const n = body.readInt16BE(1)
      const formats: Array<number> = []
      for (let i = 0; i < n; i++) formats.push(body.readInt16BE(3 + 2 * i))
      return `${m.type} ${body[0]}:${formats.join(",")}`
    }
    case "A": {
      const [channel, next] = cstring(body, 4)
      return `A ${channel}:${cstring(body, next)[0]}`
    }
    case "1":
    case "2":
    case "3":
    case "n":
    case "s":
    case "I":
    case "c":
      return m.type
    default:
      return `${m.type} ${bytes(body)}`
  }
}

/** What a frontend message is, in a few words, for hang reports. */
export const describeFrame = (frame: Buffer): string => {
  const type = String.fromCharCode(frame[0]!)
  const body = frame.subarray(5)
  switch (type) {
    case "Q":
      return `Query ${text(cstring(body, 0)[0])}`
    case "P": {
      const [name, next] = cstring(body, 0)
      return `Parse ${JSON.stringify(name)} ${text(cstring(body, next)[0])}`
    }
    case "B": {
      const [portal, next] = cstring(body, 0)
      return `Bind ${JSON.stringify(portal)}←${JSON.stringify(cstring(body, next)[0])}`
    }
    case "E":
      return `Execute ${JSON.stringify(cstring(body, 0)[0])} max ${body.readInt32BE(cstring(body, 0)[1])}`
    case "D":
      return `Describe ${String.fromCharCode(body[0]!)} ${JSON.stringify(cstring(body, 1)[0])}`
    case "C":
      return `Close ${String.fromCharCode(body[0]!)} ${JSON.stringify(cstring(body, 1)[0])}`
    case "S":
      return "Sync"
    case "H":
      return "Flush"
    case "X":
      return "Terminate"
    case "d":
      return `CopyData ${bytes(body)}`
    case "c":
      return "CopyDone"
    case "f":
      return `CopyFail ${text(cstring(body, 0)[0])}`
    default:
      return `${type} (${frame.length} bytes)`
  }
}

/** Frames in a buffer of whole messages (what a script sends), for hang reports. */
export const framesOf = (data: Buffer): Array<Buffer> => {
  const out: Array<Buffer> = []
  let at = 0
  while (at + 5 <= data.length) {
    const end = at + 1 + data.readInt32BE(at + 1)
    out.push(data.subarray(at, Math.min(end, data.length)))
    at = end
  }
  return out
}

/**
 * A logged-in connection. After login every backend message is both recorded (`log`, via
 * `observe`) and queued for the script's waits (`next`).
 */
export class WireClient {
  /** Every message received after login, as `observe` lines. */
  readonly log: Array<string> = []
  readonly parameters = new Map<string, string>()
  pid = 0
  secret = 0
  closed = false
  /** The last few things written and read, for hang reports. */
  readonly sent: Array<string> = []
  readonly received: Array<string> = []
  /** Called on every message after login (the harness samples the pool's size there). */
  onMessage: (() => void) | undefined = undefined

  private readonly inbox: Array<Message> = []
  private pending: Array<Buffer> = []
  private pendingLength = 0
  private wake: (() => void) | undefined = undefined
  private recording = false

  private constructor(
    readonly socket: net.Socket,
    private readonly normalizeError: (fields: Record<string, string>) => void
  ) {
    socket.setNoDelay(true)
    socket.on("data", this.onData)
    socket.on("close", () => {
      this.closed = true
      this.wake?.()
    })
    socket.on("error", () => {})
  }

  static async connect(
    endpoint: Endpoint,
    normalizeError: (fields: Record<string, string>) => void,
    deadline: number
  ): Promise<WireClient> {
    const socket = net.connect(endpoint.port, "127.0.0.1")
    const client = new WireClient(socket, normalizeError)
    await client.race(
      "TCP connect",
      deadline,
      new Promise<void>((resolve, reject) => {
        socket.once("connect", resolve)
        socket.once("error", reject)
      })
    )
    socket.write(startupMessage({ user: endpoint.user, database: endpoint.database }))
    const scram = new ScramClient({ password: endpoint.password })
    for (;;) {
      const m = await client.next(deadline, "login")
      if (m.type === "E") throw new Error(`login failed: ${JSON.stringify(fields(m.body))}`)
      if (m.type === "S") {
        const [name, next] = cstring(m.body, 0)
        client.parameters.set(name, cstring(m.body, next)[0])
      } else if (m.type === "K") {
        client.pid = m.body.readInt32BE(0)
        client.secret = m.body.readInt32BE(4)
      } else if (m.type === "Z") {
        client.recording = true
        return client
      } else if (m.type === "R") {
        const code = m.body.readInt32BE(0)
        if (code === 10) socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
        else if (code === 11) {
          const final = scram.handleServerFirst(m.body.subarray(4).toString())
          if (typeof final !== "string") throw new Error("bad SCRAM server-first message")
          socket.write(serialize.sendSCRAMClientFinalMessage(final))
        }
      }
    }
  }

  private readonly onData = (chunk: Buffer): void => {
    this.pending.push(chunk)
    this.pendingLength += chunk.length
    // Gather lazily: a multi-megabyte row arrives in many chunks, and is joined once, when whole.
    for (;;) {
      if (this.pendingLength < 5) break
      if (this.pending[0]!.length < 5) this.flatten()
      const head = this.pending[0]!
      const size = 1 + head.readInt32BE(1)
      if (this.pendingLength < size) break
      if (head.length < size) this.flatten()
      const whole = this.pending[0]!
      const message = { type: String.fromCharCode(whole[0]!), body: Buffer.from(whole.subarray(5, size)) }
      if (whole.length === size) this.pending.shift()
      else this.pending[0] = whole.subarray(size)
      this.pendingLength -= size
      this.deliver(message)
    }
    this.wake?.()
  }

  private flatten(): void {
    this.pending = [Buffer.concat(this.pending, this.pendingLength)]
  }

  private deliver(message: Message): void {
    if (this.recording) {
      const line = observe(message, this.normalizeError)
      this.log.push(line)
      remember(this.received, line)
      this.onMessage?.()
    }
    this.inbox.push(message)
  }

  /** The next message, or `Stuck` at the deadline, or `Closed` if the connection ends first. */
  async next(deadline: number, waitingFor: string): Promise<Message> {
    for (;;) {
      const m = this.inbox.shift()
      if (m !== undefined) return m
      if (this.closed) throw new Closed(waitingFor)
      const remaining = deadline - Date.now()
      if (remaining <= 0) throw new Stuck(waitingFor)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining)
        this.wake = () => {
          clearTimeout(timer)
          resolve()
        }
      })
      this.wake = undefined
    }
  }

  /** Reads until `count` ReadyForQuery have arrived. */
  async untilReady(count: number, deadline: number): Promise<void> {
    for (let seen = 0; seen < count; ) {
      const m = await this.next(deadline, `ReadyForQuery ${seen + 1} of ${count}`)
      if (m.type === "Z") seen++
    }
  }

  /** Reads until a message of one of `types` arrives; returns its type. */
  async until(types: string, deadline: number): Promise<string> {
    for (;;) {
      const m = await this.next(deadline, `one of ${[...types].join(" ")}`)
      if (types.includes(m.type)) return m.type
    }
  }

  /** Writes `data` in pieces cut at `cuts` (byte offsets), yielding to the event loop between them. */
  async write(data: Buffer, cuts: ReadonlyArray<number> = []): Promise<void> {
    for (const frame of framesOf(data)) remember(this.sent, describeFrame(frame))
    let from = 0
    for (const cut of [...cuts.filter((c) => c > 0 && c < data.length)].sort((a, b) => a - b)) {
      if (cut <= from) continue
      this.socket.write(data.subarray(from, cut))
      from = cut
      // Separate writes are more likely to arrive as separate reads when they are not in one tick.
      await new Promise<void>((resolve) => setImmediate(resolve))
    }
    if (from < data.length) this.socket.write(data.subarray(from))
  }

  /** Writes the first `length` bytes of `data` and drops the connection without a goodbye. */
  vanish(data: Buffer, length: number): void {
    if (length > 0) {
      remember(this.sent, `${length} of ${data.length} bytes, then vanished`)
      this.socket.write(data.subarray(0, length))
    } else remember(this.sent, "vanished")
    this.socket.destroy()
  }

  /** Terminate (after `data`, in the same write), then close our end; nothing read afterwards is recorded. */
  terminate(data: Buffer = Buffer.alloc(0)): void {
    // Replies to what preceded Terminate may still arrive on a direct connection; a client that sent
    // Terminate has said it reads nothing more, and Tidepool sends nothing more.
    this.recording = false
    for (const frame of framesOf(data)) remember(this.sent, describeFrame(frame))
    remember(this.sent, "Terminate")
    this.socket.end(Buffer.concat([data, serialize.end()]))
  }

  private async race<A>(waitingFor: string, deadline: number, promise: Promise<A>): Promise<A> {
    let timer: NodeJS.Timeout | undefined
    try {
      return await Promise.race([
        promise,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Stuck(waitingFor)), Math.max(0, deadline - Date.now()))
        })
      ])
    } finally {
      clearTimeout(timer)
    }
  }
}

const remember = (ring: Array<string>, line: string): void => {
  ring.push(line.length > 200 ? `${line.slice(0, 200)}…` : line)
  if (ring.length > HISTORY) ring.shift()
}

/** Sends a CancelRequest for (pid, secret) to `port` and waits until the receiver closes it. */
export const sendCancel = (port: number, pid: number, secret: number, deadline: number): Promise<void> =>
  new Promise<void>((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1")
    const timer = setTimeout(
      () => {
        socket.destroy()
        reject(new Stuck("the CancelRequest connection to close"))
      },
      Math.max(0, deadline - Date.now())
    )
    socket.on("connect", () => socket.write(cancelRequest(pid, secret)))
    socket.on("error", () => {})
    socket.on("close", () => {
      clearTimeout(timer)
      resolve()
    })
    socket.resume()
  })
