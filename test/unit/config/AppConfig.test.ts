import { describe, expect, it } from "@effect/vitest"
import { ConfigProvider, Effect, Layer, Option, Redacted } from "effect"
import { AppConfig, environment, envNames, loadAppConfig, settingFields, settings } from "../../../src/config/index.ts"

const env = (entries: Record<string, string>) => ConfigProvider.fromEnv({ env: entries, preserveEmptyStrings: true })

describe("AppConfig", () => {
  it.effect("uses the documented defaults when nothing is set", () =>
    Effect.gen(function* () {
      const config = yield* loadAppConfig(env({}))
      expect(config).toMatchObject({
        listenAddr: "0.0.0.0",
        transactionPort: 6543,
        sessionPort: 5432,
        apiPort: 4000,
        dataDir: "./.tidepool",
        logLevel: "info",
        handshakeTimeoutMs: 15000,
        authFailureDelayMs: 500,
        upstreamConnectTimeoutMs: 5000,
        shutdownTimeoutMs: 30000,
        maxMessageSize: 1073741824,
        serverIdleTimeoutMs: 300000,
        serverLifetimeMs: 3600000,
        poolShutdownAfterMs: 120000
      })
      expect(["json", "pretty"]).toContain(config.logFormat)
      expect(config.configFile).toEqual(Option.none())
      expect(config).toEqual(AppConfig.make({ logFormat: config.logFormat }))
    })
  )

  it.effect("reads the environment variables", () =>
    Effect.gen(function* () {
      const config = yield* loadAppConfig(
        env({
          TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
          PROXY_PORT_TRANSACTION: "7000",
          PROXY_PORT_SESSION: "0",
          PORT: "0",
          TIDEPOOL_LOG_LEVEL: "DEBUG",
          TIDEPOOL_LOG_FORMAT: "pretty",
          TIDEPOOL_HANDSHAKE_TIMEOUT: "1000",
          TIDEPOOL_CONFIG: "/etc/tidepool.yaml"
        })
      )
      expect(config).toMatchObject({
        listenAddr: "127.0.0.1",
        transactionPort: 7000,
        sessionPort: 0,
        apiPort: 0,
        logLevel: "debug",
        logFormat: "pretty",
        handshakeTimeoutMs: 1000,
        configFile: Option.some("/etc/tidepool.yaml")
      })
    })
  )

  it.effect("reports every invalid variable at once, by name", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        loadAppConfig(
          env({
            PORT: "abc",
            PROXY_PORT_SESSION: "70000",
            TIDEPOOL_LOG_LEVEL: "verbose",
            TIDEPOOL_HANDSHAKE_TIMEOUT: "0",
            TIDEPOOL_SERVER_LIFETIME: "99999999999",
            TIDEPOOL_LISTEN_ADDR: "not an address"
          })
        )
      )
      expect(error._tag).toBe("ConfigError")
      expect(error.problems.map((p) => p.path).sort()).toEqual(
        [
          "PORT",
          "PROXY_PORT_SESSION",
          "TIDEPOOL_LOG_LEVEL",
          "TIDEPOOL_HANDSHAKE_TIMEOUT",
          "TIDEPOOL_SERVER_LIFETIME",
          "TIDEPOOL_LISTEN_ADDR"
        ].sort()
      )
      expect(error.message).toContain('PORT: expected a port number between 0 and 65535, got "abc"')
      expect(error.message).toContain("TIDEPOOL_LOG_LEVEL: expected one of trace, debug, info, warning, error, none")
      expect(error.message.split("\n")).toHaveLength(7)
    })
  )

  it.effect("reads a variable set to the empty string as a value, not as unset", () =>
    Effect.gen(function* () {
      // Through the provider the CLI installs, over the real process environment.
      const saved = process.env.PORT
      process.env.PORT = ""
      try {
        const error = yield* Effect.flip(loadAppConfig(environment()))
        expect(error.problems).toEqual([{ path: "PORT", reason: 'expected a port number between 0 and 65535, got ""' }])
      } finally {
        if (saved === undefined) delete process.env.PORT
        else process.env.PORT = saved
      }
    })
  )

  it.effect("rejects two listeners on one port", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(loadAppConfig(env({ PORT: "6543" })))
      expect(error.problems).toEqual([
        {
          path: "PORT",
          reason:
            "port 6543 is also PROXY_PORT_TRANSACTION (server: proxy_port_transaction); the listener ports must differ"
        }
      ])
      // 0 means "any free port", so several zeros do not clash.
      yield* loadAppConfig(env({ PORT: "0", PROXY_PORT_SESSION: "0", PROXY_PORT_TRANSACTION: "0" }))
    })
  )

  it.effect("pairs TLS certificates with keys", () =>
    Effect.gen(function* () {
      const config = yield* loadAppConfig(
        env({ GLOBAL_DOWNSTREAM_CERT_PATH: " a.crt , b.crt ", GLOBAL_DOWNSTREAM_KEY_PATH: "a.key,b.key" })
      )
      expect(config).toMatchObject({
        downstreamCertPath: "a.crt,b.crt",
        downstreamKeyPath: "a.key,b.key",
        upstreamCaPath: ""
      })
      const error = yield* Effect.flip(loadAppConfig(env({ GLOBAL_DOWNSTREAM_CERT_PATH: "a.crt" })))
      expect(error.problems).toEqual([
        {
          path: "GLOBAL_DOWNSTREAM_KEY_PATH",
          reason:
            "GLOBAL_DOWNSTREAM_CERT_PATH names 1 certificate(s) and GLOBAL_DOWNSTREAM_KEY_PATH 0 key(s); give one key per certificate, in the same order"
        }
      ])
      const empty = yield* Effect.flip(loadAppConfig(env({ GLOBAL_UPSTREAM_CA_PATH: "a.pem,,b.pem" })))
      expect(empty.problems).toMatchObject([{ path: "GLOBAL_UPSTREAM_CA_PATH" }])
    })
  )

  it.effect("treats an empty TIDEPOOL_CONFIG as no file", () =>
    Effect.gen(function* () {
      const config = yield* loadAppConfig(env({ TIDEPOOL_CONFIG: "" }))
      expect(config.configFile).toEqual(Option.none())
    })
  )

  it.effect("layer reads the current ConfigProvider", () =>
    Effect.gen(function* () {
      const config = yield* AppConfig
      expect(config.apiPort).toBe(4100)
    }).pipe(Effect.provide(AppConfig.layer.pipe(Layer.provide(ConfigProvider.layer(env({ PORT: "4100" }))))))
  )

  it.effect("layerFrom builds one in-process", () =>
    Effect.gen(function* () {
      const config = yield* AppConfig
      expect(config.transactionPort).toBe(0)
      expect(config.sessionPort).toBe(5432)
    }).pipe(Effect.provide(AppConfig.layerFrom({ transactionPort: 0 })))
  )

  it("names every setting once, in both sources", () => {
    const envs = settingFields.map((f) => settings[f].env)
    const keys = settingFields.map((f) => settings[f].fileKey)
    expect(new Set(envs).size).toBe(envs.length)
    expect(new Set(keys).size).toBe(keys.length)
    expect(envNames).toEqual([...envs, "TIDEPOOL_CONFIG"])
    for (const field of settingFields) {
      // The documented rule: env name lower-cased, `tidepool_` prefix dropped.
      expect(settings[field].fileKey).toBe(settings[field].env.toLowerCase().replace(/^tidepool_/, ""))
    }
  })
})

