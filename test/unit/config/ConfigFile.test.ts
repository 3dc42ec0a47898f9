import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "@effect/vitest"
import { ConfigProvider, Effect, Layer, Option, Redacted } from "effect"
import { AppConfig, checkConfigFile, loadConfigFile, parseConfig } from "../../../src/config/index.ts"

const dir = mkdtempSync(join(tmpdir(), "tidepool-config-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const write = (name: string, text: string): string => {
  const path = join(dir, name)
  writeFileSync(path, text)
  return path
}

const env = (entries: Record<string, string>) => ConfigProvider.fromEnv({ env: entries, preserveEmptyStrings: true })

const exampleYaml = `
server:
  port: 4100
  log_level: debug
  shutdown_timeout: 1000
tenants:
  - external_id: acme
    db_host: 127.0.0.1
    db_port: 5432
    db_database: app
    default_pool_size: 15
    users:
      - db_user: app
        db_password: secret
        pool_size: 10
        max_clients: 500
`

const exampleJson = JSON.stringify(
  {
    server: { port: 4100, log_level: "debug", shutdown_timeout: 1000 },
    tenants: [
      {
        external_id: "acme",
        db_host: "127.0.0.1",
        db_port: 5432,
        db_database: "app",
        default_pool_size: 15,
        users: [{ db_user: "app", db_password: "secret", pool_size: 10, max_clients: 500 }]
      }
    ]
  },
  null,
  2
)

describe("ConfigFile", () => {
  it.effect("loads YAML and JSON to the same contents", () =>
    Effect.gen(function* () {
      const fromYaml = yield* loadConfigFile(write("a.yaml", exampleYaml))
      const fromJson = yield* loadConfigFile(write("a.json", exampleJson))
      // An unknown extension is read as YAML, which also reads JSON.
      const fromOther = yield* loadConfigFile(write("a.conf", exampleJson))
      expect(fromYaml.tenants).toHaveLength(1)
      expect(fromYaml.tenants[0].users[0]).toMatchObject({ db_user: "app", pool_size: 10, max_clients: 500 })
      expect(Redacted.value(fromYaml.tenants[0].users[0].db_password)).toBe("secret")
      expect(fromYaml.server).toEqual({ port: 4100, log_level: "debug", shutdown_timeout: 1000 })
      expect(fromJson.tenants).toEqual(fromYaml.tenants)
      expect(fromJson.server).toEqual(fromYaml.server)
      expect(fromOther.tenants).toEqual(fromYaml.tenants)
      expect(fromJson.file).toEqual(Option.some(join(dir, "a.json")))
    })
  )

  it.effect("reports every mistake with its path, value and line", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        parseConfig(
          `server:
  port: abc
  log_levle: debug
tenants:
  - external_id: acme
    db_host: 127.0.0.1
    db_port: "abc"
    db_database: app
    require_user: false
    users:
      - db_user: app
        db_password: secret
        pool_size: 0
  - external_id: acme
    db_port: 5432
    db_database: app
    users: []
`,
          "tidepool.yaml"
        )
      )
      const lines = error.message.split("\n")
      expect(lines[0]).toBe("Invalid configuration in tidepool.yaml (9 problems):")
      expect(lines.slice(1)).toEqual([
        '  server.port: expected a port number between 0 and 65535, got "abc" (line 2, column 9)',
        '  server.log_levle: unknown field (did you mean "log_level"?) (line 3, column 14)',
        "  tenants[0].auth_query: is required when require_user is false (line 5, column 5)",
        '  tenants[0].db_port: expected an integer between 1 and 65535, got "abc" (line 7, column 14)',
        "  tenants[0].users[0].is_manager: must be true when require_user is false (line 11, column 9)",
        "  tenants[0].users[0].pool_size: expected a positive integer, got 0 (line 13, column 20)",
        "  tenants[1].db_host: is required (line 14, column 5)",
        '  tenants[1].external_id: duplicates tenants[0].external_id; external_id must be unique, got "acme" (line 14, column 18)',
        "  tenants[1].users: must list at least one user (line 17, column 12)"
      ])
      expect(error.problems.find((p) => p.path === "tenants[0].db_port")).toMatchObject({ value: "abc", line: 7 })
    })
  )

  it.effect("refuses a tenant id outside the rule, as the API does", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        parseConfig(
          `tenants:
  - external_id: acme/eu
    db_host: 127.0.0.1
    db_port: 5432
    db_database: app
    users:
      - db_user: app
        db_password: secret
`,
          "tidepool.yaml"
        )
      )
      expect(error.message.split("\n").slice(1)).toEqual([
        `  tenants[0].external_id: expected ASCII letters, digits, '_' and '-' only, starting with a letter or digit (line 2, column 18)`
      ])
    })
  )

  it.effect("never prints secrets", () =>
    Effect.gen(function* () {
      const wrongType = yield* Effect.flip(
        parseConfig(
          `tenants:
  - external_id: acme
    db_host: 127.0.0.1
    db_port: 5432
    db_database: app
    users:
      - db_user: app
        db_password: 987654321
        db_pasword: hunter2
      - [hunter3]
`,
          "x.yaml"
        )
      )
      expect(wrongType.message).toContain("tenants[0].users[0].db_password: expected a string, got <redacted>")
      expect(wrongType.message).toContain('tenants[0].users[0].db_pasword: unknown field (did you mean "db_password"?)')
      for (const secret of ["987654321", "hunter2", "hunter3"]) expect(wrongType.message).not.toContain(secret)

      // The JSON parser's own message would quote the bad token.
      const syntax = yield* Effect.flip(parseConfig('{"tenants": [{"db_password": hunter2}]}', "x.json"))
      expect(syntax.message).toContain("JSON syntax error")
      expect(syntax.message).not.toContain("hunter2")

      const unterminated = yield* Effect.flip(parseConfig('tenants:\n  - db_password: "hunter2\n', "x.yaml"))
      expect(unterminated.message).not.toContain("hunter2")
    })
  )

  it.effect("rejects unknown keys at every level", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        parseConfig(
          `tenant: []
server:
  proxy_port: 1
tenants:
  - external_id: acme
    db_host: 127.0.0.1
    db_port: 5432
    db_database: app
    enforce_tls: true
    users:
      - { db_user: app, db_password: x, pool: 3 }
`,
          "x.yaml"
        )
      )
      expect(error.problems.map((p) => [p.path, p.reason])).toEqual([
        ["tenant", 'unknown field (did you mean "tenants"?)'],
        ["server.proxy_port", "unknown field"],
        ["tenants[0].enforce_tls", 'unknown field (did you mean "enforce_ssl"?)'],
        ["tenants[0].users[0].pool", "unknown field"]
      ])
    })
  )

  it.effect("reports YAML syntax errors and duplicate keys with line and column", () =>
    Effect.gen(function* () {
      const syntax = yield* Effect.flip(parseConfig("tenants:\n  - external_id: a\n   db_host: b\n", "x.yaml"))
      expect(syntax.problems[0].reason).toMatch(/^YAML syntax error: /)
      expect(syntax.problems[0].line).toBe(3)
      expect(syntax.problems[0].column).toBeTypeOf("number")

      const duplicate = yield* Effect.flip(parseConfig("server:\n  port: 1\n  port: 2\n", "x.yaml"))
      expect(duplicate.message).toContain("YAML syntax error: Map keys must be unique (line 3, column 3)")
    })
  )

  it.effect("accepts an empty file and empty sections", () =>
    Effect.gen(function* () {
      const empty = yield* parseConfig("", "x.yaml")
      expect(empty.tenants).toEqual([])
      expect(empty.server).toEqual({})
      const sections = yield* parseConfig("server:\n  # port: 1\ntenants:\n", "x.yaml")
      expect(sections.tenants).toEqual([])
    })
  )

  it.effect("fails clearly when the file cannot be read", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(loadConfigFile(join(dir, "missing.yaml")))
      expect(error.file).toBe(join(dir, "missing.yaml"))
      expect(error.message).toContain("cannot read the file: ENOENT")
    })
  )
})

