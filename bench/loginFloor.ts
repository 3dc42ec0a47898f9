/**
 * The floor of a Node.js login: a bare server (no Effect, no pooling, no PostgreSQL behind it) that
 * does exactly the login Tidepool does and then holds the client idle. Startup packet (SSLRequest
 * answered `N`), SCRAM-SHA-256 against a verifier derived once at start, with the crypto choices
 * of src/protocol/scram.ts (HMAC keys as `KeyObject`s made once, nonces from a pooled random
 * block), AuthenticationSASLFinal + AuthenticationOk, the ParameterStatus set PostgreSQL 17
 * reports, BackendKeyData, ReadyForQuery. An idle client keeps its socket and one small object.
 * A Query gets a canned one-row answer (`1`), enough for pgbench -S and the bench's sample query;
 * a Sync gets ReadyForQuery; Terminate closes. Refusals (unknown user, wrong password) wait the
 * same delay as Tidepool's `auth_failure_delay` (a timer) before their ErrorResponse.
 *
 * What Tidepool spends above this per login, per refusal and per idle client is Tidepool's own;
 * what this spends above PgBouncer is out of reach for a Node.js pooler. The bench's `login-floor`
 * target (`--connect`) runs it beside Tidepool and PgBouncer.
 *
 * **With an upstream** (`FLOOR_UPSTREAM=postgres://user:password@host:port/database`, `FLOOR_POOL=N`)
 * it is the floor of a Node.js *transaction pooler*: N server connections opened at start, and a
 * logged-in client's messages go to a free one (or wait, first come first served, for the next
 * to be free), its replies come back as read, and the server is free again at ReadyForQuery
 * outside a transaction (a transaction its client left open is rolled back first). No
 * prepared-statement handling (named statements need `-M extended`, as with PgBouncer 1.18), no
 * session state, no pipelining across a transaction's end: enough for `pgbench -S` (simple or
 * extended). Each read of a client's whole messages is one write to its server, each read of a
 * server's replies one write to its client, and servers read into one shared buffer, as Tidepool
 * does. The bench's `pool-floor` target runs it, so a pooler's login (`--connect`: the query of
 * `pgbench -C` reaches PostgreSQL) and a pooled transaction under contention (`pgbench -c 1000` on
 * a pool of 10) have a floor too.
 *
 * Run as `node bench/loginFloor.ts PORT USER PASSWORD [FAILURE_DELAY_MS [stream]]` — Node 24 strips the
 * types itself, so no tsx (whose `__name` wrappers would add to every closure) is in the way.
 */
import {
  createHash,
  createHmac,
  createSecretKey,
  pbkdf2Sync,
  randomBytes,
  randomFillSync,
  timingSafeEqual
} from "node:crypto"
import * as net from "node:net"
import pg from "pg"

const [portArg, user, password, delayArg, readsArg] = process.argv.slice(2)
if (portArg === undefined || user === undefined || password === undefined) {
  process.stderr.write("usage: node bench/loginFloor.ts PORT USER PASSWORD [FAILURE_DELAY_MS]\n")
  process.exit(2)
}
const failureDelayMs = Number(delayArg ?? 500)
/**
 * `stream`: the accepted socket is read through its 'data' events (Node allocates a buffer per
 * read), as Tidepool's handshake reads are, instead of into one shared buffer: what that costs.
 */
const streamReads = readsArg === "stream"

// The verifier, derived once (Tidepool's SecretCache keeps one per password), with its HMAC keys
// as KeyObjects (scram.ts: a Buffer key costs createHmac two thrown TypeErrors on Node 24).
const ITERATIONS = 4096
const salt = randomBytes(16)
const saltedPassword = pbkdf2Sync(password, salt, ITERATIONS, 32, "sha256")
const hmac = (key: Parameters<typeof createHmac>[1], data: string) => createHmac("sha256", key).update(data).digest()
const clientKey = hmac(createSecretKey(saltedPassword), "Client Key")
const storedKeyBytes = createHash("sha256").update(clientKey).digest()
const storedKey = createSecretKey(storedKeyBytes)
const serverKey = createSecretKey(hmac(createSecretKey(saltedPassword), "Server Key"))
const serverFirstTail = `,s=${salt.toString("base64")},i=${ITERATIONS}`

