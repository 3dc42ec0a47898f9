/**
 * A lean PostgreSQL client for login storms and idle crowds: one raw socket, SCRAM-SHA-256 with the
 * client keys derived once per (salt, iterations) and reused, simple queries, nothing else. What a
 * storm measures is the pooler's cost, so the generator must not spend 4096 PBKDF2 rounds (a few
 * milliseconds) per login, nor `pg`'s per-client machinery, on its side. Used by `npm run bench`
 * (--idle, --storm, --wave) and by test/integration/storm.test.ts.
 */
import { randomBytes } from "node:crypto"
import * as net from "node:net"
import { serialize } from "pg-protocol"
import { ScramClient, type ScramKeys, startupMessage } from "../src/protocol/index.ts"

export interface LeanTarget {
  readonly host: string
  readonly port: number
  readonly user: string
  readonly password: string
  readonly database: string
}

/** A refusal or failure the server sent: its SQLSTATE and message. */
export class ServerError extends Error {
  constructor(
    readonly sqlstate: string,
    message: string
  ) {
    super(message)
  }
}

/** SCRAM client keys by salt and iteration count, derived from the password the first time only. */
export class ScramKeyCache {
  private readonly keys = new Map<string, ScramKeys>()

  /**
   * The SCRAM client for an exchange whose client-first carried `nonce`, made at server-first when
   * the salt is known: with the cached keys when this salt has been seen, else from the password.
   */
  client(password: string, serverFirst: string, nonce: string): ScramClient {
    const m = /,s=([^,]*),i=([0-9]+)/.exec(serverFirst)
    const cached = m === null ? undefined : this.keys.get(`${m[1]}:${m[2]}`)
    return cached === undefined
      ? new ScramClient({ password }, { nonce })
      : new ScramClient(
          { clientKey: cached.clientKey, ...(cached.serverKey !== undefined ? { serverKey: cached.serverKey } : {}) },
          { nonce }
        )
  }

  remember(scram: ScramClient): void {
    const keys = scram.keys
    if (keys !== undefined) this.keys.set(`${keys.salt.toString("base64")}:${keys.iterations}`, keys)
  }
}

/** An ErrorResponse's SQLSTATE and message. */
const errorOf = (body: Buffer): ServerError => {
  let sqlstate = ""
  let message = ""
  let at = 0
  while (at < body.length && body[at] !== 0) {
    const end = body.indexOf(0, at + 1)
    if (body[at] === 0x43) sqlstate = body.toString("utf8", at + 1, end)
    if (body[at] === 0x4d) message = body.toString("utf8", at + 1, end)
    at = end + 1
  }
  return new ServerError(sqlstate, message)
}

const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4])

/** One logged-in connection; `query` runs one simple query at a time. */
export class LeanClient {
  private buffered: Buffer | undefined = undefined
  private handler: (type: number, body: Buffer) => void = () => {}
  private onEnd: (error: Error) => void = () => {}
  closed = false

  constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      let data = this.buffered === undefined ? chunk : Buffer.concat([this.buffered, chunk])
      while (data.length >= 5) {
        const length = data.readInt32BE(1)
        if (data.length < 1 + length) break
        this.handler(data[0]!, data.subarray(5, 1 + length))
        data = data.subarray(1 + length)
      }
      this.buffered = data.length === 0 ? undefined : data
    })
    let failure = ""
    socket.on("error", (error: NodeJS.ErrnoException) => {
      failure = `: ${error.code ?? error.message}`
    })
    socket.on("close", () => {
      this.closed = true
      this.onEnd(new Error(`connection closed${failure}`))
    })
  }

  /** Runs `sql`; resolves at ReadyForQuery, rejects with the server's error (or a lost connection). */
  query(sql: string): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error("connection closed"))
      let error: ServerError | undefined
      this.onEnd = reject
      this.handler = (type, body) => {
        if (type === 0x45) error = errorOf(body)
        else if (type === 0x5a) {
          this.onEnd = () => {}
          if (error === undefined) resolve()
          else reject(error)
        }
      }
      this.socket.write(serialize.query(sql))
    })
  }

  /** Politely: Terminate, then FIN. */
  terminate(): void {
    if (!this.closed) this.socket.end(TERMINATE)
  }

  /** Resolves when the server has closed the connection (after an error, a kick, a shutdown). */
  ended(): Promise<void> {
    return this.closed
      ? Promise.resolve()
      : new Promise((resolve) => {
          this.onEnd = () => resolve()
        })
  }

  /**
   * Logs in (SCRAM-SHA-256, or whatever needs no password) on a new connection, from `localAddress`
   * when given (many loopback source addresses get past the ~28k ports one address has per
   * destination). Rejects with a `ServerError` when the server refuses.
   */
  static login(target: LeanTarget, keys: ScramKeyCache, localAddress?: string): Promise<LeanClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({
        host: target.host,
        port: target.port,
        noDelay: true,
        ...(localAddress !== undefined ? { localAddress } : {})
      })
      const client = new LeanClient(socket)
      let nonce = ""
      let error: ServerError | undefined
      client.onEnd = (lost) => reject(error ?? lost)
      socket.once("connect", () => socket.write(startupMessage({ user: target.user, database: target.database })))
      client.handler = (type, body) => {
        if (type === 0x45) {
          error = errorOf(body)
          return
        }
        if (type === 0x5a) {
          client.onEnd = () => {}
          client.handler = () => {}
          resolve(client)
          return
        }
        if (type !== 0x52) return
        const code = body.readInt32BE(0)
        if (code === 10) {
          // The SCRAM client itself is made at server-first, when the salt says which keys to use.
          nonce = randomBytes(18).toString("base64")
          socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", `n,,n=,r=${nonce}`))
        } else if (code === 11) {
          const serverFirst = body.toString("utf8", 4)
          const scram = keys.client(target.password, serverFirst, nonce)
          const final = scram.handleServerFirst(serverFirst)
          if (typeof final !== "string") {
            socket.destroy()
            reject(new Error(final.message))
            return
          }
          keys.remember(scram)
          socket.write(serialize.sendSCRAMClientFinalMessage(final))
        }
      }
    })
  }
}
