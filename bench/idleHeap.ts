/**
 * `node --import tsx bench/idleHeap.ts [--idle N] [--mode transaction|session] [--build dist|tsx] [--dir CHECKOUT]`:
 * the JavaScript heap one idle authenticated client keeps in Tidepool, by constructor.
 *
 * Starts PostgreSQL and one Tidepool (compiled by default, as bench/tidepool.ts runs it) with
 * `--heapsnapshot-signal`, warms it up (logins and queries, so lazily built state and compiled code
 * are there before the first snapshot), takes a heap snapshot (V8 collects garbage first), logs in
 * N idle clients with the lean client, takes another, and prints what grew, divided by N. Exact
 * (the snapshot counts live objects), so unlike RSS it does not move with the machine's load. This
 * is how docs/login-path.md's per-client tables were made. `--queried`: each client runs one query
 * before the second snapshot (what a client that has been used and then idles keeps).
 */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { parseArgs } from "node:util"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Effect } from "effect"
import { startPostgres } from "../test/support/postgres.ts"
import { LeanClient, ScramKeyCache } from "./leanClient.ts"
import type { PoolMode } from "./options.ts"
import { type BenchError, scopedTempDir } from "./process.ts"
import { type BuildMode, startTidepool } from "./tidepool.ts"

const { values } = parseArgs({
  options: {
    idle: { type: "string" },
    mode: { type: "string" },
    build: { type: "string" },
    dir: { type: "string" },
    top: { type: "string" },
    queried: { type: "boolean" },
    hold: { type: "string" },
    "rss-only": { type: "boolean" },
    node: { type: "string" },
    settle: { type: "string" },
    "node-flag": { type: "string", multiple: true }
  }
})
const idle = Number(values.idle ?? 2000)
const mode = (values.mode ?? "transaction") as PoolMode
const build = (values.build ?? "dist") as BuildMode
const top = Number(values.top ?? 30)

interface Snapshot {
  readonly snapshot: { readonly meta: { readonly node_fields: Array<string>; readonly node_types: [Array<string>] } }
  readonly nodes: Array<number>
  readonly strings: Array<string>
}

/** Bytes and counts by constructor (objects, closures, native) or by kind (strings, arrays, code…). */
const byConstructor = (heap: Snapshot) => {
  const fields = heap.snapshot.meta.node_fields
  const types = heap.snapshot.meta.node_types[0]
  const width = fields.length
  const typeAt = fields.indexOf("type")
  const nameAt = fields.indexOf("name")
  const sizeAt = fields.indexOf("self_size")
  const totals = new Map<string, { bytes: number; count: number }>()
  for (let i = 0; i < heap.nodes.length; i += width) {
    const type = types[heap.nodes[i + typeAt]!]!
    const key =
      type === "object" || type === "closure" || type === "native"
        ? `${heap.strings[heap.nodes[i + nameAt]!]} (${type})`
        : `(${type})`
    const entry = totals.get(key) ?? { bytes: 0, count: 0 }
    entry.bytes += heap.nodes[i + sizeAt]!
    entry.count++
    totals.set(key, entry)
  }
  return totals
}

/** Sends SIGUSR2 and waits for the snapshot file it writes to be complete. */
const snapshot = async (pid: number, dir: string): Promise<Snapshot> => {
  const before = new Set(await fs.readdir(dir))
  process.kill(pid, "SIGUSR2")
  const deadline = Date.now() + 300_000
  while (Date.now() < deadline) {
    const fresh = (await fs.readdir(dir)).filter((name) => name.endsWith(".heapsnapshot") && !before.has(name))
    if (fresh.length > 0) {
      const file = path.join(dir, fresh[0]!)
      try {
        // Written in one go by the process; complete once it parses.
        return JSON.parse(await fs.readFile(file, "utf8")) as Snapshot
      } catch {
        // still being written
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 250))
  }
  throw new Error("no heap snapshot within 300 s")
}

const rssKb = async (pid: number): Promise<number> =>
  Number((await fs.readFile(`/proc/${pid}/status`, "utf8")).match(/VmRSS:\s+(\d+)/)?.[1] ?? Number.NaN)

/** Resident kB by kind of mapping: malloc's main heap (`[heap]`), other anonymous memory (V8's heap, malloc arenas), files. */
const rssByKind = async (pid: number) => {
  const kinds = { heap: 0, anonymous: 0, files: 0 }
  let kind: keyof typeof kinds = "anonymous"
  for (const line of (await fs.readFile(`/proc/${pid}/smaps`, "utf8")).split("\n")) {
    const header = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line)
    if (header !== null) {
      const name = header[1]!
      kind = name === "[heap]" ? "heap" : name === "" || name.startsWith("[") ? "anonymous" : "files"
    } else if (line.startsWith("Rss:")) kinds[kind] += Number(line.split(/\s+/)[1])
  }
  return kinds
}