// Nonces from one random block, refilled every 256 logins (as scram.ts does).
const NONCE_BYTES = 18
const noncePool = Buffer.alloc(NONCE_BYTES * 256)
let nonceAt = noncePool.length
const nonce = (): string => {
  if (nonceAt === noncePool.length) {
    randomFillSync(noncePool)
    nonceAt = 0
  }
  const value = noncePool.toString("base64", nonceAt, nonceAt + NONCE_BYTES)
  nonceAt += NONCE_BYTES
  return value
}

// ---- messages -------------------------------------------------------------------------------------

const message = (type: string, body: Buffer): Buffer => {
  const out = Buffer.allocUnsafe(5 + body.length)
  out[0] = type.charCodeAt(0)
  out.writeInt32BE(4 + body.length, 1)
  body.copy(out, 5)
  return out
}
const int32 = (n: number) => {
  const b = Buffer.allocUnsafe(4)
  b.writeInt32BE(n)
  return b
}
const cstring = (s: string) => Buffer.from(`${s}\0`)
const authentication = (code: number, data?: string | Buffer) =>
  message("R", Buffer.concat([int32(code), data === undefined ? Buffer.alloc(0) : Buffer.from(data)]))
const errorResponse = (code: string, text: string) =>
  message(
    "E",
    Buffer.concat([cstring("SFATAL"), cstring("VFATAL"), cstring(`C${code}`), cstring(`M${text}`), cstring("")])
  )

const SASL = authentication(10, Buffer.concat([cstring("SCRAM-SHA-256"), cstring("")]))
const NO_SSL = Buffer.from("N")
const READY = message("Z", Buffer.from("I"))
// What PostgreSQL 17 reports at login (and Tidepool passes on), encoded once.
const PARAMETERS = Buffer.concat(
  [
    ["application_name", ""],
    ["client_encoding", "UTF8"],
    ["DateStyle", "ISO, MDY"],
    ["default_transaction_read_only", "off"],
    ["in_hot_standby", "off"],
    ["integer_datetimes", "on"],
    ["IntervalStyle", "postgres"],
    ["is_superuser", "off"],
    ["scram_iterations", "4096"],
    ["server_encoding", "UTF8"],
    ["server_version", "17.10"],
    ["session_authorization", user],
    ["standard_conforming_strings", "on"],
    ["TimeZone", "UTC"]
  ].map(([name, value]) => message("S", Buffer.concat([cstring(name!), cstring(value!)])))
)
/** A canned answer: one row of int4 columns (`null` for NULL), CommandComplete, ReadyForQuery. */
const rows = (values: ReadonlyArray<string | null>): Buffer => {
  const columns = values.map((_, i) =>
    Buffer.concat([
      cstring(`c${i}`),
      int32(0),
      Buffer.from([0, 0]),
      int32(23),
      Buffer.from([0, 4]),
      int32(-1),
      Buffer.from([0, 0])
    ])
  )
  const row = values.map((value) =>
    value === null ? int32(-1) : Buffer.concat([int32(Buffer.byteLength(value)), Buffer.from(value)])
  )
  const count = Buffer.from([values.length >> 8, values.length & 0xff])
  return Buffer.concat([
    message("T", Buffer.concat([count, ...columns])),
    message("D", Buffer.concat([count, ...row])),
    message("C", cstring("SELECT 1")),
    READY
  ])
}
const SELECT_ONE = rows(["1"])
// pgbench's start-up question about pgbench_accounts' partitioning (pgbench 15: three columns;
// NULL partstrat = not partitioned): the only query the bench sends that wants more than one.
const PGBENCH_PARTITIONS = rows(["1", null, "0"])
const PARTSTRAT = Buffer.from("partstrat")

const UNKNOWN_USER = (name: string) => errorResponse("28000", `role "${name}" does not exist`)
const WRONG_PASSWORD = errorResponse("28P01", `password authentication failed for user "${user}"`)

// ---- one client -------------------------------------------------------------------------------------