describe("precedence: default < config file < environment", () => {
  const file = write("precedence.yaml", exampleYaml)

  const settingsUnder = (vars: Record<string, string>) =>
    Effect.gen(function* () {
      const contents = yield* loadConfigFile(file)
      return yield* AppConfig.pipe(
        Effect.provide(AppConfig.layerFromFile(contents).pipe(Layer.provide(ConfigProvider.layer(env(vars)))))
      )
    })

  it.effect("environment over file over default", () =>
    Effect.gen(function* () {
      const config = yield* settingsUnder({ TIDEPOOL_LOG_LEVEL: "error" })
      expect(config.logLevel).toBe("error") // env over file
      expect(config.apiPort).toBe(4100) // file over default
      expect(config.shutdownTimeoutMs).toBe(1000)
      expect(config.transactionPort).toBe(6543) // default
      expect(config.configFile).toEqual(Option.some(file))
    })
  )

  it.effect("an invalid environment value is an error, not a fall back to the file", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(settingsUnder({ PORT: "forty" }))
      expect(error.problems).toEqual([
        { path: "PORT", reason: 'expected a port number between 0 and 65535, got "forty"' }
      ])
    })
  )

  it.effect("without a file it is the environment alone", () =>
    Effect.gen(function* () {
      const config = yield* AppConfig.pipe(
        Effect.provide(AppConfig.layerFromFile(undefined).pipe(Layer.provide(ConfigProvider.layer(env({})))))
      )
      expect(config.apiPort).toBe(4000)
      expect(config.configFile).toEqual(Option.none())
    })
  )

  it.effect("config check summarises tenants, users and where each setting came from", () =>
    Effect.gen(function* () {
      const summary = yield* checkConfigFile(file, env({ TIDEPOOL_LOG_LEVEL: "warning" }))
      expect(summary.tenants).toEqual([
        {
          external_id: "acme",
          db: "127.0.0.1:5432/app",
          users: [{ username: "app.acme", db_user: "app", pool_size: 10, max_clients: 500 }]
        }
      ])
      expect(summary.settings.apiPort).toBe(4100)
      expect(summary.sources).toMatchObject({ logLevel: "env", apiPort: "file", transactionPort: "default" })
      const text = `${summary}`
      expect(text.split("\n")[0]).toBe("1 tenant, 1 user")
      expect(text).toContain("app.acme (db user app, pool_size 10, max_clients 500)")
      expect(text).toContain("PORT=4100 (file)")
      expect(text).not.toContain("secret")
    })
  )

  it.effect("config check fails with every problem", () =>
    Effect.gen(function* () {
      const bad = write("bad.json", '{"server": {"port": -1}, "tenants": [{"external_id": "a b"}]}')
      const error = yield* Effect.flip(checkConfigFile(bad, env({})))
      expect(error.file).toBe(bad)
      expect(error.problems.map((p) => p.path)).toEqual([
        "server.port",
        "tenants[0].db_host",
        "tenants[0].db_port",
        "tenants[0].db_database",
        "tenants[0].users",
        "tenants[0].external_id"
      ])
    })
  )
})