const program = Effect.gen(function* () {
  const dir = yield* scopedTempDir("tidepool-idle-heap-")
  const server = yield* Effect.acquireRelease(
    Effect.promise(() =>
      startPostgres({ roles: [{ name: "bench", password: "bench" }], databases: ["bench"], settings: {} })
    ),
    (server) => Effect.promise(() => server.stop())
  )
  const upstream = { host: server.host, port: server.port, user: "bench", password: "bench", database: "bench" }
  const tidepool = yield* startTidepool({
    upstream,
    tenant: "bench",
    poolSize: 5,
    maxClients: idle + 200,
    mode: mode === "session" ? "session" : "transaction",
    build,
    ...(values.dir === undefined ? {} : { dir: path.resolve(values.dir) }),
    ...(values.node === undefined ? {} : { node: values.node }),
    env: { TIDEPOOL_MAX_CLIENT_CONNECTIONS: String(idle + 200) },
    nodeFlags: ["--heapsnapshot-signal=SIGUSR2", `--diagnostic-dir=${dir}`, ...(values["node-flag"] ?? [])]
  })
  const target = { ...tidepool.endpoint }
  const keys = new ScramKeyCache()
  const source = (i: number) => `127.${1 + Math.floor(i / 62_500)}.${1 + (Math.floor(i / 250) % 250)}.${1 + (i % 250)}`
  yield* Effect.promise(async () => {
    // Warm-up: logins, a query each, gone again.
    for (let round = 0; round < 4; round++) {
      const warm = await Promise.all(
        Array.from({ length: 50 }, (_, i) => LeanClient.login(target, keys, source(50_000 + round * 50 + i)))
      )
      await Promise.all(warm.map((client) => client.query("select 1")))
      for (const client of warm) client.terminate()
    }
  })
  // --rss-only: no snapshots (their writer's own memory stays in the process's malloc heap).
  const snapshots = values["rss-only"] !== true
  const none = new Map<string, { bytes: number; count: number }>()
  const a = snapshots ? byConstructor(yield* Effect.promise(() => snapshot(tidepool.pid, dir))) : none
  // --settle: the same quiet time before the first login as after the last.
  if (Number(values.settle ?? 0) > 3)
    yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, Number(values.settle) * 1000)))
  const rssBefore = yield* Effect.promise(() => rssKb(tidepool.pid))
  const kindsBefore = yield* Effect.promise(() => rssByKind(tidepool.pid))
  const clients = yield* Effect.promise(async () => {
    const out: Array<LeanClient> = []
    for (let i = 0; i < idle; i += 64) {
      const batch = await Promise.all(
        Array.from({ length: Math.min(64, idle - i) }, (_, j) => LeanClient.login(target, keys, source(i + j)))
      )
      // --queried: each ran one query first (its relay has built what a first checkout builds).
      if (values.queried === true) await Promise.all(batch.map((client) => client.query("select 1")))
      out.push(...batch)
    }
    return out
  })
  // Resident memory with the clients' garbage still around (as the --connect figure), then after
  // the full collection a heap snapshot makes.
  yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 3000)))
  const rssIdle = yield* Effect.promise(() => rssKb(tidepool.pid))
  // --settle S: resident memory S s after the last login too, once the pooler has had its quiet
  // time (src/telemetry/MemoryReclaim.ts gives a burst's memory back a few seconds after it ends).
  const settleS = Number(values.settle ?? 0)
  if (settleS > 3) yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, (settleS - 3) * 1000)))
  const rssSettled = yield* Effect.promise(() => rssKb(tidepool.pid))
  const b = snapshots ? byConstructor(yield* Effect.promise(() => snapshot(tidepool.pid, dir))) : none
  const rssCollected = yield* Effect.promise(() => rssKb(tidepool.pid))
  const kindsAfter = yield* Effect.promise(() => rssByKind(tidepool.pid))
  const rows = [...new Set([...a.keys(), ...b.keys()])]
    .map((key) => {
      const x = a.get(key) ?? { bytes: 0, count: 0 }
      const y = b.get(key) ?? { bytes: 0, count: 0 }
      return { key, bytes: (y.bytes - x.bytes) / clients.length, count: (y.count - x.count) / clients.length }
    })
    .sort((p, q) => q.bytes - p.bytes)
  const total = rows.reduce((sum, row) => sum + row.bytes, 0)
  const lines = [
    `JS heap per idle ${mode}-mode client (${clients.length} clients, ${build}${values.queried === true ? ", each after one query" : ""}): ${total.toFixed(0)} bytes`,
    `RSS per client: ${(((rssIdle - rssBefore) * 1024) / clients.length).toFixed(0)} bytes 3 s after the last login, ` +
      (settleS > 3 ? `${(((rssSettled - rssBefore) * 1024) / clients.length).toFixed(0)} ${settleS} s after, ` : "") +
      `${(((rssCollected - rssBefore) * 1024) / clients.length).toFixed(0)} after a full collection (the second snapshot's): ` +
      (["heap", "anonymous", "files"] as const)
        .map((kind) => `${kind} ${(((kindsAfter[kind] - kindsBefore[kind]) * 1024) / clients.length).toFixed(0)}`)
        .join(", "),
    "",
    "| what | bytes per client | objects per client |",
    "| --- | ---: | ---: |",
    ...rows.slice(0, top).map((row) => `| ${row.key} | ${row.bytes.toFixed(0)} | ${row.count.toFixed(2)} |`)
  ]
  process.stdout.write(`${lines.join("\n")}\n`)
  // --hold S: the clients stay S seconds more, for a look at the process (gdb, heaptrack).
  if (values.hold !== undefined) {
    process.stdout.write(`holding ${clients.length} idle clients on pid ${tidepool.pid} for ${values.hold} s\n`)
    yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, Number(values.hold) * 1000)))
  }
  for (const client of clients) client.terminate()
}).pipe(
  Effect.scoped,
  Effect.catchTag("BenchError", (error: BenchError) =>
    Effect.sync(() => {
      process.stderr.write(`bench: ${error.message}\n`)
      process.exitCode = 1
    })
  )
)

NodeRuntime.runMain(program)
