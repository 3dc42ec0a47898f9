import { readdirSync, readFileSync, statSync } from "node:fs"
import { join } from "node:path"
import { Effect, Layer } from "effect"
import { describe, expect, it } from "vitest"
import { parse } from "yaml"
import { AppConfig } from "../../src/config/index.ts"
import { PoolRegistry } from "../../src/pool/index.ts"
import { EventCounters, Metrics } from "../../src/telemetry/index.ts"
import { TenantRegistry } from "../../src/tenants/index.ts"
import { parseExposition } from "../support/prometheus.ts"
import { run } from "../support/tools.ts"

const root = new URL("../../", import.meta.url).pathname

const filesUnder = (dir: string): Array<string> =>
  readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    return statSync(path).isDirectory() ? filesUnder(path) : [path]
  })

const otelFiles = filesUnder(join(root, "otel"))
const dashboard = JSON.parse(readFileSync(join(root, "otel/grafana/dashboards/tidepool.json"), "utf8")) as {
  panels: Array<{
    title: string
    targets: Array<{ expr: string; datasource: { uid: string } }>
    links?: Array<{ url: string }>
  }>
}

/** The metric families the Metrics module declares, with no pools (every family is declared anyway). */
const renderedFamilies = () =>
  Effect.runPromise(
    Effect.map(Metrics, (m) => parseExposition(m.render()).types).pipe(
      Effect.provide(
        Metrics.layer.pipe(
          Layer.provideMerge(PoolRegistry.layer),
          Layer.provideMerge(EventCounters.layer),
          Layer.provideMerge(TenantRegistry.fromTenants([])),
          Layer.provideMerge(AppConfig.layerFrom())
        )
      ),
      Effect.scoped
    )
  )

const composePresent = await run("docker", ["compose", "version"]).then(
  () => true,
  () => false
)
if (!composePresent)
  console.log("otel.test: the docker compose plugin is missing, so `docker compose config` is skipped")

describe("otel/ and docker-compose.yml", () => {
  it("every YAML and JSON file under otel/ parses", () => {
    const checked = otelFiles.filter((f) => /\.(ya?ml|json)$/.test(f))
    expect(checked.length).toBeGreaterThanOrEqual(5)
    for (const file of checked) {
      const text = readFileSync(file, "utf8")
      const value = file.endsWith(".json") ? JSON.parse(text) : parse(text, { strict: true, uniqueKeys: true })
      expect(value, file).toBeTypeOf("object")
    }
    expect(parse(readFileSync(join(root, "docker-compose.yml"), "utf8"), { strict: true })).toHaveProperty("services")
  })

  it("the dashboard's queries name metrics the Metrics module renders", async () => {
    const families = await renderedFamilies()
    const exprs = dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr))
    expect(exprs.length).toBeGreaterThan(10)
    const named = new Set(
      exprs.flatMap((e) => [...e.matchAll(/\b((?:tidepool|nodejs|process)_[a-z0-9_]+)/g)].map((m) => m[1]!))
    )
    const missing = [...named].filter((name) => {
      if (families.has(name)) return false
      const family = name.replace(/_(bucket|sum|count)$/, "")
      return families.get(family) !== "histogram"
    })
    expect(missing).toEqual([])
    // Quantiles only over histograms, rates only over counters.
    for (const e of exprs) {
      for (const m of e.matchAll(/rate\(((?:tidepool|process)_[a-z0-9_]+)/g)) {
        const name = m[1]!
        const type = families.get(name) ?? families.get(name.replace(/_bucket$/, ""))
        expect(type === "counter" || (name.endsWith("_bucket") && type === "histogram"), name).toBe(true)
      }
    }
  })

  it("dashboard data sources exist in the provisioning, and latency panels link to traces", () => {
    const sources = parse(
      readFileSync(join(root, "otel/grafana/provisioning/datasources/datasources.yaml"), "utf8")
    ) as {
      datasources: Array<{ uid: string; type: string }>
    }
    const uids = new Set(sources.datasources.map((d) => d.uid))
    expect([...uids].sort()).toEqual(["jaeger", "prometheus"])
    for (const panel of dashboard.panels) for (const t of panel.targets) expect(uids.has(t.datasource.uid)).toBe(true)
    const latency = dashboard.panels.filter((p) => p.targets.some((t) => t.expr.includes("histogram_quantile")))
    expect(latency.length).toBeGreaterThanOrEqual(2)
    for (const panel of latency) expect(panel.links?.some((l) => l.url.includes('"datasource":"jaeger"'))).toBe(true)
  })

  it.skipIf(!composePresent)("docker compose config validates docker-compose.yml", async () => {
    await run("docker", ["compose", "-f", join(root, "docker-compose.yml"), "config", "--quiet"])
  })
})
