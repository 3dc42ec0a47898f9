import * as http from "node:http"
import type { AddressInfo } from "node:net"
import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { tracesEndpoint } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { startTidepool, upstreamOf } from "../support/tidepool.ts"

interface OtlpValue {
  readonly stringValue?: string
  readonly intValue?: string | number
  readonly boolValue?: boolean
}
interface OtlpSpan {
  readonly name: string
  readonly traceId?: string
  readonly spanId?: string
  readonly parentSpanId?: string
  readonly attributes: ReadonlyArray<{ readonly key: string; readonly value: OtlpValue }>
  readonly status?: { readonly code?: number }
}

/** A real OTLP/HTTP (JSON) receiver: collects every span posted to /v1/traces. */
const startReceiver = async () => {
  const spans: Array<OtlpSpan> = []
  const server = http.createServer((req, res) => {
    const chunks: Array<Buffer> = []
    req.on("data", (c: Buffer) => chunks.push(c))
    req.on("end", () => {
      if (req.url === "/v1/traces") {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as {
          resourceSpans: Array<{ scopeSpans: Array<{ spans: Array<OtlpSpan> }> }>
        }
        for (const r of body.resourceSpans) for (const s of r.scopeSpans) spans.push(...s.spans)
      }
      res.writeHead(200, { "content-type": "application/json" }).end("{}")
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  return { spans, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, close: () => server.close() }
}

const attrs = (span: OtlpSpan): Record<string, string> =>
  Object.fromEntries(
    span.attributes.map((a) => [a.key, String(a.value.stringValue ?? a.value.intValue ?? a.value.boolValue ?? "")])
  )

let db: PostgresServer

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
})

afterAll(async () => {
  await db?.stop()
})

describe("tracing", () => {
  it("a client's W3C traceparent (options or application_name) parents its session span", async () => {
    const receiver = await startReceiver()
    const tidepool = await startTidepool({
      tenants: [{ external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }],
      tracing: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" }
    })
    const viaOptions = { trace: "4bf92f3577b34da6a3ce929d0e0e4736", span: "00f067aa0ba902b7" }
    const viaName = { trace: "0af7651916cd43dd8448eb211c80319c", span: "b7ad6b7169203331" }
    try {
      const connect = async (config: pg.ClientConfig) => {
        const c = new pg.Client({
          connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" }),
          ...config
        })
        await c.connect()
        await c.query("SELECT 1")
        await c.end()
      }
      await connect({ options: `-c traceparent=00-${viaOptions.trace}-${viaOptions.span}-01` })
      await connect({ application_name: `billing traceparent=00-${viaName.trace}-${viaName.span}-01` })
      await connect({})
    } finally {
      await tidepool.stop()
      receiver.close()
    }
    const sessions = receiver.spans.filter((s) => s.name === "client.session")
    const joined = (ids: { trace: string; span: string }) =>
      sessions.find((s) => s.traceId === ids.trace && s.parentSpanId === ids.span)
    expect(joined(viaOptions)).toBeDefined()
    expect(joined(viaName)).toBeDefined()
    // Its children stay in the client's trace.
    const auth = receiver.spans.filter((s) => s.name === "client.auth" && s.traceId === viaOptions.trace)
    expect(auth).toHaveLength(1)
    // Without one, the session is a root of its own trace.
    expect(sessions.filter((s) => s.parentSpanId === undefined || s.parentSpanId === "")).toHaveLength(1)
  })

  it("exports nothing unless an OTLP endpoint is configured", () => {
    expect(tracesEndpoint({})).toBeUndefined()
    expect(tracesEndpoint({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318/" })).toBe("http://c:4318/v1/traces")
    expect(tracesEndpoint({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318", OTEL_SDK_DISABLED: "true" })).toBeUndefined()
  })

  it("samples every Nth immediate checkout when TIDEPOOL_TRACE_CHECKOUT_EVERY is set", async () => {
    const receiver = await startReceiver()
    const tidepool = await startTidepool({
      tenants: [{ external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }],
      config: { traceCheckoutEvery: 2 },
      tracing: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" }
    })
    try {
      const client = new pg.Client({
        connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
      })
      await client.connect()
      // Warm: the first checkout waits for the pool's first server (a waited checkout, always traced).
      await client.query("SELECT 1")
      const before = await tidepool.runtime.runPromise(
        Effect.map(PoolRegistry, (r) => r.all()[0]!.counters.checkoutsWaited)
      )
      for (let i = 0; i < 6; i++) await client.query("SELECT 1")
      const after = await tidepool.runtime.runPromise(
        Effect.map(PoolRegistry, (r) => r.all()[0]!.counters.checkoutsWaited)
      )
      expect(after).toBe(before)
      await client.end()
    } finally {
      await tidepool.stop()
      receiver.close()
    }
    // No checkout waited after the warm one (asserted above), so every other pool.checkout span is a
    // sampled immediate one: the pool's own wait, 0, whatever the clock did before the span was made.
    const sampled = receiver.spans.filter(
      (s) =>
        s.name === "pool.checkout" && attrs(s)["tidepool.wait_ms"] === "0" && attrs(s)["tidepool.queue_length"] === "0"
    )
    expect(sampled.length).toBeGreaterThanOrEqual(3)
  })

  it("sends client.auth spans (a failed login with error status and code) and pool.checkout spans for waits", async () => {
    const receiver = await startReceiver()
    const tidepool = await startTidepool({
      tenants: [
        {
          external_id: "acme",
          ...upstreamOf(db),
          users: [{ db_user: "app", db_password: "app-secret", pool_size: 1 }]
        }
      ],
      tracing: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json" }
    })
    try {
      const url = (password: string) => tidepool.url({ user: "app.acme", password, mode: "transaction" })
      const a = new pg.Client({ connectionString: url("app-secret") })
      const b = new pg.Client({ connectionString: url("app-secret") })
      await a.connect()
      await b.connect()
      await a.query("BEGIN")
      const waiting = b.query("SELECT 1")
      const waiters = () =>
        tidepool.runtime.runPromise(Effect.map(PoolRegistry, (r) => r.all().reduce((n, p) => n + p.stats.waiting, 0)))
      while ((await waiters()) === 0) await new Promise(setImmediate)
      await a.query("COMMIT")
      await waiting
      await Promise.all([a.end(), b.end()])
      const wrong = new pg.Client({ connectionString: url("wrong") })
      await expect(wrong.connect()).rejects.toMatchObject({ code: "28P01" })
    } finally {
      await tidepool.stop() // flushes the exporter
      receiver.close()
    }

    const auth = receiver.spans.filter((s) => s.name === "client.auth")
    const ok = auth.filter((s) => attrs(s)["tidepool.outcome"] === "ok")
    expect(ok).toHaveLength(2)
    expect(attrs(ok[0]!)).toMatchObject({ "tidepool.tenant": "acme", "db.user": "app", method: "scram-sha-256" })
    const failed = auth.filter((s) => attrs(s)["tidepool.outcome"] === "fail")
    expect(failed).toHaveLength(1)
    expect(attrs(failed[0]!)["error.code"]).toBe("EWRONGPASSWORD")
    expect(failed[0]!.status?.code).toBe(2) // STATUS_CODE_ERROR

    const checkouts = receiver.spans.filter((s) => s.name === "pool.checkout")
    expect(checkouts.length).toBeGreaterThanOrEqual(1)
    expect(attrs(checkouts[0]!)).toMatchObject({
      "tidepool.tenant": "acme",
      "db.user": "app",
      "tidepool.mode": "transaction",
      "tidepool.outcome": "ok"
    })
    expect(Number(attrs(checkouts[0]!)["tidepool.wait_ms"])).toBeGreaterThanOrEqual(0)
    expect(receiver.spans.some((s) => s.name === "client.session")).toBe(true)
    const connects = receiver.spans.filter((s) => s.name === "upstream.connect")
    expect(connects.length).toBeGreaterThanOrEqual(1)
    expect(attrs(connects[0]!)).toMatchObject({
      "db.host": db.host,
      "db.port": String(db.port),
      "db.user": "app",
      "tidepool.login_method": "scram-sha-256",
      "tidepool.outcome": "ok"
    })
  })
})
