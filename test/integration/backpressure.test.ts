import { createHash } from "node:crypto"
import * as net from "node:net"
import { Effect } from "effect"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { ScramClient, startupMessage } from "../../src/protocol/index.ts"
import { SessionRegistry } from "../../src/session/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient as Raw, type RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/*
 * The relays read into reused buffers (src/upstream/ReadBuffer.ts): a chunk is kept past its read
 * only when a write could not finish at once. These tests make writes queue in both directions —
 * more bytes than the kernel's socket buffers hold, towards a peer that is not reading — and check
 * every byte that comes out, so a chunk overwritten by a later read cannot go unnoticed.
 */

let db: PostgresServer
let tidepool: RunningTidepool

const PASSWORD = "app-secret"
/** About 25 MB of DataRows: far more than loopback socket buffers hold. */
const ROWS = 400_000

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  await db.query("CREATE TABLE locked (id int PRIMARY KEY)")
  await db.query("INSERT INTO locked VALUES (1)")
  tidepool = await startTidepool({
    tenants: [
      { external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: PASSWORD, pool_size: 3 }] }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const md5 = (text: string) => createHash("md5").update(text).digest("hex")

/** Text columns of a DataRow. */
const columns = (body: Buffer): Array<string> => {
  const out: Array<string> = []
  let pos = 2
  for (let i = body.readInt16BE(0); i > 0; i--) {
    const length = body.readInt32BE(pos)
    out.push(body.toString("utf8", pos + 4, pos + 4 + length))
    pos += 4 + length
  }
  return out
}

/** Resolves with the count of rows of the next reply (up to its ReadyForQuery); rejects at the first row `check` refuses. */
const rowsOf = (client: RawClient, check: (row: Array<string>, index: number) => string | undefined) =>
  new Promise<number>((resolve, reject) => {
    let rows = 0
    client.onMessage = (m) => {
      const problem = m.type === "D" ? check(columns(m.body), rows++) : undefined
      if (problem !== undefined) {
        client.onMessage = () => {}
        reject(new Error(problem))
      } else if (m.type === "E") reject(new Error(m.body.toString("latin1")))
      else if (m.type === "Z") {
        client.onMessage = undefined
        resolve(rows)
      }
    }
  })

/** Whether some server socket of the mode's pools is in the state `test` looks for. */
const someServer = (mode: "transaction" | "session", test: (socket: net.Socket) => boolean) =>
  tidepool.runtime.runPromise(
    Effect.map(PoolRegistry, (registry) =>
      registry
        .all()
        .filter((pool) => pool.settings.mode === mode)
        .some((pool) => pool.servers().some(({ server }) => test(server.socket)))
    )
  )

describe.each(["transaction", "session"] as const)("backpressure (%s mode)", (mode) => {
  const port = () => (mode === "transaction" ? tidepool.transactionPort : tidepool.sessionPort)

  it("a client that stops reading still gets every row of a large result intact", async () => {
    const client = await Raw.connect(port(), "app.acme", PASSWORD)
    client.socket.pause()
    client.write(serialize.query(`SELECT i, md5(i::text) FROM generate_series(1, ${ROWS}) i`))
    // The pooler's writes to this client queue up until it stops reading the server.
    // (The relay stops reading a server whose client is full.)
    await vi.waitFor(async () => expect(await someServer(mode, (s) => s.isPaused())).toBe(true), {
      timeout: 20_000,
      interval: 20
    })
    const rows = rowsOf(client, (row, index) =>
      row[0] === String(index + 1) && row[1] === md5(String(index + 1))
        ? undefined
        : `row ${index + 1} arrived as ${JSON.stringify(row)}`
    )
    client.socket.resume()
    expect(await rows).toBe(ROWS)
    client.close()
  })

  it("queries a client sends faster than a blocked server reads arrive intact", async () => {
    const holder = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: PASSWORD, mode }) })
    await holder.connect()
    await holder.query("BEGIN")
    await holder.query("SELECT * FROM locked FOR UPDATE")
    const client = await Raw.connect(port(), "app.acme", PASSWORD)
    // A query that waits for the lock, then thousands more behind it: its server reads none of them
    // until the lock is released, so the pooler's writes to it queue.
    const count = 20_000
    const payload = "x".repeat(1000)
    const batch = [serialize.query("UPDATE locked SET id = 1 WHERE id = 1")]
    for (let i = 1; i <= count; i++) batch.push(serialize.query(`SELECT ${i}, '${payload}${md5(String(i))}'`))
    const results: Array<Array<string>> = []
    let ready = 0
    const done = new Promise<void>((resolve, reject) => {
      client.onMessage = (m) => {
        if (m.type === "D") results.push(columns(m.body))
        else if (m.type === "E") reject(new Error(m.body.toString("latin1")))
        else if (m.type === "Z" && ++ready === count + 1) resolve()
      }
    })
    client.write(Buffer.concat(batch))
    // The pooler has bytes of this client queued for the server.
    await vi.waitFor(async () => expect(await someServer(mode, (s) => s.writableLength > 0)).toBe(true), {
      timeout: 20_000,
      interval: 20
    })
    await holder.query("COMMIT")
    await done
    expect(results).toHaveLength(count)
    results.forEach((row, index) => {
      const i = String(index + 1)
      if (row[0] !== i || row[1] !== `${payload}${md5(i)}`) throw new Error(`reply ${i} arrived as ${row[0]}`)
    })
    client.close()
    await holder.end()
  })
})

describe("handing the client to the relay", () => {
  const sessions = () =>
    tidepool.runtime.runPromise(Effect.map(SessionRegistry, (registry) => registry.countOf("acme")))

  it.each([
    ["sends Terminate and closes", true],
    ["closes without Terminate", false]
  ] as const)("a client that %s right behind its last login message leaves no session behind", async (_, terminate) => {
    for (const mode of ["transaction", "session"] as const) {
      const socket = net.connect(mode === "transaction" ? tidepool.transactionPort : tidepool.sessionPort, "127.0.0.1")
      await new Promise((resolve) => socket.once("connect", resolve))
      socket.on("error", () => {})
      socket.write(startupMessage({ user: "app.acme", database: "postgres" }))
      const scram = new ScramClient({ password: PASSWORD })
      let buffered = Buffer.alloc(0)
      const closed = new Promise((resolve) => socket.once("close", resolve))
      socket.on("data", (chunk: Buffer) => {
        buffered = Buffer.concat([buffered, chunk])
        while (buffered.length >= 5 && buffered.length >= 1 + buffered.readInt32BE(1)) {
          const type = buffered[0]
          const body = buffered.subarray(5, 1 + buffered.readInt32BE(1))
          buffered = buffered.subarray(1 + buffered.readInt32BE(1))
          if (type !== 0x52) continue
          const code = body.readInt32BE(0)
          if (code === 10) {
            socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
          } else if (code === 11) {
            // The last login message and the goodbye in one go, before any answer.
            const final = serialize.sendSCRAMClientFinalMessage(scram.handleServerFirst(body.subarray(4)) as string)
            socket.end(terminate ? Buffer.concat([final, serialize.end()]) : final)
          }
        }
      })
      await closed
    }
    await vi.waitFor(async () => expect(await sessions()).toBe(0), { timeout: 10_000, interval: 20 })
  })
})
