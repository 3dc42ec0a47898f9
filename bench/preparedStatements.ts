/**
 * The prepared-statement layer alone, without sockets, PostgreSQL or other load: the CPU time and
 * the garbage collections per `pgbench -S` transaction of `PreparedStatements` (client bytes
 * rewritten, server replies followed and forwarded, the server released and lent again), for
 * `-M prepared` (named Bind/Execute/Sync) and `-M extended` (unnamed Parse/Bind/Describe/Execute/Sync).
 * The end-to-end benchmark (`npm run bench`) cannot resolve a few per cent on a shared machine;
 * this can, and a minor GC count that grows with the transactions shows an allocation per message.
 *
 * Run as `node --import tsx bench/preparedStatements.ts [TRANSACTIONS] [prepared|extended]`;
 * prints one JSON line per protocol. Compare two checkouts by running it in each, interleaved.
 */
import { EventEmitter } from "node:events"
import type * as net from "node:net"
import { GCProfiler } from "node:v8"
import { serialize } from "pg-protocol"
import { TenantPool } from "../src/pool/index.ts"
import { readyForQuery } from "../src/protocol/index.ts"
import { defaultPreparedStatementOptions, PreparedStatements } from "../src/session/PreparedStatements.ts"
import { ServerConnection } from "../src/upstream/index.ts"

/** A socket that accepts every write at once: only the layer's own work is measured. */
class NullSocket extends EventEmitter {
  writable = true
  write(_data: Buffer): boolean {
    return true
  }
  cork(): void {}
  uncork(): void {}
}

const frame = (type: string, body: Buffer = Buffer.alloc(0)): Buffer => {
  const buf = Buffer.allocUnsafe(5 + body.length)
  buf[0] = type.charCodeAt(0)
  buf.writeInt32BE(body.length + 4, 1)
  body.copy(buf, 5)
  return buf
}

const SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
const row = frame("D", Buffer.from([0, 1, 0, 0, 0, 1, 0x30]))
const complete = frame("C", Buffer.from("SELECT 1\0"))
const rowDescription = frame("T", Buffer.concat([Buffer.from([0, 1]), Buffer.from("abalance\0"), Buffer.alloc(18)]))

const workloads = {
  prepared: {
    setup: Buffer.concat([serialize.parse({ name: "P0_1", text: SQL, types: [] }), serialize.sync()]),
    setupReply: Buffer.concat([frame("1"), readyForQuery("I")]),
    request: Buffer.concat([
      serialize.bind({ statement: "P0_1", values: ["42"] }),
      serialize.execute(),
      serialize.sync()
    ]),
    reply: Buffer.concat([frame("2"), row, complete, readyForQuery("I")])
  },
  extended: {
    setup: undefined,
    setupReply: undefined,
    request: Buffer.concat([
      serialize.parse({ text: SQL, types: [] }),
      serialize.bind({ values: ["42"] }),
      serialize.describe({ type: "P" }),
      serialize.execute(),
      serialize.sync()
    ]),
    reply: Buffer.concat([frame("1"), frame("2"), rowDescription, row, complete, readyForQuery("I")])
  }
} as const

const pool = new TenantPool(
  {
    key: "k",
    tenant: "t",
    user: "u",
    database: "db",
    mode: "transaction",
    size: 1,
    maxClients: 1,
    checkoutTimeoutMs: 1000,
    serverIdleTimeoutMs: 0,
    minSize: 0,
    serverLifetimeMs: 0,
    connectBackoffMs: 1000,
    target: { host: "127.0.0.1", port: 1, database: "db", user: "u", password: undefined, connectTimeoutMs: 1000 }
  },
  () => {}
)

const run = (name: keyof typeof workloads, transactions: number) => {
  const work = workloads[name]
  const client = new NullSocket() as unknown as net.Socket
  const serverSocket = new NullSocket() as unknown as net.Socket
  const statements = new PreparedStatements(client, pool, defaultPreparedStatementOptions)
  const server = new ServerConnection(serverSocket, pool.settings.target)
  server.handler = { onData: (chunk) => statements.forward(server, chunk), onClose: () => {} }
  const transaction = () => {
    statements.attach(server)
    statements.write(server, work.request)
    serverSocket.emit("data", work.reply)
    statements.settleAfter(server)
    statements.detach(server)
  }
  if (work.setup !== undefined) {
    statements.attach(server)
    statements.write(server, work.setup)
    serverSocket.emit("data", work.setupReply)
    statements.detach(server)
  }
  for (let i = 0; i < 20_000; i++) transaction() // warm-up: optimised code, a ring as large as needed
  const profiler = new GCProfiler()
  profiler.start()
  const before = process.cpuUsage()
  for (let i = 0; i < transactions; i++) transaction()
  const used = process.cpuUsage(before)
  const scavenges = profiler.stop().statistics.filter((gc) => gc.gcType === "Scavenge").length
  return {
    protocol: name,
    transactions,
    cpuNsPerTx: Math.round(((used.user + used.system) * 1000) / transactions),
    minorGcsPer100kTx: Math.round((scavenges * 100_000) / transactions)
  }
}

const transactions = Number(process.argv[2] ?? 500_000)
const only = process.argv[3] as keyof typeof workloads | undefined
for (const name of only === undefined ? (["prepared", "extended"] as const) : [only]) {
  console.log(JSON.stringify(run(name, transactions)))
}