const STARTUP = 0
const SASL_INITIAL = 1
const SASL_FINAL = 2
const READY_STATE = 3
const REFUSED = 4

let nextProcessId = 1

/** A client's state: the SCRAM fields live only until the login ends. */
class Client {
  socket: net.Socket
  state = STARTUP
  /** A message split across reads, gathered until whole (rare). */
  carry: Buffer | undefined = undefined
  nonce: string | undefined = undefined
  authPrefix: string | undefined = undefined

  constructor(socket: net.Socket) {
    this.socket = socket
    // Gone while holding a server: the server is not left in the client's transaction.
    if (servers.length > 0) socket.once("close", () => this.server?.orphan())
  }

  /** Handles every whole message in `chunk`, keeping a trailing partial one. */
  read(input: Buffer): void {
    let chunk = input
    if (this.carry !== undefined) {
      chunk = Buffer.concat([this.carry, input])
      this.carry = undefined
    }
    let at = 0
    while (at < chunk.length && this.state !== REFUSED) {
      if (this.state === STARTUP) {
        if (chunk.length - at < 4) break
        const length = chunk.readInt32BE(at)
        if (chunk.length - at < length) break
        this.startup(chunk, at + 4, at + length)
        at += length
        continue
      }
      if (this.state === READY_STATE && servers.length > 0) {
        // A logged-in client's whole messages go on together: one copy (the read buffer is shared
        // by every client), one write, as a relay forwards a read.
        const from = at
        let terminate = false
        while (chunk.length - at >= 5) {
          const length = chunk.readInt32BE(at + 1) + 1
          if (chunk.length - at < length) break
          if (chunk[at] === 0x58) {
            terminate = true
            break
          }
          at += length
        }
        if (at > from) this.forward(Buffer.from(chunk.subarray(from, at)))
        if (terminate) {
          this.socket.destroy()
          return
        }
        break
      }
      if (chunk.length - at < 5) break
      const length = chunk.readInt32BE(at + 1) + 1
      if (chunk.length - at < length) break
      this.message(chunk[at]!, chunk, at + 5, at + length)
      at += length
    }
    // A partial message is copied out: the read buffer is shared by every client.
    if (at < chunk.length && this.state !== REFUSED) this.carry = Buffer.from(chunk.subarray(at))
  }

  startup(chunk: Buffer, start: number, end: number): void {
    const code = chunk.readInt32BE(start)
    if (code === 80877103) {
      this.socket.write(NO_SSL)
      return
    }
    if (code !== 196608) {
      this.socket.destroy() // CancelRequest, GSS: nothing to do here
      return
    }
    let name = ""
    let at = start + 4
    while (at < end - 1) {
      const keyEnd = chunk.indexOf(0, at)
      const valueEnd = chunk.indexOf(0, keyEnd + 1)
      if (chunk.toString("latin1", at, keyEnd) === "user") name = chunk.toString("utf8", keyEnd + 1, valueEnd)
      at = valueEnd + 1
    }
    if (name !== user) {
      this.refuse(UNKNOWN_USER(name))
      return
    }
    this.state = SASL_INITIAL
    this.socket.write(SASL)
  }

