import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/**
 * A client still sending when Tidepool ends its connection with an error (an oversized message
 * streamed in full) must receive that error: closing a socket with unread bytes makes the kernel
 * send a reset, and a reset makes the client's kernel drop what it had not read yet, the error
 * included. Tidepool half-closes and reads the rest away, as PostgreSQL's clients expect.
 */
let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: [{ external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }],
    config: { maxMessageSize: 4096 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const errorCode = (body: Buffer): string | undefined => {
  let at = 0
  while (at < body.length && body[at] !== 0) {
    const end = body.indexOf(0, at + 1)
    if (body[at] === 0x4d) return /^\((E[A-Z]+)\)/.exec(body.toString("utf8", at + 1, end))?.[1]
    at = end + 1
  }
  return undefined
}

describe("an error sent while the client is still sending", () => {
  for (const port of ["sessionPort", "transactionPort"] as const) {
    it(`reaches the client whole (${port})`, async () => {
      for (let round = 0; round < 5; round++) {
        const client = await RawClient.connect(tidepool[port], "app.acme", "app-secret")
        // A Query of 8 MB, sent in full: Tidepool refuses it at its header and closes.
        const size = 8 * 1024 * 1024
        const message = Buffer.alloc(1 + size, 0x20)
        message[0] = 0x51
        message.writeInt32BE(size, 1)
        // As a blocking client does: nothing is read until the whole message is written.
        client.socket.pause()
        await new Promise<void>((resolve) => client.socket.write(message, () => resolve()))
        client.socket.resume()
        const reply = await client.next().catch((e: Error) => e)
        expect(reply instanceof Error ? `lost: ${reply.message}` : errorCode(reply.body)).toBe("EMESSAGETOOLARGE")
        client.socket.destroy()
      }
    })
  }
})