describe("values as operators write them", () => {
  const load = (entries: Record<string, string>) => loadAppConfig(env(entries))

  it.effect("log levels: any case, warn and warning, err and error, and the names other loggers use", () =>
    Effect.gen(function* () {
      const cases: ReadonlyArray<readonly [string, string]> = [
        ["TRACE", "trace"],
        ["Debug", "debug"],
        [" info ", "info"],
        ["notice", "warning"],
        ["warn", "warning"],
        ["WARNING", "warning"],
        ["err", "error"],
        ["Error", "error"],
        ["fatal", "error"],
        ["critical", "error"],
        ["panic", "error"],
        ["off", "none"],
        ["none", "none"],
        ["silent", "none"]
      ]
      for (const [raw, level] of cases) {
        expect((yield* load({ TIDEPOOL_LOG_LEVEL: raw })).logLevel, raw).toBe(level)
      }
      const error = yield* Effect.flip(load({ TIDEPOOL_LOG_LEVEL: "loud" }))
      expect(error.message).toContain("also warn, err, notice, fatal, off")
    })
  )

  it.effect("durations: bare numbers keep their unit (ms; seconds for the JWT lifetime), or take one", () =>
    Effect.gen(function* () {
      const config = yield* load({
        TIDEPOOL_HANDSHAKE_TIMEOUT: "15000",
        TIDEPOOL_SHUTDOWN_TIMEOUT: "30s",
        TIDEPOOL_SERVER_IDLE_TIMEOUT: "5min",
        TIDEPOOL_SERVER_LIFETIME: "1h",
        TIDEPOOL_AUTH_QUERY_CACHE_TTL: "1d",
        TIDEPOOL_AUTH_FAILURE_DELAY: "250ms",
        TIDEPOOL_UPSTREAM_CONNECT_TIMEOUT: "1.005s", // 1004.9999999999999 in floating point
        TIDEPOOL_POOL_SHUTDOWN_AFTER: "2 minutes",
        TIDEPOOL_JWT_MAX_LIFETIME: "24h"
      })
      expect(config).toMatchObject({
        handshakeTimeoutMs: 15_000,
        shutdownTimeoutMs: 30_000,
        serverIdleTimeoutMs: 300_000,
        serverLifetimeMs: 3_600_000,
        authQueryCacheTtlMs: 86_400_000,
        authFailureDelayMs: 250,
        upstreamConnectTimeoutMs: 1005,
        poolShutdownAfterMs: 120_000,
        jwtMaxLifetimeSeconds: 86_400
      })
      expect((yield* load({ TIDEPOOL_JWT_MAX_LIFETIME: "3600" })).jwtMaxLifetimeSeconds).toBe(3600)
      const error = yield* Effect.flip(
        load({
          TIDEPOOL_HANDSHAKE_TIMEOUT: "10 fortnights",
          TIDEPOOL_SHUTDOWN_TIMEOUT: "1.5", // a bare number is whole milliseconds
          TIDEPOOL_SERVER_LIFETIME: "25d", // beyond Node's timer limit
          TIDEPOOL_JWT_MAX_LIFETIME: "1500ms" // not a whole number of seconds
        })
      )
      expect(error.problems.map((p) => p.path).sort()).toEqual(
        [
          "TIDEPOOL_HANDSHAKE_TIMEOUT",
          "TIDEPOOL_SHUTDOWN_TIMEOUT",
          "TIDEPOOL_SERVER_LIFETIME",
          "TIDEPOOL_JWT_MAX_LIFETIME"
        ].sort()
      )
      expect(error.message).toContain("or with a unit: 500ms, 30s, 5min, 1h, 1d")
    })
  )

  it.effect("sizes: bytes, or kB/MB/GB as in PostgreSQL (powers of 1024)", () =>
    Effect.gen(function* () {
      const config = yield* load({ TIDEPOOL_MAX_MESSAGE_SIZE: "64MB", TIDEPOOL_MAX_PREPARED_MEMORY: "512kB" })
      expect(config.maxMessageSize).toBe(64 * 1024 * 1024)
      expect(config.maxPreparedMemory).toBe(512 * 1024)
      expect((yield* load({ TIDEPOOL_MAX_MESSAGE_SIZE: "1GiB" })).maxMessageSize).toBe(1024 ** 3)
      const error = yield* Effect.flip(load({ TIDEPOOL_MAX_MESSAGE_SIZE: "2GB" }))
      expect(error.problems).toMatchObject([{ path: "TIDEPOOL_MAX_MESSAGE_SIZE" }])
    })
  )

  it.effect("VAULT_ENC_KEY: Supavisor's 32-character form besides hex and base64", () =>
    Effect.gen(function* () {
      for (const key of ["0123456789abcdef0123456789abcdef", "a".repeat(64), Buffer.alloc(32, 7).toString("base64")]) {
        expect((yield* load({ VAULT_ENC_KEY: key })).vaultEncKey, key).toBeDefined()
      }
      const error = yield* Effect.flip(load({ VAULT_ENC_KEY: "too short" }))
      expect(error.message).toContain("32 characters used as they are")
    })
  )

  it.effect("DATABASE_URL: Supavisor's ecto:// form is read as postgresql://", () =>
    Effect.gen(function* () {
      const config = yield* load({ DATABASE_URL: "ecto://postgres:secret@db.internal:6432/supavisor" })
      expect(Redacted.value(config.databaseUrl!)).toBe("postgresql://postgres:secret@db.internal:6432/supavisor")
      const error = yield* Effect.flip(load({ DATABASE_URL: "mysql://root@db/x" }))
      expect(error.message).toContain("ecto://")
      expect(error.message).not.toContain("root@db")
    })
  )
})