  message(type: number, chunk: Buffer, start: number, end: number): void {
    if (type === 0x58) {
      this.socket.destroy() // Terminate
      return
    }
    if (this.state === READY_STATE) {
      if (type === 0x51) {
        const sql = chunk.subarray(start, end)
        this.socket.write(sql.indexOf(PARTSTRAT) >= 0 ? PGBENCH_PARTITIONS : SELECT_ONE)
      } else if (type === 0x53) this.socket.write(READY)
      return
    }
    if (type !== 0x70) {
      this.refuse(errorResponse("08P01", "expected a SASL response"))
      return
    }
    if (this.state === SASL_INITIAL) {
      // SASLInitialResponse: mechanism, int32 length, "n,,n=…,r=<client nonce>".
      const mechanismEnd = chunk.indexOf(0, start)
      const first = chunk.toString("utf8", mechanismEnd + 5, end)
      const bare = first.slice(first.indexOf(",", first.indexOf(",") + 1) + 1)
      const clientNonce = bare.slice(bare.indexOf("r=") + 2)
      this.nonce = clientNonce + nonce()
      const serverFirst = `r=${this.nonce}${serverFirstTail}`
      this.authPrefix = `${bare},${serverFirst},`
      this.state = SASL_FINAL
      this.socket.write(authentication(11, serverFirst))
      return
    }
    // SASLResponse: "c=biws,r=<nonce>,p=<proof>".
    const final = chunk.toString("utf8", start, end)
    const proofAt = final.lastIndexOf(",p=")
    const withoutProof = final.slice(0, proofAt)
    const authMessage = this.authPrefix + withoutProof
    const expected = `,r=${this.nonce}`
    this.nonce = undefined
    this.authPrefix = undefined
    const proof = Buffer.from(final.slice(proofAt + 3), "base64")
    if (proof.length !== 32 || !withoutProof.endsWith(expected)) {
      this.refuse(WRONG_PASSWORD)
      return
    }
    const signature = hmac(storedKey, authMessage)
    const presented = Buffer.allocUnsafe(32)
    for (let i = 0; i < 32; i++) presented[i] = proof[i]! ^ signature[i]!
    const proven = createHash("sha256").update(presented).digest()
    if (!timingSafeEqual(proven, storedKeyBytes)) {
      this.refuse(WRONG_PASSWORD)
      return
    }
    const serverSignature = hmac(serverKey, authMessage).toString("base64")
    const key = Buffer.allocUnsafe(13)
    key[0] = 0x4b
    key.writeInt32BE(12, 1)
    key.writeInt32BE(nextProcessId++ & 0x7fffffff, 5)
    randomFillSync(key, 9, 4)
    this.state = READY_STATE
    this.socket.write(
      Buffer.concat([authentication(12, `v=${serverSignature}`), authentication(0), PARAMETERS, key, READY])
    )
  }

  // ---- with an upstream: the pooled part ----

  /** The server this client's transaction runs on. */
  server: Server | undefined = undefined
  /** Messages that arrived while it waited for a server. */
  pending: Array<Buffer> | undefined = undefined

  forward(message: Buffer): void {
    if (this.server !== undefined) this.server.send(message)
    else if (this.pending !== undefined) this.pending.push(message)
    else {
      const free = idle.pop()
      if (free !== undefined) free.lend(this, message)
      else {
        this.pending = [message]
        waiting.push(this)
      }
    }
  }

  /** Stops reading; answers after the failure delay, as Tidepool does. */
  refuse(error: Buffer): void {
    this.state = REFUSED
    this.socket.pause()
    setTimeout(() => {
      this.socket.end(error)
    }, failureDelayMs)
  }
}

// ---- the upstream pool (FLOOR_UPSTREAM) ---------------------------------------------------------------

/** A server connection: lent to one client from its first message to ReadyForQuery 'I'. */
class Server {
  client: Client | undefined = undefined
  /** A request is out; its reply ends with a ReadyForQuery. */
  busy = false
  /** The last ReadyForQuery's transaction status. */
  status = 0x49
  closed = false
  /** The current message's header, while split across reads. */
  readonly header = Buffer.allocUnsafe(5)
  headerBytes = 0
  /** Bytes of the current message's body still to come. */
  bodyLeft = 0
  type = 0
  readonly socket: net.Socket

  constructor(socket: net.Socket) {
    this.socket = socket
    socket.on("close", () => {
      this.closed = true
      const at = idle.indexOf(this)
      if (at >= 0) idle.splice(at, 1)
      this.client?.socket.destroy()
    })
  }

  lend(client: Client, first: Buffer): void {
    this.client = client
    client.server = this
    this.send(first)
  }

  send(data: Buffer): void {
    this.busy = true
    this.socket.write(data)
  }

  /**
   * Passes the replies on (a copy: `bytes` is the shared read buffer's), watching for the
   * ReadyForQuery that frees the server.
   */
  read(bytes: Buffer): void {
    const client = this.client
    if (client !== undefined) client.socket.write(Buffer.from(bytes))
    let ready = false
    let at = 0
    while (at < bytes.length) {
      if (this.bodyLeft === 0) {
        while (this.headerBytes < 5 && at < bytes.length) this.header[this.headerBytes++] = bytes[at++]!
        if (this.headerBytes < 5) break
        this.headerBytes = 0
        this.type = this.header[0]!
        this.bodyLeft = this.header.readInt32BE(1) - 4
        ready = false
        continue
      }
      const n = Math.min(this.bodyLeft, bytes.length - at)
      // ReadyForQuery's body is its one status byte.
      if (this.type === 0x5a) {
        this.status = bytes[at]!
        ready = true
      }
      at += n
      this.bodyLeft -= n
    }
    if (!ready || this.bodyLeft > 0 || this.headerBytes > 0) return
    this.busy = false
    if (this.status === 0x49) this.release()
    else if (client === undefined || client.socket.destroyed) this.orphan()
  }

  /** Its client went away: a transaction it left open is rolled back before the server is lent again. */
  orphan(): void {
    if (this.client !== undefined) this.client.server = undefined
    this.client = undefined
    if (this.busy) return // its ReadyForQuery decides
    if (this.status === 0x49) this.release()
    else this.send(ROLLBACK)
  }

  release(): void {
    const client = this.client
    if (client !== undefined) client.server = undefined
    this.client = undefined
    if (this.closed) return
    let next = waiting.shift()
    while (next?.socket.destroyed) next = waiting.shift()
    if (next === undefined) {
      idle.push(this)
      return
    }
    const pending = next.pending!
    next.pending = undefined
    this.lend(next, pending.length === 1 ? pending[0]! : Buffer.concat(pending))
  }
}

const ROLLBACK = message("Q", cstring("ROLLBACK"))
const servers: Array<Server> = []
const idle: Array<Server> = []
const waiting: Array<Client> = []

const upstream = process.env.FLOOR_UPSTREAM
if (upstream !== undefined && upstream !== "") {
  const serverReads = Buffer.allocUnsafe(64 * 1024)
  for (let i = 0; i < Number(process.env.FLOOR_POOL ?? 10); i++) {
    // pg logs in (SCRAM) on a socket that reads into one shared buffer, as Tidepool's servers do;
    // until the login is over its reads are handed to pg as 'data' events, then to the Server.
    let server: Server | undefined
    const socket: net.Socket = new net.Socket({
      onread: {
        buffer: serverReads,
        callback: (n: number) => {
          if (server !== undefined) server.read(serverReads.subarray(0, n))
          else socket.emit("data", Buffer.from(serverReads.subarray(0, n)))
          return true
        }
      }
    } as net.SocketConstructorOpts)
    const connection = new pg.Client({ connectionString: upstream, stream: () => socket })
    connection.on("error", () => undefined)
    await connection.connect()
    server = new Server(socket)
    servers.push(server)
    idle.push(server)
  }
}

// ---- the listener -------------------------------------------------------------------------------------

const buffer = Buffer.allocUnsafe(64 * 1024)

function destroy(this: net.Socket): void {
  this.destroy()
}

const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (accepted) => {
  if (streamReads) {
    const client = new Client(accepted)
    accepted.on("data", (chunk: Buffer) => client.read(chunk))
    accepted.on("error", destroy)
    accepted.resume()
    return
  }
  // net.Server has no `onread` option: the accepted handle moves to a socket that reads into the
  // one shared buffer (as Tidepool's ClientSocket.takeOver and bench/relayFloor.ts do).
  const handle = (accepted as unknown as { _handle: unknown })._handle
  let client: Client | undefined
  const socket = new net.Socket({
    handle,
    onread: {
      buffer,
      callback: (bytes: number) => {
        client?.read(buffer.subarray(0, bytes))
        return true
      }
    }
  } as net.SocketConstructorOpts)
  ;(accepted as unknown as { _handle: unknown })._handle = null
  accepted.destroy()
  client = new Client(socket)
  socket.on("error", destroy)
})
server.listen({ port: Number(portArg), host: "127.0.0.1", backlog: 4096 })
process.on("SIGTERM", () => process.exit(0))
